"""Flame graphs: DuckDB merges the samples per stack, the path index (flame_index.py)
merges the stacks into a tree, keeping only what a graph can show when asked to."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from fleetprof.query.filters import INT64_MAX, SampleFilter, saturating
from fleetprof.query.flame_index import PathIndex, Selected
from fleetprof.query.flame_tree import FlameNode, FlatTree
from fleetprof.query.fleet import read_parts
from fleetprof.query.sandbox import QueryError
from fleetprof.query.source import ProfileSource

# Per database (a source's `identity`), the paths of the stacks read once serve every later
# graph; a few databases at most, the least recently used dropped first.
MAX_INDEXES = 4
_indexes: dict[str, PathIndex] = {}
_indexes_lock = threading.Lock()


def path_index(source: ProfileSource) -> PathIndex:
    """The path index of the source's database; a new, unshared one when the source
    cannot name its database (stack ids are hashes of their frames for agents and
    imports, but any id can be stored, so paths are never shared across databases)."""
    identity = getattr(source, "identity", None)
    if identity is None:
        return PathIndex()
    with _indexes_lock:
        index = _indexes.pop(identity, None) or PathIndex()
        _indexes[identity] = index  # now the most recently used
        while len(_indexes) > MAX_INDEXES:
            del _indexes[next(iter(_indexes))]
    return index


def grouped_sql(selection: SampleFilter) -> str:
    """Weights summed per (process name, stack), by its `flame_key`: the only pass over the
    sample rows, which costs what a GROUP BY stack_id does (proto/lake.py DERIVED)."""
    return f"""
        SELECT flame_key, {saturating("sum(weight)")} AS weight
        FROM samples WHERE {selection.where()}
        GROUP BY flame_key
    """


def pairs_sql(selection: SampleFilter, keys: Sequence[int] | None) -> str:
    """The stack id and process name of flame keys of the selection (None: of all)."""
    listed = "" if keys is None else f" AND flame_key IN ({', '.join(map(str, keys))})"
    return f"""
        SELECT DISTINCT flame_key, stack_id, comm
        FROM samples WHERE {selection.where()}{listed}
    """


def load_flat(
    source: ProfileSource,
    selection: SampleFilter,
    min_fraction: float = 0.0,
    focus: Sequence[str] = (),
) -> FlatTree:
    """The merged tree of the selection, the process names as the root's children.

    `min_fraction` 0 gives the exact tree; above 0, only the nodes of at least that
    fraction of the focused node's total (`PathIndex.merged`), each with its exact total
    and self weight.
    """
    # From a fleet: each aggregator's and the lake's rows; equal keys add up in the tree.
    table = read_parts(source, grouped_sql(selection))
    weights = table["weight"].to_numpy()
    # The tree adds weights up in int64: refuse a selection whose total would overflow it.
    if weights.sum(dtype=np.float64) >= INT64_MAX:
        raise QueryError(
            "the weights of this selection add up past 2^63: narrow it (--since, --node), "
            "or delete poisoned rows (fleetprof admin delete)"
        )
    selected = Selected(
        flame_keys=table["flame_key"].to_numpy(),
        weights=weights,
        where=selection.where(),
        pairs=lambda keys: read_parts(source, pairs_sql(selection, keys)),
    )
    return path_index(source).merged(source, selected, min_fraction, focus)


def load_flame(source: ProfileSource, selection: SampleFilter) -> FlameNode:
    """The exact merged tree of the selection, as linked nodes."""
    return load_flat(source, selection).to_nodes()
