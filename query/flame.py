"""Flame graphs: DuckDB merges the samples per stack, Python builds one tree per graph."""

from __future__ import annotations

from fleetprof.query.filters import SampleFilter
from fleetprof.query.flame_tree import FlameNode, build_tree
from fleetprof.query.source import ProfileSource


def flame_sql(selection: SampleFilter) -> str:
    """Weights summed per (process name, stack); the process name becomes the root frame."""
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
        -- Sorted rows share prefixes with their predecessor: the tree build is faster.
        ORDER BY frames
    """


def load_flame(source: ProfileSource, selection: SampleFilter) -> FlameNode:
    with source.stream(flame_sql(selection)) as reader:
        table = reader.read_all()
    return build_tree(
        zip(
            table["frames"].to_pylist(),
            table["kinds"].to_pylist(),
            table["weight"].to_pylist(),
            strict=True,
        )
    )
