"""Healthy phases without steps are not hangs: a real 2x2 gloo job (on the shared cluster) with an evaluation section
longer than its hang deadline finishes in one attempt."""

from __future__ import annotations

import pytest

from tests.integration.cluster import BIN, state_name

EVAL = ["python", str(BIN / "eval_train.py"), "--steps", "20", "--eval-at", "5"]
HANG_TIMEOUT_S = 3.0


@pytest.mark.timeout(400)  # a 9 s evaluation on a 2x2 cluster; slow on a loaded machine
def test_an_eval_section_three_times_the_hang_timeout_is_not_restarted(shared_cluster):
    cluster = shared_cluster
    job_id = cluster.submit(*EVAL, "--eval-s", str(3 * HANG_TIMEOUT_S), "--section-timeout",
                            str(10 * HANG_TIMEOUT_S), hang_timeout_s=HANG_TIMEOUT_S,
                            max_restarts=0)
    job = cluster.wait_terminal(job_id, timeout_s=180)
    assert state_name(job.state) == "SUCCEEDED", (job.reason, cluster.logs())
    assert len(job.attempts) == 1 and job.restarts == 0
    assert not [e for e in cluster.events(job_id) if e.kind == "hang"]
