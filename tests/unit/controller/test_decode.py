"""Bytes that are not a protobuf message get INVALID_ARGUMENT from a real controller."""

from __future__ import annotations

import grpc
import pytest

from hpt._proto import jobs_pb2
from hpt.controller.app import Controller
from hpt.controller.config import ControllerConfig
from hpt.controller.store.memory import MemoryStore

GARBAGE = b"\x0a\xff\xff\xff\xff\xff"  # field 1, length-delimited, with an impossible length


@pytest.fixture
def controller():
    ctl = Controller(ControllerConfig(port=0), store=MemoryStore())
    port = ctl.start()
    yield f"127.0.0.1:{port}"
    ctl.stop(grace_s=0.5)


@pytest.mark.parametrize("method", ["/hpt.v1.JobService/SubmitJob", "/hpt.v1.JobService/GetJob"])
def test_malformed_unary_request_is_invalid_argument(controller, method):
    with grpc.insecure_channel(controller) as channel:
        call = channel.unary_unary(method)  # no serializer: the bytes go as they are
        with pytest.raises(grpc.RpcError) as err:
            call(GARBAGE, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert method in err.value.details()


def test_malformed_message_on_a_stream_is_invalid_argument(controller):
    with grpc.insecure_channel(controller) as channel:
        call = channel.stream_stream("/hpt.v1.AgentService/Connect")
        with pytest.raises(grpc.RpcError) as err:
            list(call(iter([GARBAGE]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_valid_request_still_reaches_the_servicer(controller):
    with grpc.insecure_channel(controller) as channel:
        call = channel.unary_unary("/hpt.v1.JobService/GetJob",
                                   request_serializer=jobs_pb2.GetJobRequest.SerializeToString)
        with pytest.raises(grpc.RpcError) as err:
            call(jobs_pb2.GetJobRequest(job_id="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("method", ["/hpt.v1.JobService/StreamEvents",
                                    "/hpt.v1.JobService/StreamLogs"])
def test_malformed_request_to_a_follow_stream_is_invalid_argument(controller, method):
    with grpc.insecure_channel(controller) as channel:
        call = channel.unary_stream(method)
        with pytest.raises(grpc.RpcError) as err:
            list(call(GARBAGE, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert method in err.value.details()
