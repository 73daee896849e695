"""hpt.ckpt: in-process checkpointing that needs nothing but torch.

Lazy asynchronous snapshots into sink-owned host memory (engine.py, sink.py), layouts and a
pickle-free meta encoding (layout.py), bitwise restore and resharding (restore.py), RNG capture
(state.py), and the `Checkpointer` a training script uses (checkpointer.py).
"""

from hpt.ckpt.checkpointer import Checkpointer
from hpt.ckpt.engine import SnapshotEngine, SnapshotError
from hpt.ckpt.layout import Layout, ShardInfo, shard_dim0
from hpt.ckpt.sink import MemorySink, ShmSink, Snapshot, SnapshotRef, SnapshotSink

__all__ = [
    "Checkpointer",
    "Layout",
    "MemorySink",
    "ShardInfo",
    "ShmSink",
    "Snapshot",
    "SnapshotEngine",
    "SnapshotError",
    "SnapshotRef",
    "SnapshotSink",
    "shard_dim0",
]
