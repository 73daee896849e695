"""The rank <-> agent protocol: every message round-trips, anything else is a named error, and
the agent's socket counts and logs what it does not apply without dropping the connection."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest

from hpt import _rank_protocol as wire
from hpt._rank_protocol import (
    MAX_MESSAGE_BYTES,
    ErrorReason,
    Exiting,
    Finished,
    Hello,
    InFlight,
    ProtocolError,
    RankEvent,
    RankEventKind,
    RankMessage,
    Records,
    SectionBegin,
    SectionEnd,
    SnapshotCommitted,
    SnapshotDiscarded,
    StackDump,
    Step,
    decode,
    from_dict,
)
from hpt.agent.rank_socket import RankSocketServer
from hpt.monitor.metrics import RANK_MESSAGE_ERRORS

COLL = {"type": "collective", "job_id": "j", "attempt": 1, "rank": 0, "node": "n", "seq": 4,
        "op": "all_reduce", "nbytes": 8, "enter_s": 1.0, "exit_s": None}

ONE_OF_EACH: list[RankMessage] = [
    Hello(job_id="job-1", attempt=2, rank=3, pid=4242),
    Step(step=7, at=1_700_000_000.5),
    Records(records=(COLL, {**COLL, "seq": 5, "exit_s": 2.0})),
    InFlight(records=(COLL,)),
    InFlight(records=()),
    StackDump(pid=99),
    SectionBegin(name="eval", timeout_s=600.0),
    SectionEnd(name="eval"),
    Exiting(),
    Finished(),
    SnapshotCommitted(step=10, generation=2, nbytes=4096, copy_s=0.25),
    SnapshotCommitted(step=11, generation=0, nbytes=4096, copy_s=0.25, blocked_s=0.0012),
    SnapshotCommitted(step=0, generation=0, nbytes=0),
    SnapshotDiscarded(generation=63),
    RankEvent(kind=RankEventKind.RESTORED, message="restored step 10 from memory", seconds=1.5,
              nbytes=4096, source="local"),
    RankEvent(kind=RankEventKind.CHECKPOINT_SKIPPED, message="peers: step 9 incomplete"),
]


def test_every_message_type_has_a_round_trip_case():
    assert {type(m) for m in ONE_OF_EACH} == set(wire.MESSAGE_TYPES)


@pytest.mark.parametrize("msg", ONE_OF_EACH, ids=lambda m: m.OP)
def test_every_message_round_trips_through_one_line(msg):
    line = msg.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    obj = json.loads(line)
    assert obj["v"] == wire.PROTOCOL_VERSION and obj["op"] == msg.OP
    assert decode(line) == msg
    assert decode(line.rstrip(b"\n")) == msg


def test_json_integers_in_float_fields_decode_as_floats():
    msg = decode(b'{"v":1,"op":"section","name":"eval","timeout_s":600}')
    assert msg == SectionBegin(name="eval", timeout_s=600.0)
    assert isinstance(msg, SectionBegin) and type(msg.timeout_s) is float


def test_the_error_reasons_are_the_labels_of_the_agents_counter():
    assert tuple(r.value for r in ErrorReason) == RANK_MESSAGE_ERRORS


def test_an_unknown_message_type_is_an_error_naming_the_op():
    with pytest.raises(ProtocolError, match="op \\('reboot'\\) must be one of") as err:
        decode(b'{"v":1,"op":"reboot"}')
    assert err.value.reason is ErrorReason.UNKNOWN_TYPE


@pytest.mark.parametrize("version", [None, 0, 2, "1", True])
def test_another_protocol_version_is_refused(version):
    obj = {"op": "exiting"} if version is None else {"v": version, "op": "exiting"}
    with pytest.raises(ProtocolError, match="v .* must be the protocol version 1") as err:
        from_dict(obj)
    assert err.value.reason is ErrorReason.VERSION


def test_an_oversized_line_is_refused_and_cannot_be_built():
    big = Records(records=tuple({**COLL, "node": "n" * 1000, "seq": i} for i in range(1500)))
    with pytest.raises(ProtocolError, match="exceeds the limit") as err:
        big.encode()
    assert err.value.reason is ErrorReason.OVERSIZED
    with pytest.raises(ProtocolError) as err:
        decode(b" " * (MAX_MESSAGE_BYTES + 1))
    assert err.value.reason is ErrorReason.OVERSIZED


@pytest.mark.parametrize(
    "line,field",
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"v":1,"op":7}', "op"),
        (b'{"v":1,"op":"step","step":1}', "step.at is missing"),
        (b'{"v":1,"op":"step","step":1,"at":1.0,"extra":2}', "step.extra is not a field"),
        (b'{"v":1,"op":"step","step":-1,"at":1.0}', "step.step"),
        (b'{"v":1,"op":"step","step":1.5,"at":1.0}', "step.step"),
        (b'{"v":1,"op":"step","step":true,"at":1.0}', "step.step"),
        (b'{"v":1,"op":"step","step":1,"at":NaN}', "step.at"),
        (b'{"v":1,"op":"hello","job_id":"","attempt":1,"rank":0,"pid":1}', "hello.job_id"),
        (b'{"v":1,"op":"hello","job_id":"j","attempt":0,"rank":0,"pid":1}', "hello.attempt"),
        (b'{"v":1,"op":"records","records":"nope"}', "records.records"),
        (b'{"v":1,"op":"inflight","records":[1]}', "inflight.records[0]"),
        (b'{"v":1,"op":"stack_dump","pid":"12"}', "stack_dump.pid"),
        (b'{"v":1,"op":"section","name":"eval","timeout_s":-1}', "section.timeout_s"),
        (b'{"v":1,"op":"section","name":"eval","timeout_s":true}', "section.timeout_s"),
        (b'{"v":1,"op":"section","name":"eval","timeout_s":1e9}', "section.timeout_s"),
        (b'{"v":1,"op":"section","name":"","timeout_s":10}', "section.name"),
        (b'{"v":1,"op":"section_end","name":null}', "section_end.name"),
        (b'{"v":1,"op":"snapshot","step":-1,"generation":0,"nbytes":0}', "snapshot.step"),
        (b'{"v":1,"op":"snapshot","step":1,"generation":99,"nbytes":0}', "snapshot.generation"),
        (b'{"v":1,"op":"snapshot","step":1,"generation":0,"nbytes":"x"}', "snapshot.nbytes"),
        (b'{"v":1,"op":"snapshot","step":1,"generation":0,"nbytes":1,"copy_s":"slow"}',
         "snapshot.copy_s"),
        (b'{"v":1,"op":"snapshot","step":1,"generation":0,"nbytes":1,"blocked_s":-0.5}',
         "snapshot.blocked_s"),
        (b'{"v":1,"op":"discard","generation":-1}', "discard.generation"),
        (b'{"v":1,"op":"event","kind":"rebooted","message":"x"}', "event.kind"),
        (b'{"v":1,"op":"event","kind":"restored","message":"x","seconds":-1}', "event.seconds"),
        (b'{"v":1,"op":"event","kind":"restored","message":"x","nbytes":-5}', "event.nbytes"),
    ],
)
def test_a_malformed_message_is_an_error_naming_the_field(line, field):
    with pytest.raises(ProtocolError, match=field.replace("[", "\\[").replace("]", "\\]")) as err:
        decode(line)
    assert err.value.reason is ErrorReason.MALFORMED


def test_building_a_bad_message_on_the_rank_side_fails_the_same_way():
    with pytest.raises(ProtocolError, match=r"snapshot\.generation \(64\) must be an int in 0..63"):
        SnapshotCommitted(step=1, generation=64, nbytes=0)
    with pytest.raises(ProtocolError, match=r"event\.kind"):
        RankEvent(kind="nope", message="x")  # type: ignore[arg-type]


# ---------------------------------------------------------------- the agent's socket


class _Rank:
    """A raw client of the agent socket (what ``hpt._rank.AgentChannel`` is, minus the types)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10.0)
        self.sock.connect(path)

    def send(self, *lines: bytes) -> None:
        for line in lines:
            self.sock.sendall(line if line.endswith(b"\n") else line + b"\n")

    def closed_by_agent(self) -> bool:
        return self.sock.recv(1) == b""  # the agent never writes: b"" is its close

    def close(self) -> None:
        self.sock.close()


def _wait_for(cond, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 10.0
    tick = threading.Event()
    while not cond():
        assert time.monotonic() < deadline, f"no {what} within 10 s"
        tick.wait(0.01)


@pytest.fixture
def agent(tmp_path):
    got: list[tuple[Hello, RankMessage]] = []
    reasons: list[ErrorReason] = []

    def handler(hello: Hello, msg: RankMessage) -> None:
        if isinstance(msg, SectionEnd) and msg.name == "refuse-me":
            raise ValueError("the agent cannot apply this one")
        got.append((hello, msg))

    server = RankSocketServer(str(tmp_path / "agent.sock"), handler, on_error=reasons.append)
    server.start()
    yield server, got, reasons
    server.close()


def test_bad_messages_are_counted_and_logged_and_the_rank_stays_connected(agent, caplog):
    server, got, reasons = agent
    hello = Hello(job_id="j", attempt=1, rank=0, pid=1)
    rank = _Rank(server.path)
    caplog.set_level(logging.WARNING, logger="hpt.agent.rank_socket")
    try:
        rank.send(
            hello.encode(),
            b'{"v":1,"op":"reboot"}',
            b'{"v":1,"op":"step","step":"x","at":1.0}',
            b'{"v":2,"op":"step","step":1,"at":1.0}',
            b"{" + b" " * MAX_MESSAGE_BYTES + b"}",
            SectionEnd(name="refuse-me").encode(),
            hello.encode(),
            Step(step=3, at=1.0).encode(),
        )
        _wait_for(lambda: len(got) == 1, "step after the bad messages")
    finally:
        rank.close()
    assert got == [(hello, Step(step=3, at=1.0))]
    assert reasons == [ErrorReason.UNKNOWN_TYPE, ErrorReason.MALFORMED, ErrorReason.VERSION,
                       ErrorReason.OVERSIZED, ErrorReason.REFUSED, ErrorReason.REFUSED]
    assert server.errors == {ErrorReason.UNKNOWN_TYPE: 1, ErrorReason.MALFORMED: 1,
                             ErrorReason.VERSION: 1, ErrorReason.OVERSIZED: 1,
                             ErrorReason.REFUSED: 2}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "[j/1/0] rank socket: message not applied (unknown_type): op ('reboot')" in logged
    assert "(malformed): step.step ('x') must be an int >= 0" in logged
    assert "a second hello" in logged


def test_a_connection_without_a_hello_is_counted_and_closed(agent):
    server, got, reasons = agent
    rank = _Rank(server.path)
    try:
        rank.send(Step(step=1, at=1.0).encode())
        assert rank.closed_by_agent()
    finally:
        rank.close()
    assert got == [] and reasons == [ErrorReason.REFUSED]


def test_the_rank_channel_sends_counts_and_never_raises_on_a_bad_step(agent, caplog):
    import numpy as np

    from hpt._rank import AgentChannel

    server, got, reasons = agent
    hello = Hello(job_id="j", attempt=1, rank=2, pid=1)
    channel = AgentChannel(server.path, hello)
    try:
        channel.step(-1)
        channel.step(1.5)  # type: ignore[arg-type]
        channel.step(np.int64(4))  # type: ignore[arg-type]
        channel.send(Finished())
        _wait_for(lambda: len(got) == 2, "the step and finished messages")
    finally:
        channel.close()
    assert [m for _, m in got][1] == Finished()
    step = got[0][1]
    assert isinstance(step, Step) and step.step == 4 and got[0][0] == hello
    assert channel.error is None and reasons == []
    assert sum("step not sent to the agent" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("kind", list(RankEventKind))
def test_every_rank_event_kind_is_an_event_kind_of_the_wire(kind):
    from hpt.agent.snapshots import event_kind

    assert event_kind(kind.value) > 0
