"""Client side of ``JobService``: the channel, one method per RPC, and JSON-safe views.

``hptctl`` (:mod:`hpt.cli`) is the main user: it resolves the controller address, opens a channel
with :func:`open_channel` (TLS and the bearer token live there), calls :class:`JobClient` and
renders the ``*_to_dict`` views as tables or JSON. Scripts and tests can use the same pieces.

The views are the stable, documented shape of ``hptctl ... -o json``: enum values lose their
prefix (``JOB_STATE_RUNNING`` -> ``RUNNING``), wall-clock times are seconds since the epoch or
``None`` when not yet known, and "no rank"/"no step yet" are ``None`` rather than ``-1``.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from hpt import jobspec, splits
from hpt._address import DEFAULT_HOST, DEFAULT_PORT
from hpt._proto import common_pb2, jobs_pb2, jobs_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_CONTROLLER = f"{DEFAULT_HOST}:{DEFAULT_PORT}"
CONTROLLER_ENV = "HPT_CONTROLLER"
TOKEN_FILE_ENV = "HPT_TOKEN_FILE"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
UNARY_TIMEOUT_S = 10.0
"""Deadline of every unary RPC."""
STREAM_TIMEOUT_S = 30.0
"""Deadline of a stream that is not following (it ends when the backlog is sent)."""

TERMINAL_JOB_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


# --- addresses, channels, tokens -------------------------------------------------------------


def _split_host_port(addr: str) -> tuple[str, int] | None:
    host, sep, port_s = addr.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        return None
    if host.startswith("["):
        if not host.endswith("]"):
            return None
        host = host[1:-1]
    elif ":" in host:  # a bare IPv6 address needs brackets to carry a port
        return None
    port = int(port_s)
    if not host or not 1 <= port <= 65535 or any(c.isspace() or c == "/" for c in host):
        return None
    return host, port


def resolve_controller(flag: str | None) -> str:
    """Pick the controller address: the flag, else ``$HPT_CONTROLLER``, else the default.

    Args:
        flag: the ``--controller`` value, or ``None`` when not given.

    Returns:
        ``host:port`` (``[v6]:port`` for IPv6).

    Raises:
        ValueError: the chosen address is not ``host:port`` with a port in 1..65535.
    """
    if flag:
        addr, source = flag.strip(), "--controller"
    elif os.environ.get(CONTROLLER_ENV, "").strip():
        addr, source = os.environ[CONTROLLER_ENV].strip(), f"${CONTROLLER_ENV}"
    else:
        addr, source = DEFAULT_CONTROLLER, "default"
    if _split_host_port(addr) is None:
        raise ValueError(
            f"controller ({addr!r}, from {source}) must be host:port with a port in 1..65535"
        )
    return addr


def is_loopback(addr: str) -> bool:
    """True when ``addr`` (``host:port``) names this machine's loopback interface."""
    parts = _split_host_port(addr)
    if parts is None:
        return False
    host = parts[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token_file(path: str) -> str:
    """Read a bearer token: the file's content without surrounding whitespace.

    Raises:
        ValueError: the file cannot be read, is empty, or holds more than one line.
    """
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"token file ({path!r}) cannot be read: {e}") from e
    if not token:
        raise ValueError(f"token file ({path!r}) is empty")
    if any(c.isspace() for c in token):
        raise ValueError(f"token file ({path!r}) must hold one token without whitespace")
    return token


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{what} ({path!r}) cannot be read: {e}") from e


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to the metadata of every call."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, d: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [*(d.metadata or ()), self._header]
        return _CallDetails(
            d.method,
            d.timeout,
            metadata,
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def open_channel(
    addr: str,
    *,
    token: str = "",
    tls_ca: str = "",
    tls_cert: str = "",
    tls_key: str = "",
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> grpc.Channel:
    """Open a channel to the controller.

    Args:
        addr: ``host:port``.
        token: bearer token sent as ``authorization: Bearer <token>`` on every call.
        tls_ca: PEM file of the CA that signed the controller's certificate; TLS is used iff set.
        tls_cert, tls_key: PEM client certificate and key for mTLS (need ``tls_ca``).
        max_message_bytes: send and receive limit.

    Raises:
        ValueError: a PEM file cannot be read, or cert/key are given without each other or
            without ``tls_ca``.
    """
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("tls_cert and tls_key must be given together")
    if tls_cert and not tls_ca:
        raise ValueError("tls_cert/tls_key need tls_ca (mTLS runs over TLS)")
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Commands that poll (wait, cancel, demo) notice a (re)started controller within ~2 s.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if tls_ca:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read_pem(tls_ca, "tls_ca"),
            private_key=_read_pem(tls_key, "tls_key") if tls_key else None,
            certificate_chain=_read_pem(tls_cert, "tls_cert") if tls_cert else None,
        )
        channel = grpc.secure_channel(addr, creds, options=options)
    else:
        if token and not is_loopback(addr):
            log.warning("sending the bearer token to %s without TLS (pass a TLS CA)", addr)
        channel = grpc.insecure_channel(addr, options=options)
    if token:
        channel = grpc.intercept_channel(channel, _BearerToken(token))
    return channel


# --- the client ------------------------------------------------------------------------------


class JobClient:
    """One method per ``JobService`` RPC, each with an explicit deadline.

    Errors surface as ``grpc.RpcError`` (``.code()``, ``.details()``). Streams are returned as
    iterators; leaving one early (``break``, an exception) cancels the call.
    """

    def __init__(self, channel: grpc.Channel, *, address: str = "") -> None:
        self.address = address
        self._channel = channel
        self._stub = jobs_pb2_grpc.JobServiceStub(channel)

    @classmethod
    def connect(
        cls,
        addr: str,
        *,
        token: str = "",
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
    ) -> JobClient:
        """Open a channel (see :func:`open_channel`) and wrap it."""
        channel = open_channel(addr, token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        return cls(channel, address=addr)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, *, command: Sequence[str], **options: Any) -> str:
        """Submit a job; returns its id. The controller validates the spec (INVALID_ARGUMENT).

        ``options`` are ``hpt.jobspec.JobSpec`` fields by name (``nodes=2``, ``env={...}``);
        one left out or ``None`` takes the spec's default. Raises TypeError naming an option
        that is not a spec field.
        """
        spec = jobspec.submit_proto({"command": list(command), **options}, common_pb2.JobSpec())
        resp = self._stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec), timeout=UNARY_TIMEOUT_S)
        return resp.job_id

    def get(self, job_id: str) -> common_pb2.Job:
        return self._stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=UNARY_TIMEOUT_S)

    def list(self, page_size: int = 0) -> list[common_pb2.Job]:
        """Every job, oldest first, fetched page by page (each page fits the message limit)."""
        jobs: list[common_pb2.Job] = []
        token = ""
        while True:
            resp = self._stub.ListJobs(
                jobs_pb2.ListJobsRequest(page_size=page_size, page_token=token),
                timeout=UNARY_TIMEOUT_S,
            )
            jobs.extend(resp.jobs)
            if not resp.next_page_token or resp.next_page_token == token:
                return jobs
            token = resp.next_page_token

    def cancel(self, job_id: str, grace_s: float = 0.0) -> common_pb2.Job:
        """Ask the controller to stop the job; ``grace_s`` 0 takes the job's stop grace."""
        req = jobs_pb2.CancelJobRequest(job_id=job_id, grace_s=grace_s)
        return self._stub.CancelJob(req, timeout=UNARY_TIMEOUT_S)

    def nodes(self) -> list[common_pb2.Node]:
        return self.nodes_and_store()[0]

    def nodes_and_store(self) -> tuple[list[common_pb2.Node], jobs_pb2.StoreStatus]:
        """The nodes, and the state of the controller's store (down: the controller is degraded)."""
        resp = self._stub.ListNodes(jobs_pb2.ListNodesRequest(), timeout=UNARY_TIMEOUT_S)
        return list(resp.nodes), resp.store

    def logs(
        self, job_id: str, follow: bool = False, rank: int | None = None
    ) -> Iterator[jobs_pb2.LogLine]:
        """Log lines of a job (every rank unless ``rank`` is given); ``follow`` keeps streaming."""
        req = jobs_pb2.StreamLogsRequest(
            job_id=job_id,
            follow=follow,
            rank=-1 if rank is None else rank,
            has_rank=rank is not None,
        )
        return _iterate(self._stub.StreamLogs(req, timeout=_stream_timeout(follow)))

    def events(
        self, follow: bool = False, job_id: str = "", after_seq: int = 0
    ) -> Iterator[common_pb2.Event]:
        """Events after ``after_seq`` (of one job when ``job_id`` is set)."""
        req = jobs_pb2.StreamEventsRequest(follow=follow, job_id=job_id, after_seq=after_seq)
        return _iterate(self._stub.StreamEvents(req, timeout=_stream_timeout(follow)))


def _stream_timeout(follow: bool) -> float | None:
    return None if follow else STREAM_TIMEOUT_S


def _iterate(call: Any) -> Iterator[Any]:
    try:
        yield from call
    finally:
        call.cancel()  # no-op when the stream already ended


# --- JSON-safe views -------------------------------------------------------------------------


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        name = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix)


def job_state_name(value: int) -> str:
    return _enum_name(common_pb2.JobState, value, "JOB_STATE_")


def _time(t: float) -> float | None:
    return t if t > 0 else None


def _history(changes: Sequence[common_pb2.StateChange]) -> list[dict[str, Any]]:
    return [
        {
            "state": c.state.removeprefix("JOB_STATE_").removeprefix("ATTEMPT_STATE_"),
            "at": _time(c.at),
            "reason": c.reason,
        }
        for c in changes
    ]


def current_attempt(job: common_pb2.Job) -> common_pb2.Attempt | None:
    """The attempt with the highest number, or ``None`` before the first launch."""
    return max(job.attempts, key=lambda a: a.number, default=None)


def fault_to_dict(fault: common_pb2.Fault) -> dict[str, Any]:
    return {
        "kind": fault.kind,
        "node": fault.node,
        "rank": fault.rank if fault.rank >= 0 else None,
        "message": fault.message,
        "detected_at": _time(fault.detected_at),
        "occurred_at": _time(fault.occurred_at),
        "classification": fault.classification,
        "attempt": fault.attempt,
        "steps_lost": fault.steps_lost if fault.steps_lost >= 0 else None,
    }


def rank_to_dict(rank: common_pb2.RankStatus) -> dict[str, Any]:
    d: dict[str, Any] = {
        "rank": rank.rank,
        "local_rank": rank.local_rank,
        "node": rank.node,
        "pid": rank.pid or None,
        "state": _enum_name(common_pb2.RankState, rank.state, "RANK_STATE_"),
        "exit_reason": rank.exit_reason,
        "step": rank.step if rank.step >= 0 else None,
        "step_at": _time(rank.step_at),
        "first_step_at": _time(rank.first_step_at),
        "exit": None,
    }
    if rank.HasField("exit"):
        e = rank.exit
        d["exit"] = {
            "exit_code": e.exit_code,
            "signal": e.signal,
            "error_type": e.error_type,
            "error_message": e.error_message,
            "traceback": e.traceback,
            "ended_at": _time(e.ended_at),
        }
    return d


def attempt_to_dict(attempt: common_pb2.Attempt) -> dict[str, Any]:
    return {
        "number": attempt.number,
        "state": _enum_name(common_pb2.AttemptState, attempt.state, "ATTEMPT_STATE_"),
        "nodes": list(attempt.nodes),
        "world_size": attempt.world_size,
        "master_addr": attempt.master_addr,
        "master_port": attempt.master_port,
        "started_at": _time(attempt.started_at),
        "first_step_at": _time(attempt.first_step_at),
        "ended_at": _time(attempt.ended_at),
        "cause": fault_to_dict(attempt.cause) if attempt.HasField("cause") else None,
    }


def faults_of(job: common_pb2.Job) -> list[dict[str, Any]]:
    """The faults that ended attempts, each with how fast the job recovered when known.

    ``recovered_at`` is the next attempt's first step; ``recovery_s`` is that minus the time
    the fault was detected.
    """
    attempts = sorted(job.attempts, key=lambda a: a.number)
    out = []
    for i, a in enumerate(attempts):
        if not a.HasField("cause"):
            continue
        f = fault_to_dict(a.cause)
        f["attempt"] = a.number
        nxt = attempts[i + 1] if i + 1 < len(attempts) else None
        recovered_at = _time(nxt.first_step_at) if nxt is not None else None
        f["recovered_at"] = recovered_at
        f["recovery_s"] = (
            recovered_at - f["detected_at"]
            if recovered_at is not None and f["detected_at"] is not None
            else None
        )
        out.append(f)
    return out


def job_to_dict(job: common_pb2.Job, *, detail: bool = False) -> dict[str, Any]:
    """The status view of a job; ``detail=True`` adds what ``hptctl describe`` shows.

    ``attempt`` is the current attempt's number (0 before the first launch); ``world_size`` is
    the current attempt's, or the requested ``nodes * procs_per_node`` before the first launch.
    """
    spec = job.spec
    cur = current_attempt(job)
    d: dict[str, Any] = {
        "id": job.id,
        "name": spec.name,
        "state": job_state_name(job.state),
        "attempt": cur.number if cur is not None else 0,
        "restarts": job.restarts,
        "reason": job.reason,
        "world_size": (
            cur.world_size
            if cur is not None and cur.world_size
            else spec.nodes * spec.procs_per_node
        ),
        "nodes": list(cur.nodes) if cur is not None else [],
        "created_at": _time(job.created_at),
        **_progress(cur),
    }
    if not detail:
        return d
    d["spec"] = jobspec.wire_values(spec)
    d["cancel_requested"] = job.cancel_requested
    d["deadline_at"] = _time(job.deadline_at)
    d["attempts"] = [attempt_to_dict(a) for a in sorted(job.attempts, key=lambda a: a.number)]
    d["ranks"] = [rank_to_dict(r) for r in sorted(cur.ranks, key=lambda r: r.rank)] if cur else []
    d["history"] = _history(job.history)
    d["root_cause"] = fault_to_dict(job.root_cause) if job.HasField("root_cause") else None
    d["faults"] = faults_of(job)
    # the cadences in force (the controller's when it retuned them: ``adapt_cadence``)
    d["persist_every"] = job.persist_every or spec.persist_every
    d["snapshot_every"] = job.snapshot_every or spec.snapshot_every  # 0: the script's
    return d


def _progress(attempt: common_pb2.Attempt | None) -> dict[str, Any]:
    """``step``: steps every rank of the attempt completed (None before any report);
    ``step_at``: when the newest step report came."""
    ranks = list(attempt.ranks) if attempt is not None else []
    if not ranks or any(r.step < 0 for r in ranks):
        return {"step": None, "step_at": None}
    return {"step": min(r.step for r in ranks), "step_at": _time(max(r.step_at for r in ranks))}


def checkpoints_of(job: common_pb2.Job) -> list[dict[str, Any]]:
    """Snapshots (memory tier) and persisted checkpoints (disk tier) of the job's current
    attempt, newest first: step, tier, size in bytes (all ranks), state."""
    attempt = current_attempt(job)
    if attempt is None or not attempt.ranks:
        return []
    ranks = list(attempt.ranks)
    total = sum(r.snapshot_bytes for r in ranks)
    rows = []
    for tier, field in (("memory", "snapshot_steps"), ("disk", "persisted_steps")):
        counts: dict[int, int] = {}
        for r in ranks:
            for step in getattr(r, field):
                counts[step] = counts.get(step, 0) + 1
        protected = set(attempt.protected_steps) if tier == "memory" else set()
        for step, n in counts.items():
            state = "complete" if n == len(ranks) else f"partial ({n}/{len(ranks)} ranks)"
            if step in protected:
                state += f", protected ({attempt.redundancy})"
            rows.append({"step": step, "tier": tier, "size_bytes": total or None, "state": state})
    rows.sort(key=lambda d: (-d["step"], d["tier"]))
    return rows


def protection_of(job: common_pb2.Job) -> dict[str, Any]:
    """Snapshot protection of the current attempt: scheme, bytes per node, memory ratio."""
    attempt = current_attempt(job)
    if attempt is None or not attempt.nodes:
        return {}
    nodes = len(attempt.nodes)
    state = sum(r.snapshot_bytes for r in attempt.ranks)
    k, _, m = attempt.redundancy.partition("+")
    expected = (1 + int(m) / int(k)) if m else (2.0 if attempt.redundancy == "mirror" else None)
    return {
        "redundancy": attempt.redundancy or "off",
        "state_bytes_per_node": state // nodes,
        "parity_bytes_per_node": attempt.parity_bytes // nodes,
        "memory_ratio": (state + attempt.parity_bytes) / state if state else None,
        "expected_ratio": expected,
        "protected_steps": sorted(attempt.protected_steps, reverse=True),
        # every rank a data-parallel replica: a resize reads a survivor's replica, no parity
        "replicated": bool(attempt.ranks) and all(r.snapshot_replicated for r in attempt.ranks),
        # sharded state cut by an even split every rank reported: what a resize reads
        "split": sorted(split.splits) if (split := _split_of(attempt)) else None,
    }


def _split_of(attempt: common_pb2.Attempt) -> splits.EvenSplit | None:
    try:
        return splits.common_split(r.snapshot_split for r in attempt.ranks)
    except ValueError:  # (the controller logs it; here it is just not known)
        return None


def node_to_dict(node: common_pb2.Node) -> dict[str, Any]:
    return {
        "name": node.name,
        "address": node.address,
        "state": _enum_name(common_pb2.NodeState, node.state, "NODE_STATE_"),
        "slots": node.slots,
        "last_seen_at": _time(node.last_seen_at),
        "reason": node.reason,
        "hostname": node.hostname,
    }


def event_to_dict(event: common_pb2.Event) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "at": _time(event.at),
        "kind": event.kind,
        "job_id": event.job_id,
        "attempt": event.attempt,
        "node": event.node,
        "rank": event.rank if event.rank >= 0 else None,
        "message": event.message,
    }
