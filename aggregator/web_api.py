"""The web UI's JSON API: what each endpoint answers, apart from HTTP (aggregator/web.py).

Every function takes a `ProfileSource`, so the same answers could come from a database
file, and the query parameters as `urllib.parse.parse_qs` gives them. A bad parameter
raises `BadRequest` with one line for the user.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from time import perf_counter
from typing import Any, get_args

from fleetprof.proto.schema import EVENT_UNITS
from fleetprof.query.changes import function_changes
from fleetprof.query.filters import SampleFilter, saturating
from fleetprof.query.flame import load_flame, load_flat
from fleetprof.query.flame_index import FocusNotFound
from fleetprof.query.flame_tree import gc_paused
from fleetprof.query.render import RenderOptions
from fleetprof.query.render.base import MIN_FRACTION
from fleetprof.query.render.html import flame_payload
from fleetprof.query.result_formats import json_value
from fleetprof.query.selection import SELECTION_KEYS, SelectionError, parse_selection
from fleetprof.query.source import ProfileSource
from fleetprof.query.top import Order, load_top

Params = Mapping[str, Sequence[str]]

BASE_PREFIX = "base_"
MAX_TOP_ROWS = 10_000
MAX_DIFF_CHANGES = 50
# A browser table of more rows helps no one; the Arrow answer has them all.
MAX_JSON_ROWS = 10_000
MAX_SAFE_INTEGER = 2**53 - 1


class BadRequest(ValueError):
    """A request the API refuses; str() is one line for the user."""


def _check_keys(params: Params, allowed: Iterable[str]) -> None:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        expected = f"expected {', '.join(sorted(allowed))}" if allowed else "it takes none"
        raise BadRequest(f"unknown parameter {unknown[0]!r}; {expected}")


def _single(params: Params, key: str) -> str | None:
    """The one value of `key`, None when absent or empty (an untouched form field)."""
    values = [value for value in params.get(key, ()) if value.strip()]
    if len(values) > 1:
        raise BadRequest(f"{key} may be given only once")
    return values[0].strip() if values else None


def _event(params: Params) -> str:
    event = _single(params, "event") or "cpu"
    if event not in EVENT_UNITS:
        raise BadRequest(f"unknown event {event!r}; known events: {', '.join(EVENT_UNITS)}")
    return event


def selection_from(params: Params, event: str, prefix: str = "") -> SampleFilter:
    """The samples picked by the selection parameters (query/selection.py), each name
    preceded by `prefix`."""
    try:
        return parse_selection(params, event, prefix)
    except SelectionError as exc:
        raise BadRequest(str(exc)) from None


def _options(event: str, title: str) -> RenderOptions:
    return RenderOptions(title=title, event=event, unit=EVENT_UNITS[event])


def _rows(source: ProfileSource, sql: str) -> list[dict[str, Any]]:
    with source.stream(sql) as reader:
        return reader.read_all().to_pylist()


def meta(source: ProfileSource, params: Params) -> dict[str, object]:
    """What there is to pick from: events with their unit and time range, and the nodes,
    process names, pids and jobs by weight (heaviest first, the first few hundred), and
    the on-demand sessions, newest first."""
    _check_keys(params, ())
    events = _rows(
        source,
        f"""
        SELECT event, {saturating("sum(weight)")} AS weight, count(*) AS rows,
               min(ts) AS first, max(ts) AS last
        FROM samples GROUP BY event ORDER BY weight DESC
        """,
    )
    for event in events:
        event["unit"] = EVENT_UNITS.get(event["event"], "samples")
        event["first"], event["last"] = event["first"].isoformat(), event["last"].isoformat()
    return {
        "events": events,
        "known_events": EVENT_UNITS,
        "nodes": _rows(
            source,
            f"SELECT node, {saturating('sum(weight)')} AS weight FROM samples "
            "GROUP BY node ORDER BY weight DESC, node LIMIT 1000",
        ),
        "comms": _rows(
            source,
            f"SELECT comm, {saturating('sum(weight)')} AS weight FROM samples "
            "GROUP BY comm ORDER BY weight DESC, comm LIMIT 500",
        ),
        "pids": _rows(
            source,
            f"SELECT pid, any_value(comm) AS comm, {saturating('sum(weight)')} AS weight "
            "FROM samples GROUP BY pid ORDER BY weight DESC, pid LIMIT 500",
        ),
        "jobs": _rows(
            source,
            f"SELECT job, {saturating('sum(weight)')} AS weight FROM samples WHERE job IS NOT NULL "
            "GROUP BY job ORDER BY weight DESC, job LIMIT 500",
        ),
        # on-demand sessions (fleetprof profile), newest first
        "sessions": _rows(
            source,
            "SELECT session_id AS session, any_value(job) AS job, "
            f"{saturating('sum(weight)')} AS weight, min(ts) AS first FROM samples "
            "WHERE session_id IS NOT NULL GROUP BY session_id ORDER BY first DESC LIMIT 200",
        ),
    }


def _focus(params: Params) -> list[str]:
    """`focus`: a JSON array of frame names, the path from the root's child down to the
    node to zoom into."""
    text = _single(params, "focus")
    if text is None:
        return []
    try:
        focus = json.loads(text)
    except json.JSONDecodeError:
        focus = None
    if not isinstance(focus, list) or not all(isinstance(name, str) for name in focus):
        raise BadRequest('focus must be a JSON array of frame names, like ["app","main"]')
    return focus


def flame(source: ProfileSource, params: Params) -> dict[str, object]:
    """The flame graph of one selection, as render.html.flame_payload gives it: the frames
    of at least MIN_FRACTION of the whole, or with `focus` of the focused frame (its
    subtree and its ancestors only), which is how the page zooms into narrow frames."""
    _check_keys(params, ("event", "focus", *SELECTION_KEYS))
    event = _event(params)
    selection = selection_from(params, event)
    focus = _focus(params)
    try:
        tree = load_flat(source, selection, MIN_FRACTION, focus)
    except FocusNotFound:
        raise BadRequest(f"no frame path {focus!r} in this selection") from None
    return flame_payload(tree, _options(event, f"{event} flame graph"), focus=focus)


def top(source: ProfileSource, params: Params) -> dict[str, object]:
    """The top functions by `order` (self or total), at most `limit` of them."""
    _check_keys(params, ("event", "order", "limit", *SELECTION_KEYS))
    event = _event(params)
    order = _single(params, "order") or "self"
    if order not in get_args(Order):
        raise BadRequest(f"order must be one of {', '.join(get_args(Order))}, not {order!r}")
    limit_text = _single(params, "limit") or "100"
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_TOP_ROWS:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_TOP_ROWS}, not {limit_text!r}")
    total, functions = load_top(source, selection_from(params, event), order, int(limit_text))
    return {"event": event, "unit": EVENT_UNITS[event], "total": total, "functions": functions}


def diff(source: ProfileSource, params: Params) -> dict[str, object]:
    """A differential flame graph: the selection (`since`, `node`, ...) against a base
    selection given by the same parameters prefixed with `base_` (each selection stands
    alone: a base parameter left out means all, as in an empty form field); the event is
    shared. `changes` lists the functions whose share changed most (query/changes.py)."""
    base_keys = [BASE_PREFIX + key for key in SELECTION_KEYS]
    _check_keys(params, ("event", *SELECTION_KEYS, *base_keys))
    event = _event(params)
    base_selection = selection_from(params, event, BASE_PREFIX)
    selection = selection_from(params, event)
    with gc_paused():
        base = load_flame(source, base_selection)
        comparison = load_flame(source, selection)
        options = _options(event, f"{event} differential flame graph")
        payload = flame_payload(comparison, options, base)
        changes = function_changes(base, comparison).slice(0, MAX_DIFF_CHANGES)
    payload["changes"] = changes.to_pylist()
    return payload


def sql_request(body: bytes) -> str:
    """The query of a POST /api/sql body: `{"sql": "SELECT ..."}`."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    sql = request.get("sql") if isinstance(request, dict) else None
    if not isinstance(sql, str) or not sql.strip():
        raise BadRequest('expected a JSON body {"sql": "SELECT ..."}')
    return sql


def sql_json(source: ProfileSource, sql: str) -> bytes:
    """A read-only query's result as JSON: `columns` (name and Arrow type), `rows` as
    arrays (column names may repeat), the first MAX_JSON_ROWS of them, and `truncated`."""
    started = perf_counter()
    with source.stream(sql) as reader:
        schema = reader.schema
        columns: list[list[object]] = [[] for _ in schema]
        rows = 0
        truncated = False
        for batch in reader:
            take = min(batch.num_rows, MAX_JSON_ROWS - rows)
            for values, column in zip(columns, batch.slice(0, take).columns, strict=True):
                values += map(_browser_value, column.to_pylist())
            rows += take
            if take < batch.num_rows:
                truncated = True
                break
    return json_bytes(
        {
            "columns": [{"name": field.name, "type": str(field.type)} for field in schema],
            "rows": [list(row) for row in zip(*columns, strict=True)],
            "truncated": truncated,
            "elapsed_ms": round((perf_counter() - started) * 1000, 1),
        }
    )


def _browser_value(value: object) -> object:
    """A cell as JavaScript reads it right: numbers are doubles there, so integers beyond
    2**53 (64-bit stack ids) would be rounded, and NaN or infinities are not JSON; such
    values travel as strings."""
    if isinstance(value, Decimal):
        value = json_value(value)
    if isinstance(value, int) and abs(value) > MAX_SAFE_INTEGER:
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_browser_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _browser_value(item) for key, item in value.items()}
    return value


def json_bytes(value: object) -> bytes:
    return json.dumps(value, default=json_value, separators=(",", ":")).encode("utf-8")


ENDPOINTS: dict[str, Callable[[ProfileSource, Params], dict[str, object]]] = {
    "/api/meta": meta,
    "/api/flame": flame,
    "/api/top": top,
    "/api/diff": diff,
}
