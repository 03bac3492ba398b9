"""Differential flame graphs: a comparison selection drawn against a base selection.

As in Gregg's differential flame graphs, the graph has the comparison's shape and each
frame is coloured by how its share of the whole changed from the base; shares (not raw
weights) make selections of different lengths or sizes compare fairly. Both trees come
from `load_flame`; `render.html.flame_payload(comparison, options, base)` carries the base
totals to flamegraph.js, which colours the frames.
"""

from __future__ import annotations

from fleetprof.query.flame_tree import FlameNode


def base_totals(base: FlameNode, comparison: FlameNode) -> list[int]:
    """The base's total weight at each node of `comparison.walk()`, in that order: the
    node with the same path of frame names, 0 where the base never had that path."""
    totals = []
    twins: list[FlameNode | None] = []  # twins[d]: the base node at depth d of the path
    for depth, _, node in comparison.walk():
        del twins[depth:]
        if depth == 0:
            twin: FlameNode | None = base
        else:
            parent = twins[depth - 1]
            twin = parent.children.get(node.name) if parent else None
        twins.append(twin)
        totals.append(twin.total if twin else 0)
    return totals
