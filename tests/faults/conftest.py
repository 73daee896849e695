from __future__ import annotations

import pytest

from tests.faults.faults import FaultCluster


@pytest.fixture
def fault_cluster(tmp_path, request):
    """Start FaultClusters for the test; reap them (and check for orphans) after it."""
    made: list[FaultCluster] = []

    def make(**kw) -> FaultCluster:  # type: ignore[no-untyped-def]
        cluster = FaultCluster(tmp_path, **kw)
        made.append(cluster)
        return cluster.start()

    yield make
    failed = request.node.rep_call.failed if hasattr(request.node, "rep_call") else False
    for cluster in made:
        if failed:
            print(cluster.logs())
        cluster.close()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
