"""Pre-flight health check of a node, run by the agent before it offers its slots.

Checks, each with a one-line verdict:

- ``cpu``: the CPUs this process may use (affinity) are at least one and a short arithmetic
  loop gives the known answer;
- ``memory``: ``MemAvailable`` in /proc/meminfo is at least ``min_free_bytes`` and a 64 MiB
  buffer can be written and read back;
- ``matmul``: a float64 matrix product with a result known in closed form matches exactly
  (catches broken BLAS builds and bad arithmetic units);
- ``collective``: a gloo ``all_reduce`` over loopback TCP between two process-group members
  (two threads of the check process: gloo's transport is the same as between two processes,
  without paying a second interpreter start) sums to the known value;
- ``gpu`` (only when CUDA is available): per device, a matmul checked the same way and a
  device-to-host copy.

The agent runs ``python -m hpt.agent.health`` in a subprocess with a deadline (a hung driver
must not hang the agent) and reports the JSON verdict at registration; a node that fails is
QUARANTINED by the controller. ``HPT_FAULT_HEALTH=fail`` in the agent's environment makes the
check fail with a clear reason (fault injection for tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

FAULT_ENV = "HPT_FAULT_HEALTH"
DEFAULT_DEADLINE_S = 60.0
_MIN_FREE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class HealthResult:
    ran: bool
    ok: bool
    reason: str
    """One line: 'healthy' or the first failed check and why."""
    duration_s: float = 0.0
    checks: dict[str, str] = field(default_factory=dict)
    """check name -> 'ok' or what went wrong."""

    def to_dict(self) -> dict[str, object]:
        return {
            "ran": self.ran,
            "ok": self.ok,
            "reason": self.reason,
            "duration_s": self.duration_s,
            "checks": dict(self.checks),
        }

    @staticmethod
    def from_dict(d: object) -> HealthResult:
        if not isinstance(d, dict):
            raise ValueError(f"health result ({d!r}) must be a JSON object")
        checks = d.get("checks", {})
        if not isinstance(checks, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in checks.items()
        ):
            raise ValueError("health result.checks must map names to strings")
        ok, reason, dur = d.get("ok"), d.get("reason"), d.get("duration_s", 0.0)
        if not isinstance(ok, bool) or not isinstance(reason, str):
            raise ValueError("health result.ok must be a bool and reason a string")
        if not isinstance(dur, int | float):
            raise ValueError("health result.duration_s must be a number")
        return HealthResult(
            ran=True, ok=ok, reason=reason[:1000], duration_s=float(dur), checks=checks
        )


SKIPPED = HealthResult(ran=False, ok=True, reason="not checked")


# ---------------------------------------------------------------- the checks (child side)


def _check_cpu() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not cpus:
        return "no usable CPU"
    total = sum(i * i for i in range(100_000))
    if total != 333328333350000:
        return f"arithmetic check gave {total}, expected 333328333350000"
    return "ok"


def _check_memory(min_free_bytes: int) -> str:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: line.split()[1] for line in f if ":" in line}
        free = int(info["MemAvailable"]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        free = -1
    if 0 <= free < min_free_bytes:
        return f"only {free} bytes available, need {min_free_bytes}"
    buf = bytearray(64 * 1024 * 1024)
    buf[::4096] = b"\xa5" * len(buf[::4096])
    if buf[::4096].count(0xA5) != len(buf[::4096]):
        return "a 64 MiB buffer did not read back what was written"
    return "ok"


def _known_matmul(device: str = "cpu") -> str:
    import torch

    n = 256
    # A = i + 1 on row i, B = all ones: (A @ B)[i, j] = n * (i + 1), exact in float64.
    a = torch.arange(1, n + 1, dtype=torch.float64, device=device).unsqueeze(1).expand(n, n)
    b = torch.ones(n, n, dtype=torch.float64, device=device)
    c = (a @ b).cpu()
    expected = torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1).expand(n, n) * n
    if not torch.equal(c, expected):
        bad = int((c != expected).sum())
        return f"{bad} of {n * n} elements of a {n}x{n} matmul on {device} are wrong"
    return "ok"


def _check_collective(timeout_s: float) -> str:
    import datetime
    import threading

    import torch
    import torch.distributed as dist

    store = dist.HashStore()
    results: dict[int, object] = {}

    def member(rank: int) -> None:
        try:
            pg = dist.ProcessGroupGloo(
                dist.PrefixStore("hpt-health", store),
                rank,
                2,
                datetime.timedelta(seconds=timeout_s),
            )
            t = torch.full((1024,), float(rank + 1))
            pg.allreduce([t]).wait()
            results[rank] = t
        except Exception as exc:
            results[rank] = exc

    threads = [threading.Thread(target=member, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 1.0)
    for rank in range(2):
        r = results.get(rank)
        if r is None:
            return f"gloo all_reduce over loopback did not finish within {timeout_s:g} s"
        if isinstance(r, Exception):
            return f"gloo all_reduce over loopback failed: {type(r).__name__}: {r}"
        if not torch.equal(r, torch.full((1024,), 3.0)):  # type: ignore[arg-type]
            return "gloo all_reduce over loopback gave a wrong sum"
    return "ok"


def _check_gpus() -> dict[str, str]:
    import torch

    if not torch.cuda.is_available():
        return {}
    out = {}
    for i in range(torch.cuda.device_count()):
        try:
            verdict = _known_matmul(f"cuda:{i}")
            torch.cuda.synchronize(i)
        except Exception as exc:
            verdict = f"{type(exc).__name__}: {exc}"
        out[f"gpu{i}"] = verdict
    return out


def run_checks(*, fault: str = "", collective_timeout_s: float = 20.0) -> HealthResult:
    """Run every check in this process and return the verdict (never raises)."""
    started = time.monotonic()
    checks: dict[str, str] = {}
    steps = (
        ("cpu", _check_cpu),
        ("memory", lambda: _check_memory(_MIN_FREE_BYTES)),
        ("matmul", _known_matmul),
        ("collective", lambda: _check_collective(collective_timeout_s)),
    )
    for name, fn in steps:
        try:
            checks[name] = fn()
        except Exception as exc:
            checks[name] = f"{type(exc).__name__}: {exc}"
    try:
        checks.update(_check_gpus())
    except Exception as exc:
        checks["gpu"] = f"{type(exc).__name__}: {exc}"
    if fault == "fail":
        checks["injected"] = f"failed on purpose ({FAULT_ENV}=fail)"
    failed = [(k, v) for k, v in checks.items() if v != "ok"]
    reason = "; ".join(f"{k}: {v}" for k, v in failed) if failed else "healthy"
    return HealthResult(
        ran=True,
        ok=not failed,
        reason=reason,
        duration_s=round(time.monotonic() - started, 3),
        checks=checks,
    )


# ---------------------------------------------------------------- the agent side


def check_node(deadline_s: float = DEFAULT_DEADLINE_S) -> HealthResult:
    """Run the checks in a subprocess with a deadline (what the agent calls at start).

    Returns a failed result naming the cause when the subprocess times out, crashes or prints
    something that is not a verdict.
    """
    started = time.monotonic()
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "hpt.agent.health"],
            capture_output=True,
            timeout=deadline_s,
            env=env,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return HealthResult(
            ran=True,
            ok=False,
            reason=f"health check did not finish within {deadline_s:g} s",
            duration_s=round(time.monotonic() - started, 3),
        )
    except OSError as exc:
        return HealthResult(ran=True, ok=False, reason=f"health check could not start: {exc}")
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    try:
        return HealthResult.from_dict(json.loads(lines[-1]))
    except (IndexError, ValueError) as exc:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        return HealthResult(
            ran=True,
            ok=False,
            reason=f"health check exited {proc.returncode} without a verdict ({exc}): "
            + " | ".join(tail),
            duration_s=round(time.monotonic() - started, 3),
        )


def main() -> int:
    result = run_checks(fault=os.environ.get(FAULT_ENV, ""))
    print(json.dumps(result.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
