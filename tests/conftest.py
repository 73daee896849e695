"""Fixtures shared by every test suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_fixture import start_redis, stop_redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a ``redis-server`` shared by the session; tests isolate themselves by namespace.

    Skips the test when no ``redis-server`` binary is installed. Tests that stop or restart Redis
    start their own with ``tests.redis_fixture.start_redis``.
    """
    url, proc = start_redis(Path(tmp_path_factory.mktemp("redis")))
    try:
        yield url
    finally:
        stop_redis(proc)


# ------------------------------------------------------------------ one cluster for many tests

SHARED = "shared_cluster"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests on the shared cluster run first (in their collected order), so that the cluster
    is gone before the tests that start clusters of their own."""
    items.sort(key=lambda item: SHARED not in getattr(item, "fixturenames", ()))


class _SharedHolder:
    def __init__(self, workdir: Path) -> None:
        from tests.faults.faults import FaultCluster

        # a LocalCluster serving /metrics; an adapting job's snapshots at most 5 s apart (a
        # small job's optimum is past any cap: the cadence test needs the change within its run)
        self.cluster = FaultCluster(workdir, metrics=True,
                                    controller_args=("--max-snapshot-interval", "5"))
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.cluster.close()


@pytest.fixture(scope="session")
def _shared_cluster_holder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_SharedHolder]:
    from tests.integration.patient import start_slowly

    holder = _SharedHolder(Path(tmp_path_factory.mktemp("shared-cluster")))
    try:
        start_slowly(holder.cluster)
    except BaseException:
        print(holder.cluster.logs())
        holder.close()
        raise
    try:
        yield holder
    finally:
        holder.close()


@pytest.fixture
def shared_cluster(_shared_cluster_holder: _SharedHolder, request: pytest.FixtureRequest):
    """A 2 nodes x 2 slots cluster (a FaultCluster whose controller serves /metrics on
    ``metrics_port``) shared by the tests that ask for it, one after another, instead of one
    cluster each. Before each test it is brought back to its shape (controller up, node-0 and
    node-1 READY: a test may kill an agent); after each, running jobs are cancelled, every rank
    must be dead and no agent may have died by itself. It is shut down (with the orphan and
    shared-memory checks of ``close()``) after the last test that uses it."""
    from tests.integration.cluster import restore_shape, settle

    holder = _shared_cluster_holder
    assert not holder.closed, "the shared cluster was closed before a test that needs it"
    cluster = holder.cluster
    restore_shape(cluster)
    yield cluster
    rep = getattr(request.node, "rep_call", None)
    try:
        settle(cluster)
    except BaseException:
        print(cluster.logs())
        raise
    else:
        if rep is not None and rep.failed:
            print(cluster.logs())
    finally:
        later = request.session.items[request.session.items.index(request.node) + 1:]
        if not any(SHARED in getattr(item, "fixturenames", ()) for item in later):
            holder.close()
