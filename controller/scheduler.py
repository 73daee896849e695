"""Gang placement: which nodes a job's next attempt runs on. Pure: state in, placement out."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Capacity:
    node: str
    free_slots: int


def place(
    capacity: list[Capacity], *, procs_per_node: int, min_nodes: int, max_nodes: int
) -> list[str] | None:
    """Pick between ``min_nodes`` and ``max_nodes`` nodes with room for ``procs_per_node`` ranks.

    All-or-nothing: returns ``None`` when fewer than ``min_nodes`` nodes fit. Prefers the nodes
    with the most free slots (spreads jobs), then the name, so the result is deterministic.
    """
    fits = [c for c in capacity if c.free_slots >= procs_per_node]
    if len(fits) < min_nodes:
        return None
    fits.sort(key=lambda c: (-c.free_slots, c.node))
    return [c.node for c in fits[:max_nodes]]
