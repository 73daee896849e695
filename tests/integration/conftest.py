from __future__ import annotations

import pytest

from tests.integration.cluster import LocalCluster


@pytest.fixture
def cluster_factory(tmp_path, request):
    """Start clusters for the test; reap them (and check for orphans) after it."""
    made: list[LocalCluster] = []

    def make(**kw) -> LocalCluster:  # type: ignore[no-untyped-def]
        cluster = LocalCluster(tmp_path, **kw)
        made.append(cluster)
        return cluster.start()

    yield make
    failed = request.node.rep_call.failed if hasattr(request.node, "rep_call") else False
    for cluster in made:
        if failed:
            print(cluster.logs())
        cluster.close()


@pytest.fixture
def cluster(cluster_factory):
    return cluster_factory()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
