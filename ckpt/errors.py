"""Exceptions of `hpt.ckpt`, one tree for the whole part.

Everything the checkpoint part raises on purpose derives from `CkptError`, so callers (the agent,
the training script) can tell checkpoint failures from their own bugs. Bad arguments still raise
`ValueError` (STYLE.md rule 15); these classes describe things that went wrong with data or I/O.
"""

from __future__ import annotations


class CkptError(Exception):
    """Base class of every error raised by `hpt.ckpt`."""


class PersistError(CkptError):
    """Writing a checkpoint to durable storage failed; nothing was published and the checkpoints
    that were already there are intact."""


class CorruptCheckpointError(CkptError):
    """A checkpoint on disk (or a snapshot piece) does not match its manifest: a file is missing,
    truncated, has the wrong hash, or the manifest itself is unreadable. The message names the
    file and what is wrong."""


class RestoreError(CkptError):
    """A restore could not produce the requested state (no usable snapshot, incompatible layout,
    a missing slice)."""


class DecodeError(CkptError):
    """Erasure decoding is impossible: more shards are missing than there are parity shards."""
