"""Leader election for replicated controllers: a lease in Redis with an epoch.

Two (or more) controller processes share one Redis namespace; one leads. Only the leader loads
the state, runs the control loop and serves jobs and agents; a standby answers those RPCs with
UNAVAILABLE (:class:`StandbyGate`) and reports NOT_SERVING on the gRPC health service, so a
Kubernetes Service whose readiness probe asks for ``hpt.v1.AgentService`` routes to the leader
only, and agents given a list of controller addresses move on to the next one.

Acquiring the lease increments a counter, the **epoch**, and the new leader fences its store
with it (``RedisStore.fence``): every put, delete and event append checks the epoch in the same
Lua script that applies it, so once a standby has taken over, every write of the deposed
leader is refused (``FencedError``) and nothing it does reaches the store. The leader also
checks the epoch before each control-loop pass (:meth:`LeaderElector.check`), so a leader that
was paused past its lease does not send commands to agents after waking up either.

The leader renews every ``lease_s / 3``. A renewal refused by Redis (the lease is gone or
someone else holds it), or no successful renewal for ``lease_s``, means leadership is lost: the
controller stops (its supervisor restarts it as a standby). A standby polls for the lease and
takes over when it expires; a controller that stops cleanly releases it at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

import grpc
import redis

from hpt.controller.store import FencedError
from hpt.controller.store.redis import RedisStore

log = logging.getLogger(__name__)

# KEYS: lease hash, epoch counter. ARGV: holder, lease in ms.
# Returns this holder's epoch (renewing when it already holds the lease), or 0 if another holds it.
_ACQUIRE_LUA = """
local holder = redis.call('HGET', KEYS[1], 'holder')
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('HGET', KEYS[1], 'epoch'))
end
if holder then
  return 0
end
local epoch = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'epoch', epoch)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return epoch
"""

# KEYS: lease hash. ARGV: holder, epoch, lease in ms (unused by release). Returns 1 or 0.
_RENEW_LUA = """
if redis.call('HGET', KEYS[1], 'holder') == ARGV[1]
   and redis.call('HGET', KEYS[1], 'epoch') == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""
_RELEASE_LUA = """
if redis.call('HGET', KEYS[1], 'holder') == ARGV[1]
   and redis.call('HGET', KEYS[1], 'epoch') == ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

_STANDBY_POLL_CAP_S = 0.5


def default_holder() -> str:
    """A name unique to this process: host, pid and a random suffix (a restarted process on the
    same host never mistakes its predecessor's lease for its own)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class LeaderElector:
    """Holds or waits for the lease on a thread; calls back when leadership starts or ends.

    Args:
        store: the controller's Redis store (same server and namespace as the lease).
        lease_s: how long a lease lasts without renewal; failover takes about this long when a
            leader dies without releasing it.
        on_elected: ``(epoch)`` called on the elector's thread once this process leads (the
            store is already fenced with ``epoch``).
        on_lost: ``(reason)`` called once when leadership is lost; the controller must stop.
        holder: this process's name in the lease.
    """

    def __init__(
        self,
        store: RedisStore,
        *,
        lease_s: float,
        on_elected: Callable[[int], None],
        on_lost: Callable[[str], None],
        holder: str = "",
    ) -> None:
        if not lease_s > 0:
            raise ValueError(f"lease_s ({lease_s!r}) must be > 0")
        self._store = store
        self.lease_s = lease_s
        self.holder = holder or default_holder()
        self._on_elected = on_elected
        self._on_lost = on_lost
        r = store.redis
        self._acquire = r.register_script(_ACQUIRE_LUA)
        self._renew = r.register_script(_RENEW_LUA)
        self._release = r.register_script(_RELEASE_LUA)
        self.epoch = 0
        """This process's epoch while it leads; 0 before."""
        self.lost = ""
        """Why leadership ended; empty while leading or waiting."""
        self._last_renewed = 0.0  # monotonic time the last successful renewal was *sent*
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_leader(self) -> bool:
        return self.epoch > 0 and not self.lost

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hpt-leader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop campaigning; a leader releases the lease so a standby takes over at once."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        if self.is_leader:
            try:
                self._release(keys=[self._store.lease_key],
                              args=[self.holder, self.epoch, self._lease_ms])
                log.info("leader lease released (epoch %d)", self.epoch)
            except redis.RedisError as e:
                log.warning("could not release the leader lease: %s", e)

    def check(self) -> None:
        """Raise ``FencedError`` unless this process still leads (called before each control-loop
        pass, so a leader that was paused past its lease acts on nothing after waking)."""
        if self.lost:
            raise FencedError(f"leadership lost: {self.lost}")
        if time.monotonic() - self._last_renewed > self.lease_s:
            raise FencedError(f"no lease renewal for more than {self.lease_s:g}s")
        try:
            current = self._store.redis.get(self._store.epoch_key)
        except redis.RedisError:
            return  # the lease's own deadline above decides; store writes are fenced anyway
        if current is not None and int(current) != self.epoch:
            raise FencedError(f"epoch {self.epoch} superseded by epoch {int(current)}")

    def leader_name(self) -> str:
        """The current lease holder (its host name first: the pod name on Kubernetes), or ""."""
        try:
            holder = self._store.redis.hget(self._store.lease_key, "holder")
        except redis.RedisError:
            return ""
        return holder.decode(errors="replace") if holder else ""

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.lease_s * 1000))

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.is_leader:
                self._renew_once()
                if self.lost:
                    return
                self._stop.wait(self.lease_s / 3)
            else:
                self._try_acquire()
                if not self.is_leader:
                    self._stop.wait(min(self.lease_s / 5, _STANDBY_POLL_CAP_S))

    def _try_acquire(self) -> None:
        sent = time.monotonic()
        try:
            epoch = int(self._acquire(keys=[self._store.lease_key, self._store.epoch_key],
                                      args=[self.holder, self._lease_ms]))
        except redis.RedisError as e:
            log.warning("leader election: redis unavailable: %s", e)
            return
        if not epoch:
            return
        self._store.fence(epoch)
        self._last_renewed = sent
        self.epoch = epoch
        log.info("elected leader (epoch %d, holder %s)", epoch, self.holder)
        try:
            self._on_elected(epoch)
        except Exception as e:  # taking over failed half-way: give the lease up by stopping
            log.critical("taking over as leader failed", exc_info=True)
            self._lose(f"taking over failed: {e}")

    def _renew_once(self) -> None:
        sent = time.monotonic()
        try:
            ok = int(self._renew(keys=[self._store.lease_key],
                                 args=[self.holder, self.epoch, self._lease_ms]))
        except redis.RedisError as e:
            if time.monotonic() - self._last_renewed > self.lease_s:
                self._lose(f"could not renew the lease for {self.lease_s:g}s: {e}")
            return
        if ok:
            self._last_renewed = sent
        else:
            self._lose("the lease expired or another controller holds it")

    def _lose(self, reason: str) -> None:
        if self.lost:
            return
        self.lost = reason
        log.error("leadership lost (epoch %d): %s", self.epoch, reason)
        self._on_lost(reason)


class StandbyGate(grpc.ServerInterceptor):
    """Answers every job and agent RPC with UNAVAILABLE until ``open()`` (health checks and
    reflection pass): a standby must not take registrations or submissions. The message names
    the current leader (``leader_name()``), so a user port-forwarded to a standby knows which
    pod to reach instead."""

    def __init__(self, leader_name: Callable[[], str] = lambda: "") -> None:
        self._open = threading.Event()

        def refuse(request, context):  # type: ignore[no-untyped-def]
            leader = leader_name()
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          "this controller is a standby, not the leader"
                          + (f"; the leader is {leader}" if leader else ""))

        self._handlers = {
            (False, False): grpc.unary_unary_rpc_method_handler(refuse),
            (False, True): grpc.unary_stream_rpc_method_handler(refuse),
            (True, False): grpc.stream_unary_rpc_method_handler(refuse),
            (True, True): grpc.stream_stream_rpc_method_handler(refuse),
        }

    def open(self) -> None:
        self._open.set()

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        method = handler_call_details.method
        if self._open.is_set() or not method.startswith("/hpt.v1."):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self._handlers[(handler.request_streaming, handler.response_streaming)]
