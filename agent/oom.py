"""Telling an OOM kill from any other SIGKILL.

The kernel's OOM killer sends SIGKILL, which looks like any other kill. ``/proc/vmstat`` counts
every OOM kill on the node (``oom_kill``, Linux >= 4.13): the launcher reads the counter when a
rank starts and, when the rank dies of a SIGKILL nobody here sent, again; if it rose meanwhile
the rank is named a victim of the OOM killer (on a node shared by several ranks this may name a
rank killed by someone else while another process was OOM-killed: the message says how it knows).
"""

from __future__ import annotations

VMSTAT = "/proc/vmstat"
ERROR_TYPE = "OutOfMemory"


def oom_kills(path: str = VMSTAT) -> int:
    """The node's OOM kill count so far; -1 when the kernel does not say."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return -1


def oom_message(before: int, after: int) -> str:
    return (f"SIGKILL while the node's OOM kill count ({VMSTAT} oom_kill) rose from {before} to "
            f"{after}: killed by the kernel's OOM killer (out of memory)")
