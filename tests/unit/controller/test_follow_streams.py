"""Follow-streams (``hptctl events -f``, ``logs -f``) end with the RPC and never keep a stopped
controller alive: a controller that served them exits on SIGTERM like one that did not."""

from __future__ import annotations

import signal
import subprocess
import threading

import grpc
import pytest

from hpt._proto import common_pb2, jobs_pb2, jobs_pb2_grpc
from tests.integration.cluster import free_port, hpt_argv, wait_for

pytestmark = pytest.mark.timeout(120)


def _drain(call, seen: list) -> None:  # type: ignore[no-untyped-def]
    try:
        for message in call:
            seen.append(message)
    except grpc.RpcError:
        pass


@pytest.mark.parametrize("cancelled", [True, False], ids=["cancelled-first", "still-open"])
def test_a_controller_that_served_follow_streams_exits_on_sigterm(tmp_path, cancelled):
    port = free_port()
    log = (tmp_path / "controller.log").open("wb")
    proc = subprocess.Popen(hpt_argv(["controller", "--port", str(port)]), stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        wait_for(lambda: _answers(stub), 60, "controller answers")
        calls = [stub.StreamEvents(jobs_pb2.StreamEventsRequest(follow=True)) for _ in range(3)]
        seen: list = []
        readers = [threading.Thread(target=_drain, args=(c, seen), daemon=True) for c in calls]
        for r in readers:
            r.start()
        # the streams are open and served: a submitted job's event reaches every one of them
        stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=common_pb2.JobSpec(
            command=["true"], nodes=1, procs_per_node=1)), timeout=10)
        wait_for(lambda: len(seen) >= 3, 30, "the submit event on every stream")
        if cancelled:
            for c in calls:
                c.cancel()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the controller did not exit within 30 s of SIGTERM: "
                        + (tmp_path / "controller.log").read_text()[-2000:])
        assert code == 0, (tmp_path / "controller.log").read_text()[-2000:]
        for r in readers:
            r.join(10)
            assert not r.is_alive(), "a stream outlived its controller"
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _answers(stub) -> bool:  # type: ignore[no-untyped-def]
    try:
        stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=1)
    except grpc.RpcError:
        return False
    return True
