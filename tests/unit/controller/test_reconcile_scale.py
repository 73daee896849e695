"""The reconciler under many heartbeats: progress alone neither wakes the loop nor rewrites the
job's record on every pass; state changes do both at once."""

from __future__ import annotations

from hpt.controller.config import ControllerConfig
from hpt.controller.model import JobSpec, Node, Rank, RankReport, RankState
from hpt.controller.reconcile import Reconciler
from hpt.controller.store.memory import MemoryStore


class _CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.job_puts = 0

    def put(self, key, value, *, expected_version):  # type: ignore[no-untyped-def]
        if key.startswith("jobs/"):
            self.job_puts += 1
        return super().put(key, value, expected_version=expected_version)


class _Link:
    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, command: object) -> None:
        self.sent.append(command)

    def close(self) -> None:
        pass


def _running_job(progress_flush_s: float) -> tuple[Reconciler, _CountingStore, str]:
    store = _CountingStore()
    rec = Reconciler(ControllerConfig(port=0, progress_flush_s=progress_flush_s), store)
    rec.register(Node(name="n0", address="127.0.0.1", slots=2), _Link(), [], 0)
    job_id = rec.submit(JobSpec(command=("python", "x.py"), nodes=1, procs_per_node=2))
    rec.reconcile_once()  # placed and launched
    for r in range(2):
        rec.heartbeat("n0", [_report(job_id, r, RankState.RUNNING, step=-1)], [], 0)
    rec.reconcile_once()
    return rec, store, job_id


def _report(job_id: str, rank: int, state: RankState, step: int) -> RankReport:
    return RankReport(job_id=job_id, attempt=1, rank=Rank(
        rank=rank, local_rank=rank, node="n0", pid=100 + rank, state=state, step=step,
        step_at=1.0, snapshot_steps=(step,) if step > 0 else ()))


def test_heartbeat_with_progress_only_does_not_ask_for_a_pass() -> None:
    rec, _, job_id = _running_job(progress_flush_s=60.0)
    assert rec.heartbeat("n0", [_report(job_id, 0, RankState.RUNNING, step=5)], [], 0) is False
    assert rec.jobs[job_id].attempts[0].ranks[0].step == 5  # applied all the same


def test_heartbeat_with_a_rank_state_change_asks_for_a_pass() -> None:
    rec, _, job_id = _running_job(progress_flush_s=60.0)
    assert rec.heartbeat("n0", [_report(job_id, 1, RankState.FAILED, step=5)], [], 0) is True


def test_step_progress_is_written_at_most_every_progress_flush_s() -> None:
    rec, store, job_id = _running_job(progress_flush_s=3600.0)
    rec.heartbeat("n0", [_report(job_id, 0, RankState.RUNNING, step=1)], [], 0)
    rec.reconcile_once()  # the first progress is written, and starts the period
    before = store.job_puts
    for step in range(2, 20):
        rec.heartbeat("n0", [_report(job_id, r, RankState.RUNNING, step) for r in range(2)], [],
                      0)
        rec.reconcile_once()
    assert store.job_puts == before  # 18 passes with progress: no rewrite of the job
    rec.heartbeat("n0", [_report(job_id, 1, RankState.FAILED, step=20)], [], 0)
    rec.reconcile_once()
    assert store.job_puts > before  # a state change is written on its pass, progress with it
    assert rec.jobs[job_id].attempts[0].ranks[0].step == 19


def test_progress_is_written_once_the_flush_period_passed() -> None:
    rec, store, job_id = _running_job(progress_flush_s=0.0)
    before = store.job_puts
    rec.heartbeat("n0", [_report(job_id, 0, RankState.RUNNING, step=3)], [], 0)
    rec.reconcile_once()
    assert store.job_puts == before + 1


def test_stop_flushes_pending_progress() -> None:
    rec, store, job_id = _running_job(progress_flush_s=3600.0)
    rec.heartbeat("n0", [_report(job_id, 0, RankState.RUNNING, step=6)], [], 0)
    rec.reconcile_once()  # the first progress is written, and starts the period
    rec.heartbeat("n0", [_report(job_id, 0, RankState.RUNNING, step=7)], [], 0)
    rec.reconcile_once()
    before = store.job_puts
    assert store.job_puts == before
    rec.stop()
    assert store.job_puts == before + 1
