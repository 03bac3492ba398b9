"""One self-contained interactive flame graph: templates/flamegraph.html plus a JSON payload."""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import BinaryIO

from fleetprof.query.flame_tree import FlameNode
from fleetprof.query.render.base import RenderOptions, frame_color

_MARKER = "__FLEETPROF_PAYLOAD__"

# With ensure_ascii the JSON already escapes U+2028/2029 and lone surrogates; these three
# are what lets a frame name end the <script> element ("</script>") or open a comment.
_SCRIPT_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


@cache
def _template() -> str:
    return (files("fleetprof.query.render") / "templates" / "flamegraph.html").read_text("utf-8")


def _payload(tree: FlameNode, options: RenderOptions) -> dict[str, object]:
    """The tree for the page's script, flat so that deep stacks cannot hit recursion limits
    (in json or in the browser): `frames` lists each distinct `[name, kind, colour]` once,
    and `nodes` holds `frame index, depth, total` per node in pre-order, children in name
    order; the page rebuilds offsets and self weights from that."""
    frame_ids: dict[tuple[str, str], int] = {}
    nodes: list[int] = []
    for depth, _, node in tree.walk():
        key = (node.name, node.kind)
        frame_id = frame_ids.setdefault(key, len(frame_ids))
        nodes += (frame_id, depth, node.total)
    return {
        "title": options.title,
        "subtitle": options.subtitle,
        "event": options.event,
        "unit": options.unit,
        "frames": [[name, kind, frame_color(name, kind)] for name, kind in frame_ids],
        "nodes": nodes,
    }


class HtmlRenderer:
    suffixes: tuple[str, ...] = (".html", ".htm")

    def render(self, tree: FlameNode, options: RenderOptions, out: BinaryIO) -> None:
        data = json.dumps(_payload(tree, options), separators=(",", ":"))
        page = _template().replace(_MARKER, data.translate(_SCRIPT_SAFE))
        out.write(page.encode("utf-8"))
