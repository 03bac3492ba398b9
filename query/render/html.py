"""One self-contained interactive flame graph: templates/flamegraph.html plus a JSON payload.

The drawing code (flamegraph.js, flamegraph.css) is shared with the aggregator's web UI,
which serves the same files; here they are inlined so the file needs nothing else.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import BinaryIO

from fleetprof.query.diff import base_totals
from fleetprof.query.flame_tree import FlameNode, gc_paused
from fleetprof.query.render.base import RenderOptions, frame_color

_PAYLOAD = "__FLEETPROF_PAYLOAD__"
_CSS = "/*__FLEETPROF_FLAMEGRAPH_CSS__*/"
_JS = "/*__FLEETPROF_FLAMEGRAPH_JS__*/"

# With ensure_ascii the JSON already escapes U+2028/2029 and lone surrogates; these three
# are what lets a frame name end the <script> element ("</script>") or open a comment.
_SCRIPT_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


@cache
def template(name: str) -> str:
    """A file of templates/ (the page, and the flame graph's script and style sheet)."""
    return (files("fleetprof.query.render") / "templates" / name).read_text("utf-8")


@cache
def _page() -> str:
    page = template("flamegraph.html")
    return page.replace(_CSS, template("flamegraph.css")).replace(_JS, template("flamegraph.js"))


def flame_payload(
    tree: FlameNode, options: RenderOptions, base: FlameNode | None = None
) -> dict[str, object]:
    """The tree for flamegraph.js, flat so that deep stacks cannot hit recursion limits
    (in json or in the browser): `frames` lists each distinct `[name, kind, colour]` once,
    and `nodes` holds `frame index, depth, total` per node in pre-order, children in name
    order; the page rebuilds offsets and self weights from that.

    With a `base` tree the payload is differential (query/diff.py): `base` holds the base's
    total per node, in the same order, and `baseTotal` its whole."""
    frame_ids: dict[tuple[str, str], int] = {}
    nodes: list[int] = []
    with gc_paused():  # 8x faster on a tree of 1.4M nodes (benchmarks/flame_query.py)
        for depth, _, node in tree.walk():
            key = (node.name, node.kind)
            frame_id = frame_ids.setdefault(key, len(frame_ids))
            nodes += (frame_id, depth, node.total)
    payload: dict[str, object] = {
        "title": options.title,
        "subtitle": options.subtitle,
        "event": options.event,
        "unit": options.unit,
        "frames": [[name, kind, frame_color(name, kind)] for name, kind in frame_ids],
        "nodes": nodes,
    }
    if base is not None:
        payload["base"] = base_totals(base, tree)
        payload["baseTotal"] = base.total
    return payload


class HtmlRenderer:
    suffixes: tuple[str, ...] = (".html", ".htm")

    def render(self, tree: FlameNode, options: RenderOptions, out: BinaryIO) -> None:
        self._write(flame_payload(tree, options), out)

    def render_diff(
        self, base: FlameNode, tree: FlameNode, options: RenderOptions, out: BinaryIO
    ) -> None:
        self._write(flame_payload(tree, options, base), out)

    def _write(self, payload: dict[str, object], out: BinaryIO) -> None:
        data = json.dumps(payload, separators=(",", ":"))
        page = _page().replace(_PAYLOAD, data.translate(_SCRIPT_SAFE))
        out.write(page.encode("utf-8"))
