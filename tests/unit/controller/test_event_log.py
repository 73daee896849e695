"""The event log queues what a pass emits and writes it in as few store calls as it can."""

from __future__ import annotations

from hpt.controller import convert
from hpt.controller.model import Event, EventKind
from hpt.controller.store import StoreUnavailableError
from hpt.controller.store.memory import MemoryStore
from hpt.controller.streams import BATCH_EVENTS, EventLog


class CountingStore(MemoryStore):
    """Counts store calls; refuses every write while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.down = False

    def append_events(self, events):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.down:
            raise StoreUnavailableError("connection refused")
        return super().append_events(events)


def _lost(i: int) -> Event:
    return Event(kind=EventKind.NODE_LOST, at=float(i), node=f"node-{i}", message="lease expired")


def test_a_loss_storm_is_written_in_batches_in_order():
    store = CountingStore()
    log = EventLog(store)
    n = BATCH_EVENTS + 88
    for i in range(n):
        log.emit(_lost(i))
    assert store.calls == 0 and store.read_events(0) == []  # emitting never touches the store
    assert log.flush_pending() == 0
    assert store.calls == 2
    written = [convert.event_from_bytes(b, s) for s, b in store.read_events(0, limit=10_000)]
    assert [(e.seq, e.node) for e in written] == [(i + 1, f"node-{i}") for i in range(n)]
    assert log.flush_pending() == 0 and store.calls == 2  # nothing queued: no call


def test_events_wait_in_order_while_the_store_is_down_and_go_out_when_it_is_back():
    store = CountingStore()
    log = EventLog(store)
    store.down = True
    for i in range(3):
        log.emit(_lost(i))
    assert log.flush_pending() == 3 and log.num_pending == 3
    log.emit(_lost(3))
    store.down = False
    assert log.flush_pending() == 0
    assert [s for s, _ in store.read_events(0)] == [1, 2, 3, 4]
    assert [convert.event_from_bytes(b, s).node for s, b in store.read_events(0)] == [
        "node-0", "node-1", "node-2", "node-3"]
