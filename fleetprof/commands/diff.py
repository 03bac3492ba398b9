"""Compare two selections: a differential flame graph and the functions that changed most.

The comparison is chosen with --since/--until/--node/--pid/--comm, the base with the same
options prefixed by --base-; a base option left out takes the comparison's value. So
`--base-since 2h --base-until 1h --since 1h` compares the last hour with the one before,
and `--base-node a --node b` node b with node a over the same time. Weights are compared as
shares of each selection's total, so selections of different lengths compare fairly. The
graph has the comparison's shape, each frame red if its share grew, blue if it shrank.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from fleetprof.commands.flamegraph import (
    add_drawing_arguments,
    add_selection_arguments,
    selection_from,
)
from fleetprof.commands.options import add_source_arguments, open_profiles, output_file
from fleetprof.proto.schema import EVENT_UNITS

HELP = "differential flame graph (.html, .svg, .folded) and table (.txt) of two selections"
BASE = "base-"
TABLE_SUFFIX = ".txt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument(
        "-o",
        "--output",
        type=output_file,
        metavar="FILE",
        help=f"a graph (.html, .svg, .folded) or the table ({TABLE_SUFFIX}); "
        "without it, or for a graph, the table is printed",
    )
    parser.add_argument(
        "--event", default="cpu", choices=sorted(EVENT_UNITS), help="what the weights count"
    )
    add_selection_arguments(parser)
    add_selection_arguments(parser, BASE)
    add_drawing_arguments(parser)
    parser.add_argument("--top", type=int, default=20, help="rows of the printed table")


def run(args: argparse.Namespace) -> int:
    from fleetprof.query.changes import (
        FEW_SAMPLES,
        function_changes,
        share_margin,
        write_changes,
    )
    from fleetprof.query.flame import load_flame
    from fleetprof.query.render import RenderOptions, renderer_for
    from fleetprof.query.render.base import DiffRenderer

    selection = selection_from(args)
    overrides = {
        field: value
        for field, value in vars(selection_from(args, BASE)).items()
        if field != "event" and value not in (None, ())
    }
    if not overrides:
        raise ValueError("say what the base is: --base-since/--base-until/--base-node/...")
    base_selection = replace(selection, **overrides)
    writes_graph = bool(args.output) and not args.output.lower().endswith(TABLE_SUFFIX)
    renderer = renderer_for(args.output) if writes_graph else None
    if renderer is not None and not isinstance(renderer, DiffRenderer):
        raise ValueError(f"{args.output}: a differential graph is .html, .svg or .folded")

    source = open_profiles(args)
    try:
        base, tree = load_flame(source, base_selection), load_flame(source, selection)
    finally:
        source.close()
    for name, found, chosen in (("base", base, base_selection), ("comparison", tree, selection)):
        if found.total == 0:
            raise ValueError(f"the {name} has no {chosen.describe()}")
        if EVENT_UNITS[chosen.event] == "samples" and found.total < FEW_SAMPLES:
            print(
                f"warning: the {name} has only {found.total} samples, so each share in it "
                f"is known to +-{share_margin(found.total):.0f} percentage points (95%); "
                f"changes smaller than that are noise: select more ({FEW_SAMPLES}+ samples)",
                file=sys.stderr,
            )
    changes = function_changes(base, tree)
    if renderer is not None:
        options = RenderOptions(
            title=args.title or f"fleetprof {selection.event} differential flame graph",
            event=selection.event,
            unit=EVENT_UNITS[selection.event],
            subtitle=f"base: {base_selection.describe()}  |  comparison: {selection.describe()}",
            icicle=args.icicle,
        )
        with open(args.output, "wb") as out:
            renderer.render_diff(base, tree, options, out)
        print(f"wrote {args.output} (base {base.total}, comparison {tree.total} {options.unit})")
    if args.output and not writes_graph:
        with open(args.output, "wb") as out:
            write_changes(changes, out)
        print(f"wrote {args.output} ({changes.num_rows} functions)")
    else:
        print("Functions by change of their share of the total (percentage points):")
        sys.stdout.flush()
        write_changes(changes, sys.stdout.buffer, args.top)
        sys.stdout.buffer.flush()
    return 0
