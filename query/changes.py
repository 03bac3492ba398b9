"""Functions whose share of a selection changed most from a base selection (fleetprof diff).

Shares of each selection's own total, not raw weights, so that a 5-minute base and a
1-hour comparison (or one node against ten) compare fairly.
"""

from __future__ import annotations

from typing import BinaryIO

import pyarrow as pa

from fleetprof.query.flame_tree import FlameNode, gc_paused
from fleetprof.query.result_formats import write_table_text

# Below this many samples a share's 95% interval is wider than about +-5 points (see
# share_margin): changes that size are noise, and `fleetprof diff` says so.
FEW_SAMPLES = 400

# Frames that are not functions: process names at the root, sandwich halves.
_NOT_FUNCTIONS = frozenset({"process"})


def share_margin(samples: int) -> float:
    """The widest 95% margin, in percentage points, of a share estimated from `samples`
    independent samples (binomial, normal approximation: 1.96 * sqrt(p(1-p)/n) at p=1/2)."""
    return 100 * 1.96 * 0.5 / samples**0.5 if samples > 0 else 100.0


def function_weights(tree: FlameNode) -> dict[str, list[int]]:
    """`[self, total]` per function name; a function recurring in a stack counts once in
    its total (only its outermost frame adds)."""
    weights: dict[str, list[int]] = {}
    on_path: dict[str, int] = {}
    pending: list[tuple[FlameNode, bool]] = [(child, True) for child in tree.children.values()]
    with gc_paused():
        while pending:
            node, entering = pending.pop()
            if node.kind in _NOT_FUNCTIONS:
                if entering:
                    pending.extend((child, True) for child in node.children.values())
                continue
            if not entering:
                on_path[node.name] -= 1
                continue
            entry = weights.setdefault(node.name, [0, 0])
            entry[0] += node.self_weight
            if not on_path.get(node.name):
                entry[1] += node.total
            on_path[node.name] = on_path.get(node.name, 0) + 1
            pending.append((node, False))
            pending.extend((child, True) for child in node.children.values())
    return weights


def function_changes(base: FlameNode, tree: FlameNode) -> pa.Table:
    """One row per function of either tree, biggest change of total share first:
    `function`, `base_percent`, `percent` (total, of each tree's whole), `change` (points),
    `self_change` (points of self share)."""
    before, after = function_weights(base), function_weights(tree)

    def share(weight: int, whole: int) -> float:
        return 100 * weight / whole if whole else 0.0

    rows = []
    for name in before.keys() | after.keys():
        b_self, b_total = before.get(name, (0, 0))
        a_self, a_total = after.get(name, (0, 0))
        base_percent, percent = share(b_total, base.total), share(a_total, tree.total)
        rows.append(
            {
                "function": name,
                "base_percent": round(base_percent, 2),
                "percent": round(percent, 2),
                "change": round(percent - base_percent, 2),
                "self_change": round(share(a_self, tree.total) - share(b_self, base.total), 2),
            }
        )
    rows.sort(key=lambda r: (-abs(r["change"]), -abs(r["self_change"]), r["function"]))
    return pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [("function", pa.string())]
            + [(c, pa.float64()) for c in ("base_percent", "percent", "change", "self_change")]
        ),
    )


def write_changes(changes: pa.Table, out: BinaryIO, limit: int | None = None) -> None:
    shown = changes if limit is None else changes.slice(0, limit)
    write_table_text(pa.RecordBatchReader.from_batches(shown.schema, shown.to_batches()), out)
