"""What protection pieces each agent holds, per attempt (from heartbeats; not persisted).

Every heartbeat carries the node's complete list of verified pieces, so the newest report of a
node replaces its previous one; a restarted controller learns everything again within one
heartbeat period. ``elastic.protected_steps`` turns these reports into protected steps.
An attempt no node reports pieces of any more leaves the book; a job's entries go when it ends
(``forget``, with the release of its memory).
"""

from __future__ import annotations

from collections.abc import Iterable

from hpt.controller.rounds import ProtectionRounds

Key = tuple[str, int]  # (job id, attempt number)


class PieceBook:
    def __init__(self) -> None:
        self.rounds = ProtectionRounds()  # the step each attempt's holders protect now
        self._held: dict[Key, dict[str, set[tuple[int, int]]]] = {}
        self._bytes: dict[Key, dict[str, dict[tuple[int, int], int]]] = {}

    def update(self, node: str, pieces: Iterable[tuple[str, int, int, int, int]]) -> set[Key]:
        """Replace ``node``'s report; returns the attempts whose pieces changed."""
        held: dict[Key, set[tuple[int, int]]] = {}
        sizes: dict[Key, dict[tuple[int, int], int]] = {}
        for job_id, attempt, stripe, step, nbytes in pieces:
            key = (job_id, attempt)
            held.setdefault(key, set()).add((stripe, step))
            sizes.setdefault(key, {})[(stripe, step)] = nbytes
        changed = set()
        for key in set(held) | {k for k, v in self._held.items() if node in v}:
            now = held.get(key, set())
            per_node = self._held.setdefault(key, {})
            if per_node.get(node, set()) != now:
                changed.add(key)
            if now:
                per_node[node] = now
                self._bytes.setdefault(key, {})[node] = sizes[key]
            else:
                per_node.pop(node, None)
                self._bytes.get(key, {}).pop(node, None)
            if not per_node:
                self._held.pop(key, None)
                self._bytes.pop(key, None)
        return changed

    def held(self, key: Key) -> dict[str, set[tuple[int, int]]]:
        return self._held.get(key, {})

    def parity_bytes(self, key: Key, step: int) -> int:
        """Bytes of every piece of ``step`` (one protected generation) across the nodes."""
        return sum(n for per_node in self._bytes.get(key, {}).values()
                   for (_, s), n in per_node.items() if s == step)

    def forget(self, job_id: str) -> None:
        """``job_id`` ended: its pieces are obsolete (its agents drop them on release)."""
        for key in [k for k in self._held if k[0] == job_id]:
            self._held.pop(key, None)
            self._bytes.pop(key, None)
