"""Flame graphs: DuckDB merges the samples per stack, Python builds one tree per graph."""

from __future__ import annotations

from itertools import pairwise
from operator import itemgetter

import pyarrow as pa
import pyarrow.compute as pc

from fleetprof.query.filters import SampleFilter
from fleetprof.query.flame_tree import FlameNode, build_tree, gc_paused
from fleetprof.query.source import ProfileSource


def flame_sql(selection: SampleFilter) -> str:
    """Weights summed per (process name, stack); the process name becomes the root frame."""
    # No ORDER BY: sorting lists of strings costs DuckDB more than Python's sort of the
    # decoded rows, whose equal names are then one shared object each.
    return f"""
        SELECT list_prepend(m.comm, s.frames) AS frames,
               list_prepend('process', s.kinds) AS kinds,
               m.weight
        FROM (
            SELECT comm, stack_id, sum(weight)::BIGINT AS weight
            FROM samples WHERE {selection.where()}
            GROUP BY comm, stack_id
        ) m
        JOIN stacks s USING (stack_id)
    """


def load_flame(source: ProfileSource, selection: SampleFilter) -> FlameNode:
    with source.stream(flame_sql(selection)) as reader:
        table = reader.read_all()
    with gc_paused():  # millions of new lists and strings, no cycles: the GC only costs
        frames, kinds = _lists(table["frames"]), _lists(table["kinds"])
        rows = list(zip(frames, kinds, table["weight"].to_pylist(), strict=True))
        # sorted by frames, each row shares its prefix with the previous one: the fast path
        rows.sort(key=itemgetter(0))
    return build_tree(rows)


def _lists(column: pa.ChunkedArray) -> list[list[str]]:
    """A list<string> column as Python lists, each distinct string decoded once: a
    stack's frames are mostly names that thousands of other stacks share."""
    lists = pa.concat_arrays(column.chunks) if column.num_chunks else pa.array([], column.type)
    encoded = pc.dictionary_encode(lists.flatten())
    words = encoded.dictionary.to_pylist()
    names = list(map(words.__getitem__, encoded.indices.to_pylist()))
    offsets = lists.offsets.to_pylist()
    first = offsets[0]
    return [names[a - first : b - first] for a, b in pairwise(offsets)]
