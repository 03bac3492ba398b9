"""What every flame-graph renderer shares: options, the protocol, weights and colours."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Literal, Protocol, get_args, runtime_checkable

import pyarrow as pa

from fleetprof.query.filters import SampleFilter
from fleetprof.query.flame_tree import FlameNode, FlatTree

Unit = Literal["samples", "ns"]

# The drawn graphs (HTML, SVG) leave out frames narrower than this share of the whole:
# 0.1 px of flamegraph.pl's 1,200 px (its --minwidth default), which nothing draws. The
# frames kept have exact totals; the text formats (folded, speedscope) stay exact.
MIN_FRACTION = 0.1 / 1200


@dataclass(frozen=True)
class RenderOptions:
    """`unit` is "samples" for sampled events (cpu) and "ns" for time-weighted ones
    (lock, wait, offcpu, io, block), whose weights are shown as ns/µs/ms/s."""

    title: str
    event: str
    unit: Unit
    subtitle: str = ""
    # Samples per second per CPU of a sampled event, when known: pprof then also gives
    # the CPU time each sample stands for.
    frequency_hz: float | None = None
    # Top-down (root at the top) instead of a flame graph's bottom-up, for the SVG (the
    # HTML page has its own toggle); None: an icicle only when the root of a flame graph
    # would sit below the first screen.
    icicle: bool | None = None

    def __post_init__(self) -> None:
        if self.unit not in get_args(Unit):
            raise ValueError(f"unit must be one of {get_args(Unit)}, not {self.unit!r}")


class Renderer(Protocol):
    """A format of the merged call tree. `min_fraction` > 0: the format draws no node
    narrower than that share of the whole, so it may be given a tree pruned there
    (`FlatTree`, query/flame.py load_flat); 0: it needs the exact tree."""

    suffixes: tuple[str, ...]
    min_fraction: float

    def render(self, tree: FlameNode | FlatTree, options: RenderOptions, out: BinaryIO) -> None: ...


@runtime_checkable
class DiffRenderer(Renderer, Protocol):
    """A tree format that can also show a comparison against a base (query/diff.py)."""

    def render_diff(
        self, base: FlameNode, tree: FlameNode, options: RenderOptions, out: BinaryIO
    ) -> None: ...


@runtime_checkable
class RowRenderer(Protocol):
    """A format of the selected rows themselves rather than of the merged tree (pprof keeps
    per-process labels and modules; Parquet and Arrow keep every sample row)."""

    suffixes: tuple[str, ...]

    def rows_sql(self, selection: SampleFilter) -> str:
        """The query whose result `render_rows` reads."""
        ...

    def render_rows(self, rows: pa.RecordBatchReader, options: RenderOptions, out: BinaryIO) -> int:
        """Write the rows; returns the total weight written."""
        ...


def renderer_for(path: str | Path) -> Renderer | RowRenderer:
    """Pick the renderer whose suffix ends the file name (case-insensitive)."""
    # imported here because every renderer module imports this one
    from fleetprof.query.render.folded import FoldedRenderer
    from fleetprof.query.render.html import HtmlRenderer
    from fleetprof.query.render.otlp import OtlpRenderer
    from fleetprof.query.render.pprof import PprofRenderer
    from fleetprof.query.render.raw import ARROW, PARQUET
    from fleetprof.query.render.speedscope import SpeedscopeRenderer
    from fleetprof.query.render.svg import SvgRenderer

    renderers: tuple[Renderer | RowRenderer, ...] = (
        FoldedRenderer(),
        SvgRenderer(),
        HtmlRenderer(),
        PprofRenderer(),
        OtlpRenderer(),
        SpeedscopeRenderer(),
        PARQUET,
        ARROW,
    )
    name = Path(path).name
    for renderer in renderers:
        if name.lower().endswith(renderer.suffixes):
            return renderer
    supported = ", ".join(sorted(s for r in renderers for s in r.suffixes))
    raise ValueError(f"cannot tell the flame-graph format of {name!r}; use one of: {supported}")


Frame = tuple[str, str, str]  # (name, module, kind)


def inlined_locations(
    frames: list[str], modules: list[str], kinds: list[str]
) -> list[tuple[Frame, ...]]:
    """A root-first stack as pprof and OTLP locations, leaf first: each location's frames
    innermost first, a frame of kind "inlined" joined to the frame below it (the code it
    was compiled into), whose module and kind are the location's."""
    locations: list[tuple[Frame, ...]] = []
    inlined: list[Frame] = []
    for frame in zip(reversed(frames), reversed(modules), reversed(kinds), strict=True):
        inlined.append(frame)
        if frame[2] != "inlined":
            locations.append(tuple(inlined))
            inlined = []
    locations.extend((frame,) for frame in inlined)  # none if well formed
    return locations


def format_weight(value: float, unit: Unit) -> str:
    """`1,234 samples`, or a duration in the largest unit that keeps it >= 1 once rounded
    (999,999 ns is "1.00 ms", not "1,000.00 µs")."""
    if unit == "samples":
        return f"{value:,.0f} sample" + ("" if value == 1 else "s")
    for scale, suffix in ((1e9, "s"), (1e6, "ms"), (1e3, "µs")):
        if round(value / scale, 2) >= 1:
            return f"{value / scale:,.2f} {suffix}"
    return f"{value:,.0f} ns"


# flamegraph.pl --color=java palettes: per RGB channel (base, spread, which of the three
# name-hash shades scales the spread); native frames are yellow for C++ (a "::" in the
# name) and red for C.
_PALETTES = {
    "green": ((50, 60, 0), (200, 55, 0), (50, 60, 0)),
    "yellow": ((175, 55, 0), (175, 55, 0), (50, 20, 0)),
    "red": ((205, 50, 2), (0, 230, 0), (0, 55, 1)),
    "orange": ((190, 65, 0), (90, 65, 0), (0, 0, 0)),
    "grey": ((160, 40, 0), (160, 40, 0), (160, 40, 0)),
    "aqua": ((50, 60, 0), (165, 55, 0), (165, 55, 0)),
}
# Inlined Java frames are aqua, as async-profiler draws them; Python frames too.
_KIND_PALETTE = {
    "jit": "green",
    "inlined": "aqua",
    "interpreted": "green",
    "python": "aqua",
    "kernel": "orange",
}


@lru_cache(maxsize=1 << 16)  # the same few thousand frames in every graph
def frame_color(name: str, kind: str) -> str:
    """A `#rrggbb` colour from the kind's palette, varied by a stable hash of the name so
    a function keeps its colour across graphs and runs."""
    if kind == "native":
        palette = "yellow" if "::" in name else "red"
    else:
        palette = _KIND_PALETTE.get(kind, "grey")  # lost, unknown and anything unexpected
    digest = zlib.crc32(name.encode("utf-8", "replace"))
    shades = (digest & 0xFF, (digest >> 8) & 0xFF, (digest >> 16) & 0xFF)
    r, g, b = (base + spread * shades[i] // 255 for base, spread, i in _PALETTES[palette])
    return f"#{r:02x}{g:02x}{b:02x}"


def diff_color(change: float, largest: float) -> str:
    """Gregg's differential colours, as flamegraph.js draws them: red for a frame whose
    share of the whole grew, blue for one that shrank, paler the smaller `change` is
    against the `largest` change of the graph (white: unchanged)."""
    strength = abs(change) / largest if largest > 0 else 0.0
    fade = int(255 - 190 * strength + 0.5)
    return f"#ff{fade:02x}{fade:02x}" if change >= 0 else f"#{fade:02x}{fade:02x}ff"
