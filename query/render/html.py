"""One self-contained interactive flame graph: templates/flamegraph.html plus a JSON payload.

The drawing code (flamegraph.js, flamegraph.css) is shared with the aggregator's web UI,
which serves the same files; here they are inlined so the file needs nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from importlib.resources import files
from typing import BinaryIO

from fleetprof.query.diff import base_totals
from fleetprof.query.flame_tree import FlameNode, FlatTree, gc_paused
from fleetprof.query.render.base import MIN_FRACTION, RenderOptions, frame_color

_PAYLOAD = "__FLEETPROF_PAYLOAD__"
_CSS = "/*__FLEETPROF_FLAMEGRAPH_CSS__*/"
_JS = "/*__FLEETPROF_FLAMEGRAPH_JS__*/"

# With ensure_ascii the JSON already escapes U+2028/2029 and lone surrogates; these three
# are what lets a frame name end the <script> element ("</script>") or open a comment.
# (str.replace, one pass each: several times faster than str.translate on a large payload)
_SCRIPT_SAFE = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"))


@cache
def template(name: str) -> str:
    """A file of templates/ (the page, and the flame graph's script and style sheet)."""
    return (files("fleetprof.query.render") / "templates" / name).read_text("utf-8")


@cache
def _page() -> str:
    page = template("flamegraph.html")
    return page.replace(_CSS, template("flamegraph.css")).replace(_JS, template("flamegraph.js"))


def flame_payload(
    tree: FlameNode | FlatTree,
    options: RenderOptions,
    base: FlameNode | None = None,
    focus: Sequence[str] = (),
) -> dict[str, object]:
    """The tree for flamegraph.js, flat so that deep stacks cannot hit recursion limits
    (in json or in the browser): `frames` lists each distinct `[name, kind, colour]` once,
    and `nodes` holds `frame index, depth, total, self weight` per node in pre-order,
    children in name order; the page rebuilds offsets from that, and the weight of frames
    a pruned tree left out (total - self - children) from the self weights.

    With a `base` tree (the comparison `tree` then being a `FlameNode`) the payload is
    differential (query/diff.py): `base` holds the base's total per node, in the same
    order, and `baseTotal` its whole. `focus` is the path of names a focused tree
    (PathIndex.merged) was made for: its node follows its ancestors in `nodes`."""
    with gc_paused():  # no cycles here, and a full collection over the process costs more
        return _payload(tree, options, base, focus)


def _payload(
    tree: FlameNode | FlatTree,
    options: RenderOptions,
    base: FlameNode | None,
    focus: Sequence[str],
) -> dict[str, object]:
    flat = tree if isinstance(tree, FlatTree) else FlatTree.of(tree)
    nodes = [0] * (4 * len(flat))
    nodes[0::4], nodes[1::4], nodes[2::4], nodes[3::4] = (
        flat.frame,
        flat.depth,
        flat.total,
        flat.self_weight,
    )
    payload: dict[str, object] = {
        "title": options.title,
        "subtitle": options.subtitle,
        "event": options.event,
        "unit": options.unit,
        "frames": [[name, kind, frame_color(name, kind)] for name, kind in flat.frames],
        "nodes": nodes,
        "focus": list(focus),
    }
    if base is not None:
        if not isinstance(tree, FlameNode):
            raise TypeError("a differential payload compares whole trees (FlameNode)")
        payload["base"] = base_totals(base, tree)
        payload["baseTotal"] = base.total
    return payload


class HtmlRenderer:
    suffixes: tuple[str, ...] = (".html", ".htm")
    min_fraction: float = MIN_FRACTION

    def render(self, tree: FlameNode | FlatTree, options: RenderOptions, out: BinaryIO) -> None:
        self._write(flame_payload(tree, options), out)

    def render_diff(
        self, base: FlameNode, tree: FlameNode, options: RenderOptions, out: BinaryIO
    ) -> None:
        self._write(flame_payload(tree, options, base), out)

    def _write(self, payload: dict[str, object], out: BinaryIO) -> None:
        data = json.dumps(payload, separators=(",", ":"))
        for unsafe, escaped in _SCRIPT_SAFE:
            data = data.replace(unsafe, escaped)
        page = _page().replace(_PAYLOAD, data)
        out.write(page.encode("utf-8"))
