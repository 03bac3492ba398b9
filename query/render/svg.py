"""A static flame graph in SVG, laid out like flamegraph.pl (root at the bottom, or at the
top as an icicle graph); differential graphs are coloured as flamegraph.js colours them."""

from __future__ import annotations

import html
import re
from typing import BinaryIO

from fleetprof.query.diff import base_totals
from fleetprof.query.flame_tree import FlameNode, FlatTree, gc_paused
from fleetprof.query.render.base import (
    MIN_FRACTION,
    RenderOptions,
    diff_color,
    format_weight,
    frame_color,
)

WIDTH = 1200
PAD_X = 10
ROW_HEIGHT = 16
FONT_SIZE = 12
FONT_WIDTH = 0.59  # average Verdana glyph width per unit of font size (flamegraph.pl)
MIN_WIDTH_PX = 0.1
PAD_BOTTOM = FONT_SIZE * 2 + 10
# A graph taller than this (a laptop's first screen, less the browser's bars) is drawn as
# an icicle unless asked otherwise: its root would else open out of sight.
FIRST_SCREEN_PX = 760

# Code points XML 1.0 forbids even as character references; frame names come from the
# profiled programs, so one stray control byte would otherwise make the file unparseable.
_XML_INVALID = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml(text: str) -> str:
    return html.escape(_XML_INVALID.sub("\ufffd", text))


def _label(name: str, width: float) -> str:
    """The name cut to what fits in `width` px, ending in ".." when cut; "" below 3 chars."""
    chars = int((width - 6) / (FONT_SIZE * FONT_WIDTH))
    if chars < 3:
        return ""
    return name if len(name) <= chars else name[: chars - 2] + ".."


class SvgRenderer:
    suffixes: tuple[str, ...] = (".svg",)
    min_fraction: float = MIN_FRACTION  # below MIN_WIDTH_PX of the plot

    def render(self, tree: FlameNode | FlatTree, options: RenderOptions, out: BinaryIO) -> None:
        with gc_paused():  # tens of thousands of strings, no cycles
            self._render(tree, None, options, out)

    def render_diff(
        self, base: FlameNode, tree: FlameNode, options: RenderOptions, out: BinaryIO
    ) -> None:
        with gc_paused():
            self._render(tree, base, options, out)

    def _render(
        self,
        tree: FlameNode | FlatTree,
        base: FlameNode | None,
        options: RenderOptions,
        out: BinaryIO,
    ) -> None:
        flat = tree if isinstance(tree, FlatTree) else FlatTree.of(tree)
        plot_width = WIDTH - 2 * PAD_X
        total = flat.total[0]
        scale = plot_width / total if total else 0.0
        min_total = MIN_WIDTH_PX / scale if total else 0.0
        # frames under MIN_WIDTH_PX are invisible; their children are narrower still
        shown = [i for i, weight in enumerate(flat.total) if weight > 0 and weight >= min_total]
        offsets = flat.offsets()
        changes = [0.0] * len(shown)
        if base is not None and total and isinstance(tree, FlameNode):
            befores = base_totals(base, tree)  # aligned with FlatTree.of(tree)
            changes = [
                flat.total[i] / total - (befores[i] / base.total if base.total else 0.0)
                for i in shown
            ]
        largest = max(map(abs, changes), default=0.0)
        rows = 1 + max((flat.depth[i] for i in shown), default=0)
        top = FONT_SIZE * (5 if options.subtitle else 3)
        height = top + rows * ROW_HEIGHT + PAD_BOTTOM
        icicle = options.icicle if options.icicle is not None else height > FIRST_SCREEN_PX

        parts = [
            '<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n'
            f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{WIDTH}" '
            f'height="{height}" viewBox="0 0 {WIDTH} {height}" '
            f'font-family="Verdana, sans-serif" font-size="{FONT_SIZE}">\n'
            '<defs><linearGradient id="background" x1="0" y1="0" x2="0" y2="1">'
            '<stop stop-color="#eeeeee" offset="5%"/><stop stop-color="#eeeeb0" offset="95%"/>'
            "</linearGradient></defs>\n"
            "<style>g.frame:hover rect { stroke: #000; stroke-width: 0.5; }</style>\n"
            '<rect width="100%" height="100%" fill="url(#background)"/>\n'
            f'<text x="{WIDTH / 2}" y="{FONT_SIZE * 2}" font-size="17" '
            f'text-anchor="middle">{_xml(options.title)}</text>\n'
        ]
        if options.subtitle:
            parts.append(
                f'<text x="{WIDTH / 2}" y="{FONT_SIZE * 4}" text-anchor="middle" '
                f'fill="#555">{_xml(options.subtitle)}</text>\n'
            )
        parts.append(
            f'<text x="{PAD_X}" y="{height - FONT_SIZE}">'
            f"Event: {_xml(options.event)}   Total: {format_weight(total, options.unit)}"
            f"{'   (icicle: root at the top)' if icicle else ''}</text>\n"
        )
        bottom = height - PAD_BOTTOM
        # once per distinct frame, not per node (weights and percents need no escaping)
        escaped = [_xml(name) for name, _ in flat.frames]
        for i, change in zip(shown, changes, strict=True):
            depth, node_total = flat.depth[i], flat.total[i]
            name, kind = flat.frames[flat.frame[i]]
            x = PAD_X + offsets[i] * scale
            width = node_total * scale
            y = top + depth * ROW_HEIGHT if icicle else bottom - (depth + 1) * ROW_HEIGHT
            weight = format_weight(node_total, options.unit)
            percent = 100 * node_total / total
            title = f"{escaped[flat.frame[i]]} ({weight}, {percent:.2f}%"
            if base is None:
                title += ")"
                fill = frame_color(name, kind)
            else:
                title += f", {100 * change:+.2f} points)"
                fill = diff_color(change, largest)
            parts.append(
                f'<g class="frame"><title>{title}</title>'
                f'<rect x="{x:.2f}" y="{y}" width="{width:.2f}" height="{ROW_HEIGHT - 1}" '
                f'fill="{fill}" rx="2" ry="2"/>'
            )
            label = _label(name, width)
            if label:
                parts.append(f'<text x="{x + 3:.2f}" y="{y + 11.5}">{_xml(label)}</text>')
            parts.append("</g>\n")
        parts.append("</svg>\n")
        out.write("".join(parts).encode("utf-8"))
