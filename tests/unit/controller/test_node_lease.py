"""Node loss by a lease in seconds: a node is lost once nothing arrived from it for
``node_lease_s`` (2.5 s at a 1 s heartbeat period), judged by the control loop's passes (at
least every ``reconcile_period_s``), never earlier, and never while its heartbeat waits in
the controller's own queue. Clocks are frozen; the loop is driven pass by pass."""

from __future__ import annotations

import pytest

from hpt.controller import reconcile
from hpt.controller.config import ControllerConfig
from hpt.controller.model import EventKind, Node, NodeState
from hpt.controller.store.memory import MemoryStore


class _Link:
    last_received = 0.0

    def send(self, command: object) -> None:
        pass

    def close(self) -> None:
        pass


class _Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _cluster(monkeypatch: pytest.MonkeyPatch, **cfg: float) -> tuple[
        reconcile.Reconciler, _Clock, dict[str, _Link]]:
    mono = _Clock(500.0)
    monkeypatch.setattr(reconcile.time, "monotonic", mono)
    rec = reconcile.Reconciler(ControllerConfig(port=0, heartbeat_period_s=1.0, **cfg),
                               MemoryStore(), clock=_Clock(10_000.0))
    links = {name: _Link() for name in ("n0", "n1")}
    for name, link in links.items():
        rec.register(Node(name=name, address="127.0.0.1", slots=1), link, [], free_port=0)
    return rec, mono, links


def _passes(rec: reconcile.Reconciler, mono: _Clock, seconds: float,
            talking: tuple[str, ...] = ("n0",)) -> None:
    """``seconds`` of the loop: a pass every 0.1 s, a heartbeat of each talking node a second."""
    for i in range(round(seconds / 0.1)):
        mono.t += 0.1
        if i % 10 == 9:
            for name in talking:
                rec.heartbeat(name, [], [], free_port=0)
        rec.reconcile_once()


def _lost(rec: reconcile.Reconciler) -> set[str]:
    return {n for n, rt in rec.nodes.items() if rt.node.state == NodeState.LOST}


def test_a_silent_node_is_lost_once_its_lease_in_seconds_passed_and_not_before(monkeypatch):
    rec, mono, _ = _cluster(monkeypatch)
    assert rec.cfg.heartbeat_timeout_s == 2.5  # automatic at a 1 s period
    _passes(rec, mono, 2.4)
    assert _lost(rec) == set()
    _passes(rec, mono, 0.2)
    assert _lost(rec) == {"n1"}
    [event] = [e for e in rec.events.read(0) if e.kind == EventKind.NODE_LOST]
    assert event.node == "n1" and "timeout 2.5s" in event.message


def test_a_heartbeat_that_arrived_but_waits_in_the_intake_keeps_its_node(monkeypatch):
    rec, mono, links = _cluster(monkeypatch)
    for _ in range(50):  # 5 s in which n1's heartbeats arrive but none is applied yet
        mono.t += 0.1
        links["n1"].last_received = mono.t
        rec.reconcile_once()
    assert "n1" not in _lost(rec)
    assert _lost(rec) == {"n0"}  # n0 sent nothing at all


def test_an_explicit_lease_replaces_the_automatic_one_and_must_span_two_periods(monkeypatch):
    rec, mono, _ = _cluster(monkeypatch, node_lease_s=4.0)
    _passes(rec, mono, 3.9)
    assert _lost(rec) == set()
    _passes(rec, mono, 0.2)
    assert _lost(rec) == {"n1"}
    with pytest.raises(ValueError, match=r"node_lease_s \(1.5\) must be 0 \(automatic\) or >= 2"):
        ControllerConfig(heartbeat_period_s=1.0, node_lease_s=1.5)
    assert ControllerConfig(heartbeat_period_s=0.5).heartbeat_timeout_s == 2.0
