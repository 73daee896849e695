"""Who owns what an agent leaves on its host: snapshot memory in /dev/shm and its run directory.

Each agent process draws an instance id at start and holds an exclusive ``flock`` on a lock file
``/dev/shm/hpt-<node>--<instance>.lock`` for as long as it lives; its snapshot files are named
``hpt-<node>--<instance>-...``. The kernel drops the lock when the process dies, however it dies,
so "the owner is dead" is exactly "the lock can be taken". At start every agent sweeps the host:
files whose owner's lock it can take are a dead agent's leftovers and go (with the dead agent's
temporary run directory); files of a live owner, whatever its node name, are never touched. So
a second agent started by mistake under a live agent's name cannot delete its snapshots.

The lock file holds a small JSON record (node, instance, pid, run directory) so the sweeper knows
what else the dead owner left.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9_-]")
RUN_DIR_PREFIX = "hpt-agent-"
"""Temporary run directories an agent creates for itself start with this (and only those are
removed when their owner is found dead)."""


def node_prefix(node: str, instance_id: str) -> str:
    """Every shared-memory file of this agent process starts with it."""
    return f"hpt-{_SAFE.sub('_', node)}--{instance_id}-"


@dataclass(slots=True)
class Ownership:
    """This agent process's claim on its files; ``release()`` at clean shutdown."""

    node: str
    instance_id: str
    lock_path: Path
    _fd: int

    @classmethod
    def claim(cls, node: str, *, shm_dir: str, run_dir: str, owns_run_dir: bool) -> Ownership:
        instance_id = secrets.token_hex(6)
        lock_path = Path(shm_dir) / f"hpt-{_SAFE.sub('_', node)}--{instance_id}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        record = {"node": node, "instance": instance_id, "pid": os.getpid(),
                  "run_dir": run_dir if owns_run_dir else ""}
        os.write(fd, json.dumps(record).encode())
        return cls(node, instance_id, lock_path, fd)

    @property
    def prefix(self) -> str:
        return node_prefix(self.node, self.instance_id)

    def release(self) -> None:
        """Remove the lock file (after the agent removed its snapshot files)."""
        with contextlib.suppress(FileNotFoundError):
            self.lock_path.unlink()
        with contextlib.suppress(OSError):
            os.close(self._fd)


def sweep_dead_owners(shm_dir: str) -> list[str]:
    """Remove what every dead agent of this host left; returns the dead owners' instance ids."""
    swept = []
    for lock_path in sorted(Path(shm_dir).glob("hpt-*--*.lock")):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # gone meanwhile, or not a regular file
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live agent holds it
            try:
                record = json.loads(os.read(fd, 64 * 1024) or b"null")
                node, instance = str(record["node"]), str(record["instance"])
                run_dir = str(record.get("run_dir") or "")
            except (ValueError, TypeError, KeyError):
                continue  # being written by an agent that is starting: not ours to judge
            if not lock_path.name.startswith(f"hpt-{_SAFE.sub('_', node)}--{instance}."):
                continue
            removed = 0
            for path in Path(shm_dir).glob(f"{node_prefix(node, instance)}*"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
            if run_dir and _is_own_temp_dir(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            swept.append(instance)
            log.warning("[-/-/%s/-] removed %d snapshot file(s)%s of a dead agent (instance %s, "
                        "pid %s)", node, removed, f" and {run_dir}" if run_dir else "", instance,
                        record.get("pid"))
        finally:
            os.close(fd)
    return swept


def _is_own_temp_dir(path: str) -> bool:
    p = Path(path)
    return (p.name.startswith(RUN_DIR_PREFIX) and p.parent == Path(tempfile.gettempdir())
            and p.is_dir() and not p.is_symlink())
