"""A read-only status page served by the controller (opt-in: ``hptctl controller --status-port``).

``GET /`` is one static HTML page with a small script (``static/status.html``, no build step and
no data in it); ``GET /api/status`` is the JSON it renders every two seconds: jobs and their
attempts, the fault timeline (detected when, detection and recovery time, steps lost), nodes and
their health, each job's goodput ledger, and a step-rate series per job for a sparkline.

Same auth as the RPCs: with a controller token, ``/api/status`` wants ``Authorization: Bearer
<token>`` (the page takes it from the URL fragment, ``#token=...``, which browsers never send to
the server); with TLS configured the page is served over HTTPS with the controller's certificate.

:func:`status` is a pure function of the job and node records and the step samples; the sampler
thread records each running job's newest step once a second for the step-rate series.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
import threading
import time
from collections import deque
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from hpt.controller.model import Attempt, Job

log = logging.getLogger(__name__)

SAMPLE_PERIOD_S = 1.0
MAX_SAMPLES = 300
"""Step samples kept per job (five minutes at one a second)."""
MAX_JOBS = 50
"""Newest jobs shown."""


def attempt_step(attempt: Attempt) -> int:
    """Steps the attempt completed: the furthest rank's report (-1 before any)."""
    return max((r.step for r in attempt.ranks), default=-1)


def fault_timeline(job: Job, now: float) -> list[dict[str, Any]]:
    """Every attempt that ended in a fault: what, where, when, and what it cost."""
    out = []
    for i, attempt in enumerate(job.attempts):
        cause = attempt.cause
        if cause is None:
            continue
        nxt = job.attempts[i + 1] if i + 1 < len(job.attempts) else None
        restored = nxt.restore_step if nxt is not None else None  # (0: scratch or disk)
        reached = attempt_step(attempt)
        recovered_at = nxt.first_step_at if nxt is not None and nxt.first_step_at else None
        out.append({
            "attempt": attempt.number,
            "kind": cause.kind.value,
            "where": cause.where(),
            "message": cause.message,
            "classification": cause.classification.value,
            "occurred_at": cause.occurred_at or None,
            "detected_at": cause.detected_at,
            "detection_s": max(0.0, cause.detected_at - cause.occurred_at)
            if cause.occurred_at else None,
            "recovered_at": recovered_at,
            "recovery_s": max(0.0, recovered_at - cause.detected_at) if recovered_at else None,
            "step_reached": reached,
            "restored_step": restored,
            "steps_lost": max(0, reached - restored) if restored is not None and reached >= 0
            else None,
        })
    return out


def goodput(job: Job, now: float) -> dict[str, float]:
    """Seconds productive / detecting / restarting (the rules of ``hpt_goodput_seconds_total``)."""
    ledger = {"productive": 0.0, "detection": 0.0, "restart": 0.0}
    for i, attempt in enumerate(job.attempts):
        cause = attempt.cause
        nxt = job.attempts[i + 1] if i + 1 < len(job.attempts) else None
        if attempt.first_step_at:
            end = attempt.ended_at or now
            if cause is not None and cause.occurred_at:
                end = min(end, max(cause.occurred_at, attempt.first_step_at))
            ledger["productive"] += max(0.0, end - attempt.first_step_at)
        if cause is None:
            continue
        if cause.occurred_at:
            ledger["detection"] += max(0.0, cause.detected_at - cause.occurred_at)
        if nxt is not None and nxt.first_step_at:
            ledger["restart"] += max(0.0, nxt.first_step_at - cause.detected_at)
        elif not job.state.is_terminal:
            ledger["restart"] += max(0.0, now - cause.detected_at)
    total = sum(ledger.values())
    ledger["goodput"] = ledger["productive"] / total if total > 0 else 1.0
    return ledger


def step_rate(samples: Any) -> list[list[float]]:
    """``[t, steps/s]`` between consecutive samples of the same attempt."""
    out: list[list[float]] = []
    prev = None
    for t, attempt, step in samples:
        if prev is not None and prev[1] == attempt and t > prev[0] and min(step, prev[2]) >= 0:
            out.append([round(t, 3), round((step - prev[2]) / (t - prev[0]), 3)])
        prev = (t, attempt, step)
    return out


def status(jobs: list[Job], nodes: list[dict[str, Any]],
           samples: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The page's JSON (no secrets: specs' environment variables are left out)."""
    shown = sorted(jobs, key=lambda j: j.created_at, reverse=True)[:MAX_JOBS]
    return {
        "now": now,
        "jobs": [{
            "id": j.id,
            "name": j.spec.name,
            "state": j.state.value,
            "reason": j.reason,
            "restarts": j.restarts,
            "created_at": j.created_at,
            "nodes_wanted": j.spec.nodes,
            "procs_per_node": j.spec.procs_per_node,
            "step": attempt_step(j.attempts[-1]) if j.attempts else -1,
            "attempts": [{
                "number": a.number,
                "state": a.state.value,
                "nodes": list(a.nodes),
                "world_size": a.world_size,
                "started_at": a.started_at,
                "first_step_at": a.first_step_at or None,
                "ended_at": a.ended_at or None,
                "step": attempt_step(a),
            } for a in j.attempts],
            "faults": fault_timeline(j, now),
            "goodput": goodput(j, now),
            "step_rate": step_rate(samples.get(j.id, ())),
        } for j in shown],
        "nodes": nodes,
    }


class StatusPage:
    """Serves the page and samples steps; ``serve()`` then ``close()``."""

    def __init__(self, rec: Any, *, token: str = "", tls_cert: str = "", tls_key: str = "") -> None:
        self._rec = rec
        self._token = token
        self._tls = (tls_cert, tls_key) if tls_cert else None
        self._samples: dict[str, deque[tuple[float, int, int]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self.port = 0
        self._html = resources.files("hpt.controller").joinpath("static/status.html").read_bytes()

    def serve(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: a free port); returns the bound port."""
        page = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                page._handle(self)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("status page: " + fmt, *args)

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        if self._tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(*self._tls)
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server = server
        self.port = server.server_address[1]
        self.sample()
        for target, name in ((server.serve_forever, "hpt-status-http"),
                             (self._sample_loop, "hpt-status-sampler")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("status page on %s://%s:%d/", "https" if self._tls else "http", host, self.port)
        return self.port

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for t in self._threads:
            t.join(timeout=5.0)

    # ---------------------------------------------------------------- data

    def sample(self) -> None:
        """Record each job's newest step (running jobs only: a finished one keeps its series)."""
        now = time.time()
        rec = self._rec
        with rec.lock:
            points = [(j.id, j.attempts[-1].number, attempt_step(j.attempts[-1]))
                      for j in rec.jobs.values() if j.attempts and not j.state.is_terminal]
        with self._lock:
            for job_id, attempt, step in points:
                self._samples.setdefault(job_id, deque(maxlen=MAX_SAMPLES)).append(
                    (now, attempt, step))

    def _sample_loop(self) -> None:
        while not self._stop.wait(SAMPLE_PERIOD_S):
            try:
                self.sample()
            except Exception:  # the page must never take the controller down
                log.exception("status page sampling failed")

    def snapshot(self) -> dict[str, Any]:
        rec = self._rec
        now, mono = time.time(), time.monotonic()
        with rec.lock:
            jobs = list(rec.jobs.values())
            nodes = [{
                "name": name,
                "state": rt.node.state.value,
                "reason": rt.node.reason,
                "address": rt.node.address,
                "slots": rt.node.slots,
                "warm_ready": rt.node.warm_ready,
                "heartbeat_age_s": round(max(0.0, mono - rt.last_heartbeat), 3),
            } for name, rt in sorted(rec.nodes.items())]
            with self._lock:
                samples = {k: list(v) for k, v in self._samples.items()}
            return status(jobs, nodes, samples, now)

    # ---------------------------------------------------------------- http

    def _authorized(self, header: str | None) -> bool:
        if not self._token:
            return True
        expected = f"Bearer {self._token}"
        return header is not None and hmac.compare_digest(header.encode(), expected.encode())

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        path = req.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(req, 200, "text/html; charset=utf-8", self._html)
        elif path == "/api/status":
            if not self._authorized(req.headers.get("Authorization")):
                self._send(req, 401, "application/json",
                           b'{"error": "missing or wrong bearer token"}')
                return
            body = json.dumps(self.snapshot(), separators=(",", ":")).encode()
            self._send(req, 200, "application/json", body)
        else:
            self._send(req, 404, "text/plain; charset=utf-8", b"not found\n")

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, code: int, ctype: str, body: bytes) -> None:
        req.send_response(code)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        req.send_header("Cache-Control", "no-store")
        req.send_header("X-Content-Type-Options", "nosniff")
        req.send_header("Content-Security-Policy",
                        "default-src 'none'; script-src 'unsafe-inline'; "
                        "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:")
        req.end_headers()
        req.wfile.write(body)
