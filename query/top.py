"""The hottest functions of a selection, by self weight (leaf frames) or total (inclusive)."""

from __future__ import annotations

from typing import Literal

from fleetprof.query.filters import SampleFilter, saturating
from fleetprof.query.source import ProfileSource

Order = Literal["self", "total"]


def top_sql(selection: SampleFilter, order: Order, limit: int) -> str:
    # Weights are merged per stack first, so the unnest runs once per distinct stack, not
    # per sample row; list_distinct counts a recursive function once per stack.
    return f"""
        WITH merged AS (
            SELECT stack_id, sum(weight) AS weight
            FROM samples WHERE {selection.where()}
            GROUP BY stack_id
        )
        SELECT f AS function,
               {saturating("coalesce(sum(weight) FILTER (WHERE f = frames[-1]), 0)")} AS self,
               {saturating("sum(weight)")} AS total
        FROM merged JOIN stacks USING (stack_id), unnest(list_distinct(frames)) AS t(f)
        GROUP BY f
        ORDER BY {order} DESC, function
        LIMIT {int(limit)}
    """


def total_sql(selection: SampleFilter) -> str:
    where = selection.where()
    total = saturating("coalesce(sum(weight), 0)")
    return f"SELECT {total} AS total FROM samples WHERE {where}"


def load_top(
    source: ProfileSource, selection: SampleFilter, order: Order = "self", limit: int = 100
) -> tuple[int, list[dict[str, object]]]:
    """The selection's total weight and its top `limit` functions (`function`, `self`,
    `total`), heaviest first."""
    with source.stream(total_sql(selection)) as reader:
        (total,) = reader.read_all()["total"].to_pylist()
    with source.stream(top_sql(selection, order, limit)) as reader:
        return total, reader.read_all().to_pylist()
