"""The one graph writer: a selection's graph in the format a file name's suffix names, for
`flamegraph`, `profile` and the benchmarks alike."""

from __future__ import annotations

from pathlib import Path

from fleetprof.query.filters import SampleFilter
from fleetprof.query.flame import load_flame, load_flat
from fleetprof.query.render import RenderOptions, renderer_for
from fleetprof.query.render.base import RowRenderer
from fleetprof.query.sandwich import sandwich
from fleetprof.query.source import ProfileSource


def write_graph(
    source: ProfileSource,
    selection: SampleFilter,
    output: str,
    options: RenderOptions,
    sandwich_of: str | None = None,
) -> int:
    """Write the selection's graph in the format output's suffix names; returns its total."""
    renderer = renderer_for(output)
    nothing = ValueError(f"nothing to draw: no {selection.describe()}")
    if isinstance(renderer, RowRenderer):
        if sandwich_of:
            raise ValueError(f"--sandwich draws a tree: {output} is a row format")
        with source.stream(renderer.rows_sql(selection)) as rows, open(output, "wb") as out:
            total = renderer.render_rows(rows, options, out)
        if total == 0:
            Path(output).unlink()
            raise nothing
        return total
    if renderer.min_fraction and not sandwich_of:
        # a drawn graph needs no frame it cannot draw (the sandwich merges them all)
        flat = load_flat(source, selection, renderer.min_fraction)
        if flat.total[0] == 0:
            raise nothing
        with open(output, "wb") as out:
            renderer.render(flat, options, out)
        return flat.total[0]
    tree = load_flame(source, selection)
    if tree.total == 0:
        raise nothing
    if sandwich_of:
        tree = sandwich(tree, sandwich_of)
        if tree.total == 0:
            raise ValueError(f"no frame named {sandwich_of!r} in the selection")
    with open(output, "wb") as out:
        renderer.render(tree, options, out)
    return tree.total
