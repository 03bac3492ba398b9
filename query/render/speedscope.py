"""speedscope's JSON file format (https://www.speedscope.app/file-format-schema.json): one
"sampled" profile whose samples are the merged tree's paths, weighted by self weight.

A merged tree has no time order, so "sampled" (weights, no timestamps) is the type that
says exactly what we know; speedscope's time-order view then shows the paths in name
order, and its left-heavy and sandwich views are the usual ones.
"""

from __future__ import annotations

import json
from typing import BinaryIO

from fleetprof.query.flame_tree import FlameNode
from fleetprof.query.render.base import RenderOptions

SCHEMA = "https://www.speedscope.app/file-format-schema.json"


def speedscope_document(tree: FlameNode, options: RenderOptions) -> dict[str, object]:
    frame_ids: dict[str, int] = {}
    samples: list[list[int]] = []
    weights: list[int] = []
    path: list[int] = []
    for depth, _, node in tree.walk():
        if depth == 0:
            continue  # the synthetic root "all"
        del path[depth - 1 :]
        path.append(frame_ids.setdefault(node.name, len(frame_ids)))
        if node.self_weight > 0:
            samples.append(list(path))
            weights.append(node.self_weight)
    return {
        "$schema": SCHEMA,
        "name": options.title,
        "exporter": "fleetprof",
        "activeProfileIndex": 0,
        "shared": {"frames": [{"name": name} for name in frame_ids]},
        "profiles": [
            {
                "type": "sampled",
                "name": f"{options.event} ({options.subtitle})"
                if options.subtitle
                else options.event,
                "unit": "nanoseconds" if options.unit == "ns" else "none",
                "startValue": 0,
                "endValue": sum(weights),
                "samples": samples,
                "weights": weights,
            }
        ],
    }


class SpeedscopeRenderer:
    suffixes: tuple[str, ...] = (".speedscope.json", ".json")
    min_fraction: float = 0.0  # exact: every path, however light

    def render(self, tree: FlameNode, options: RenderOptions, out: BinaryIO) -> None:
        document = speedscope_document(tree, options)
        # ASCII: json escapes everything else, lone surrogates of undecodable names included
        out.write(json.dumps(document, separators=(",", ":")).encode("ascii"))
