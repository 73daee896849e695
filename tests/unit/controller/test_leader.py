"""Leader lease and epoch fencing against a real redis-server (the session's ``redis_server``).

Two electors on one namespace stand for two controller replicas; "pausing" the leader is
stopping its renewals without releasing the lease, which is what a SIGSTOP or a long GC pause
does to a real process.
"""

from __future__ import annotations

import secrets
import threading

import pytest

from hpt.controller.leader import LeaderElector
from hpt.controller.store import FencedError
from hpt.controller.store.redis import RedisStore

pytestmark = pytest.mark.redis

LEASE_S = 0.6


class Replica:
    def __init__(self, url: str, namespace: str, name: str) -> None:
        self.store = RedisStore(url, namespace=namespace)
        self.elected = threading.Event()
        self.lost = threading.Event()
        self.elector = LeaderElector(self.store, lease_s=LEASE_S, holder=name,
                                     on_elected=lambda epoch: self.elected.set(),
                                     on_lost=lambda reason: self.lost.set())

    def pause(self) -> None:
        """Stop renewing without releasing, as a frozen process would."""
        self.elector._stop.set()
        self.elector._thread.join(timeout=5)

    def close(self) -> None:
        self.elector.stop()
        self.store.close()


@pytest.fixture
def replicas(redis_server):
    namespace = f"lease{secrets.token_hex(4)}"
    made = [Replica(redis_server, namespace, "a"), Replica(redis_server, namespace, "b")]
    yield made
    for r in made:
        r.close()


def test_one_replica_leads_and_the_other_waits(replicas):
    a, b = replicas
    a.elector.start()
    assert a.elected.wait(5)
    b.elector.start()
    assert not b.elected.wait(3 * LEASE_S)  # a keeps renewing: b never takes over
    assert a.elector.is_leader and not b.elector.is_leader
    a.elector.check()  # still current


def test_paused_leader_is_replaced_and_every_write_it_makes_is_refused(replicas):
    a, b = replicas
    a.elector.start()
    assert a.elected.wait(5)
    a.store.put("jobs/j", b"by-a", expected_version=0)
    a.pause()
    b.elector.start()
    assert b.elected.wait(5 * LEASE_S + 5)
    assert b.elector.epoch == a.elector.epoch + 1
    stale = {"put": lambda: a.store.put("jobs/j", b"stale", expected_version=1),
             "create": lambda: a.store.put("jobs/k", b"stale", expected_version=0),
             "delete": lambda: a.store.delete("jobs/j", expected_version=1),
             "event": lambda: a.store.append_event(b"stale"),
             "events": lambda: a.store.append_events([b"stale", b"staler"])}
    accepted = []
    for name, write in stale.items():
        try:
            write()
            accepted.append(name)
        except FencedError:
            pass
    assert accepted == []
    with pytest.raises(FencedError, match="superseded|no lease renewal"):
        a.elector.check()
    assert b.store.get("jobs/j").value == b"by-a"
    assert b.store.get("jobs/k") is None
    assert b.store.read_events(0) == []
    assert b.store.put("jobs/j", b"by-b", expected_version=1) == 2


def test_leader_that_finds_its_lease_taken_steps_down(replicas):
    a, b = replicas
    a.elector.start()
    assert a.elected.wait(5)
    # another holder took the lease (expired while a was frozen): a's next renewal fails
    a.store.redis.delete(a.store.lease_key)
    b.elector.start()
    assert b.elected.wait(5)
    assert a.lost.wait(5 * LEASE_S)
    assert not a.elector.is_leader and "another controller" in a.elector.lost


def test_leader_that_stops_cleanly_hands_over_at_once(replicas):
    a, b = replicas
    a.elector.start()
    assert a.elected.wait(5)
    a.elector.stop()
    assert a.store.redis.exists(a.store.lease_key) == 0  # released, not left to expire
    b.elector.start()
    assert b.elected.wait(5)
    assert b.elector.epoch == a.elector.epoch + 1
