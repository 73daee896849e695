"""The node agent: registers with the controller, heartbeats, launches and stops ranks.

It holds one bidirectional stream to the controller (``AgentService.Connect``): registration
and heartbeats go up (every rank's status, step progress and output), launch and stop commands
come down, each fenced by (job, attempt). A rank that ends triggers a heartbeat at once. If the
stream breaks the agent reconnects with bounded exponential backoff and re-registers with the
ranks it still runs, so a restarted controller adopts them. If it cannot reach the controller
for longer than its lease it kills its ranks (self-fencing): a controller that declared this
node lost has restarted the job elsewhere.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import queue
import random
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from hpt._proto import agent_pb2, agent_pb2_grpc
from hpt._rank_protocol import (
    ErrorReason,
    Exiting,
    Hello,
    RankEvent,
    RankMessage,
    SnapshotCommitted,
    SnapshotDiscarded,
    Step,
)
from hpt.agent import convert, tls
from hpt.agent.config import AgentConfig
from hpt.agent.guard import Guard
from hpt.agent.launcher import Launcher, RankProcess
from hpt.agent.ownership import RUN_DIR_PREFIX, Ownership, sweep_dead_owners
from hpt.agent.peers import PeerAuth, PeerClient, PeerServer
from hpt.agent.protect import Protector
from hpt.agent.rank_socket import RankSocketServer
from hpt.agent.recovery import Recovery
from hpt.agent.snapshots import SnapshotKeeper
from hpt.agent.spawn import Spawner
from hpt.agent.warm import WarmPool
from hpt.agent.watch import AgentMonitoring, WatchConfig

log = logging.getLogger(__name__)

_LOG_BYTES_PER_HEARTBEAT = 256 * 1024
_BACKOFF_FIRST_S = 0.05
_BACKOFF_CAP_S = 1.0
_SILENT_RECONNECT_S = 3.0
"""A session that hears nothing from its controller this long (a paused or deposed replica,
a half-open connection) is cancelled and the next controller address is dialled, well
before the lease runs out and the ranks would be fenced."""
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Both directions of the controller stream; the controller's own limit is the same by default,
and a launch is bounded by the job spec's size budget (``jobspec.MAX_SPEC_BYTES``) far below it."""
_SHM_DIR = "/dev/shm"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self._owns_run_dir = not cfg.run_dir
        self.run_dir = Path(cfg.run_dir or tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._commands: queue.Queue[agent_pb2.ControllerMessage | None] = queue.Queue()
        self._commander = threading.Thread(target=self._command_loop, name="hpt-commands",
                                           daemon=True)
        self._lease_s = cfg.lease_s
        self._period_s = 0.5
        self._last_contact = time.monotonic()
        self._connected = threading.Event()
        self._fenced = False
        self._next_controller = 0  # index into cfg.controllers; advances after every session
        self._call: Any = None  # the current Connect call, cancelled when it stays silent
        self._session_started = time.monotonic()
        self._unreached_since: float | None = None
        """When the stream to the controller last ended, until an agent registers again (the
        reconnect loop logs the first end at warning, the retries at debug)."""
        self._spawner = Spawner()
        self._warm = (
            WarmPool(cfg.slots, self._spawner, settled=self._ranks_settled,
                     fork_server=cfg.fork_server)
            if cfg.warm_ranks
            else None
        )
        self.socket_path = str(self.run_dir / "agent.sock")
        # leftovers of dead agents on this host go; a live agent's files are never touched
        self.ownership = Ownership.claim(cfg.name, shm_dir=_SHM_DIR, run_dir=str(self.run_dir),
                                         owns_run_dir=self._owns_run_dir)
        sweep_dead_owners(_SHM_DIR)
        self.snapshots = SnapshotKeeper(cfg.name, shm_dir=_SHM_DIR,
                                        owner=self.ownership.instance_id)
        self._guard = Guard()
        auth = PeerAuth(cfg.token, cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
        self.protector = Protector(cfg.name, self.snapshots.shm_dir, self.snapshots.prefix,
                                   PeerClient(auth), on_built=self._changed.set)
        self._peer_server = PeerServer(self.protector, cfg.name, cfg.address, cfg.peer_port, auth)
        self.peer_address = cfg.peer_advertise or f"{cfg.address}:{self._peer_server.port}"
        self.recovery = Recovery(self.protector, self.snapshots)
        self.launcher = Launcher(node=cfg.name, run_dir=self.run_dir,
                                 agent_socket=self.socket_path, on_change=self._changed.set,
                                 spawner=self._spawner, snapshots=self.snapshots,
                                 warm_pool=self._warm, guard=self._guard)
        self._rank_socket = RankSocketServer(self.socket_path, self._on_rank_message,
                                             on_error=self._on_rank_message_error)
        self.monitoring = AgentMonitoring(
            node=cfg.name, launcher=self.launcher, run_dir=self.run_dir,
            on_change=self._changed.set, cfg=WatchConfig(hang=cfg.hang),
            health_check=cfg.health_check, metrics_port=cfg.metrics_port,
            metrics_host=cfg.address,  # where peers reach this node: scrapers do too
        )
        self.snapshots.on_persisted = self.monitoring.persisted

    # ---------------------------------------------------------------- lifecycle

    def run(self) -> None:
        """Serve until ``stop()``; reconnects to the controller as needed."""
        self._rank_socket.start()
        self.protector.start()
        self.monitoring.start()  # health check first: registration reports it
        fence = threading.Thread(target=self._fence_loop, name="hpt-fence", daemon=True)
        fence.start()
        self._commander.start()
        backoff = _BACKOFF_FIRST_S
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                self._session()
                self._next_controller += 1  # a replica that ended us may not lead: try the next
                if self._stop.is_set():
                    break
                if time.monotonic() - started > 5.0:
                    backoff = _BACKOFF_FIRST_S
                self._stop.wait(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, _BACKOFF_CAP_S)
        finally:
            self._shutdown()

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        call = self._call
        if call is not None:  # end the session now, not when the controller ends the stream
            call.cancel()

    def _shutdown(self) -> None:
        started = time.monotonic()
        # a shutdown that outlasts what a supervisor waits before SIGKILL (the kubelet's
        # 30 s grace) says where it is stuck: every thread's stack on stderr, once
        slow_after = self.cfg.stop_grace_s + 10.0
        with contextlib.suppress(RuntimeError, ValueError, OSError):  # stderr without a file
            faulthandler.dump_traceback_later(slow_after, repeat=False)
        try:
            self._release_all()
        finally:  # whatever failed above, the lock goes: a later agent need not sweep us
            faulthandler.cancel_dump_traceback_later()
            self.ownership.release()
            took = time.monotonic() - started
            (log.warning if took > slow_after else log.info)(
                "[-/-/%s/-] shut down in %.2fs", self.cfg.name, took)

    def _release_all(self) -> None:
        # the commands already received go first (a launch under way ends before the stop)
        self._commands.put(None)
        if self._commander.is_alive():
            self._commander.join(timeout=self.cfg.stop_grace_s + 30.0)
        self.snapshots.persist_newest(None)
        self.launcher.stop_all(grace_s=self.cfg.stop_grace_s, reason="agent shutting down")
        if not self.launcher.wait_all(self.cfg.stop_grace_s + 5.0):
            log.error("[-/-/%s/-] ranks survived SIGKILL past the deadline", self.cfg.name)
        self._rank_socket.close()
        self.monitoring.close()
        self._peer_server.close()
        self.protector.close()
        self.protector.client.close()
        self.snapshots.close()
        if self._warm is not None:
            self._warm.close()
        self._spawner.close()
        self._guard.close()
        if self._owns_run_dir:
            import shutil

            shutil.rmtree(self.run_dir, ignore_errors=True)

    # ---------------------------------------------------------------- controller stream

    @property
    def controller_address(self) -> str:
        """The controller address this (or the next) session dials."""
        addrs = self.cfg.controllers
        return addrs[self._next_controller % len(addrs)]

    def _channel(self) -> grpc.Channel:
        options = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                   ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES)]
        creds = tls.channel_credentials(self.cfg)
        if creds is not None:
            return grpc.secure_channel(self.controller_address, creds, options=options)
        return grpc.insecure_channel(self.controller_address, options=options)

    def _session(self) -> None:
        outbox: queue.Queue[agent_pb2.AgentMessage | None] = queue.Queue()
        ended = threading.Event()

        def requests():  # type: ignore[no-untyped-def]
            yield agent_pb2.AgentMessage(register=self._register_message())
            while True:
                msg = outbox.get()
                if msg is None:
                    return
                yield msg

        metadata = [("authorization", f"Bearer {self.cfg.token}")] if self.cfg.token else None
        channel = self._channel()
        beat = threading.Thread(target=self._heartbeat_loop, args=(outbox, ended), daemon=True,
                                name="hpt-heartbeat")
        try:
            responses = agent_pb2_grpc.AgentServiceStub(channel).Connect(
                requests(), metadata=metadata
            )
            self._session_started, self._call = time.monotonic(), responses
            for msg in responses:
                self._last_contact = time.monotonic()
                kind = msg.WhichOneof("kind")
                if kind == "registered":
                    self._on_registered(msg.registered)
                    beat.start()
                elif kind == "ack":
                    self.protector.set_targets([(t.job_id, t.attempt, t.step)
                                                for t in msg.ack.protect])
                    self.snapshots.pin_rounds([(t.job_id, t.step, t.protected_step)
                                               for t in msg.ack.protect])
                elif kind in ("launch", "stop", "release", "cadence"):
                    self._commands.put(msg)
                if self._stop.is_set():
                    break
        except grpc.RpcError as exc:
            if hasattr(exc, "code") and exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                log.error("[-/-/%s/-] the controller refused this agent: %s (retrying with "
                          "backoff)", self.cfg.name, exc.details())
            elif not self._stop.is_set():
                code = exc.code() if hasattr(exc, "code") else exc
                if self._unreached_since is None:
                    self._unreached_since = time.monotonic()
                    log.warning("[-/-/%s/-] controller stream ended: %s (reconnecting with "
                                "backoff up to %.1fs)", self.cfg.name, code, _BACKOFF_CAP_S)
                else:
                    log.debug("[-/-/%s/-] controller stream ended: %s", self.cfg.name, code)
        finally:
            self._call = None
            self._connected.clear()
            ended.set()
            outbox.put(None)
            self._changed.set()
            if beat.is_alive():
                beat.join(timeout=5.0)
            channel.close()

    def _on_registered(self, reg: agent_pb2.Registered) -> None:
        self._period_s = reg.heartbeat_period_s or self._period_s
        if not self.cfg.lease_s:
            self._lease_s = reg.lease_s
        self._fenced = False
        self._connected.set()
        if self._unreached_since is not None:
            log.warning("[-/-/%s/-] the controller answers again after %.1fs", self.cfg.name,
                        time.monotonic() - self._unreached_since)
            self._unreached_since = None
        log.info("[-/-/%s/-] registered with %s (heartbeat %.2fs, lease %.1fs)", self.cfg.name,
                 self.controller_address, self._period_s, self._lease_s)

    def _register_message(self) -> agent_pb2.Register:
        return agent_pb2.Register(
            node=self.cfg.name,
            address=self.cfg.address,
            slots=self.cfg.slots,
            hostname=socket.gethostname(),
            ranks=[self._report(r) for r in self.launcher.ranks()],
            free_port=free_port(self.cfg.address),
            warm_ready=self._warm.ready() if self._warm else 0,
            instance_id=self.ownership.instance_id,
            peer_address=self.peer_address,
            layout_shares=True,
            **self.monitoring.register_fields(),
        )

    def _heartbeat_loop(self, outbox: queue.Queue, ended: threading.Event) -> None:  # type: ignore[type-arg]
        seq = 0
        while not ended.is_set() and not self._stop.is_set():
            self._changed.wait(self._period_s)
            self._changed.clear()
            if ended.is_set():
                return
            seq += 1
            ranks = self.launcher.ranks()
            logs, dropped = self.launcher.outbox.take(_LOG_BYTES_PER_HEARTBEAT)
            outbox.put(
                agent_pb2.AgentMessage(
                    heartbeat=agent_pb2.Heartbeat(
                        seq=seq,
                        ranks=[self._report(r) for r in ranks],
                        logs=[
                            agent_pb2.LogChunk(job_id=j, attempt=a, rank=r, stream=s, text=t)
                            for j, a, r, s, t in logs
                        ],
                        free_port=free_port(self.cfg.address),
                        dropped_log_bytes=dropped,
                        warm_ready=self._warm.ready() if self._warm else 0,
                        **self.monitoring.heartbeat_fields(),
                        events=self.snapshots.take_events(),
                        pieces=self.protector.pieces(),
                    )
                )
            )
            self.launcher.reported(ranks)

    def _command_loop(self) -> None:
        """Launch, stop and release, in the order the controller sent them, off the stream's
        reader: a launch may rebuild gigabytes of snapshots from peers first, and meanwhile the
        reader goes on taking the controller's answers (an agent that hears nothing for
        _SILENT_RECONNECT_S leaves its controller, and past its lease kills its ranks)."""
        while True:
            msg = self._commands.get()
            if msg is None:
                return
            try:
                self._on_command(msg)
            except Exception:  # one bad command must not stop the ones after it
                log.exception("[-/-/%s/-] %s command failed", self.cfg.name,
                              msg.WhichOneof("kind"))

    def _on_command(self, msg: agent_pb2.ControllerMessage) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "launch":
            self._on_launch(msg.launch)
        elif kind == "release":
            self.protector.release(msg.release.job_id)
            self.launcher.close_store(msg.release.job_id)
            self.snapshots.release_later(msg.release.job_id)
        elif kind == "cadence":
            c = msg.cadence
            if c.snapshot_every:
                self.snapshots.set_snapshot_cadence(c.job_id, c.snapshot_every, c.snapshot_from,
                                                    c.snapshot_before)
            if c.persist_every:
                self.snapshots.set_persist_every(c.job_id, c.persist_every)
            log.info("[%s/%d/%s/-] cadence retuned: %s", c.job_id, c.attempt, self.cfg.name,
                     c.reason)
        elif kind == "stop":
            s = msg.stop
            if s.cause == agent_pb2.STOP_CAUSE_CANCELLED:
                # the newest snapshot reaches disk within the grace period (it is in shared
                # memory: the ranks dying meanwhile does not matter)
                self.snapshots.persist_newest(s.job_id)
            self.launcher.stop(s.job_id, s.attempt, grace_s=s.grace_s, reason=s.reason)

    def _on_launch(self, msg: agent_pb2.Launch) -> None:
        try:
            spec = convert.launch_from_proto(msg)
        except ValueError as exc:
            log.error("[%s/%d/%s/-] launch refused: %s", msg.job_id[:256], msg.attempt,
                      self.cfg.name, exc)
            return
        # the old attempt's ranks are gone (they write the snapshots read next), and the old
        # snapshots this node's ranks need are in place (and verified) before they start
        self.launcher.fence(spec.job_id, spec.attempt)
        spec = self.recovery.prepare(spec, msg.restore if msg.HasField("restore") else None)
        self.protector.protect(spec.job_id, spec.attempt, msg.protection)
        self.monitoring.watch.expect(spec.job_id, spec.attempt, spec.world_size)
        self.launcher.launch(spec)

    # ---------------------------------------------------------------- ranks and fencing

    def _ranks_settled(self) -> bool:
        """Every live rank has reported a step (or ended): start-up is over on this node."""
        return all(r.step >= 0 or r.ended for r in self.launcher.ranks())

    def _report(self, proc: RankProcess) -> agent_pb2.RankReport:
        report = convert.rank_report(proc)
        held, persisted, nbytes, persist_s = self.snapshots.steps(proc.job_id, proc.rank)
        report.status.snapshot_steps.extend(held)
        report.status.persisted_steps.extend(persisted)
        report.status.snapshot_bytes = nbytes
        report.status.persist_s = persist_s
        report.status.snapshot_replicated = self.snapshots.replicated(proc.job_id, proc.rank)
        report.status.snapshot_split = self.snapshots.split(proc.job_id, proc.rank)
        report.status.snapshot_blocked_s = self.snapshots.blocked(proc.job_id, proc.rank)
        return report

    def _on_rank_message(self, hello: Hello, msg: RankMessage) -> None:
        self.monitoring.on_rank_message(hello, msg)  # step, records, inflight, sections
        job_id, attempt, rank = hello.job_id, hello.attempt, hello.rank
        if isinstance(msg, SnapshotCommitted):
            self.snapshots.committed(job_id, rank, msg.step, msg.generation, msg.nbytes,
                                     msg.blocked_s)
            self.protector.notify()
        elif isinstance(msg, SnapshotDiscarded):
            self.snapshots.discarded(job_id, rank, msg.generation)
        elif isinstance(msg, RankEvent):
            self.snapshots.event(msg.kind.value, job_id, attempt, rank, msg.message)
        elif isinstance(msg, Exiting):
            self.launcher.script_finished(job_id, attempt, rank)
        elif isinstance(msg, Step):
            self.launcher.record_step(job_id, attempt, rank, msg.step, msg.at)

    def _on_rank_message_error(self, reason: ErrorReason) -> None:
        self.monitoring.rank_message_error(reason)

    def _fence_loop(self) -> None:
        while not self._stop.wait(0.2):
            call = self._call
            if call is not None and (time.monotonic() - max(self._last_contact,
                                                            self._session_started)
                                     > _SILENT_RECONNECT_S):
                log.warning("[-/-/%s/-] %s silent for %.0fs: trying the next controller",
                            self.cfg.name, self.controller_address, _SILENT_RECONNECT_S)
                call.cancel()
                self._call = None
            silent = time.monotonic() - self._last_contact
            if not self._lease_s or silent <= self._lease_s:
                self._fenced = False  # in contact (again): a later silence fences again
                continue
            if not self._fenced and self.launcher.alive():
                log.error("[-/-/%s/-] no controller for %.1fs (lease %.1fs): killing every rank",
                          self.cfg.name, silent, self._lease_s)
                self.launcher.stop_all(grace_s=0.0, reason="self-fenced: controller unreachable")
                self._fenced = True
