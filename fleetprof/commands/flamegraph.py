"""Write a flame graph merged over all matching samples; the format follows -o's suffix.

Tree formats: .html (interactive), .svg, .folded, .json (speedscope). Row formats: .pb.gz
(pprof, one sample per process and stack, labelled), .otlp.pb (an OTLP profiles export
request, docs/otlp.md), .parquet and .arrow (every sample row joined with its stack).
"""

from __future__ import annotations

import argparse

from fleetprof.commands.options import add_output_argument, add_source_arguments, open_profiles
from fleetprof.proto.schema import EVENT_UNITS
from fleetprof.query.filters import SampleFilter
from fleetprof.query.selection import SELECTION_KEYS, parse_selection

HELP = "write a flame graph (.html, .svg, .folded, .json, .pb.gz, .otlp.pb, .parquet, .arrow)"


def add_selection_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """--since/--until/--node/--pid/--comm/--job/--session, or --base-since... with prefix
    "base-"; their texts are parsed by query/selection.py, as the web API's are."""
    which = f"the {prefix.rstrip('-')} selection's " if prefix else ""
    group = parser.add_argument_group(f"{prefix.rstrip('-') or 'sample'} selection")
    group.add_argument(f"--{prefix}since", help=f"{which}start: ISO time or 15m, 2h ago")
    group.add_argument(f"--{prefix}until", help=f"{which}end: ISO time or duration ago")
    for name, what in (
        ("node", "a node's samples"),
        ("pid", "a process id's"),
        ("comm", "a process name's"),
        ("job", "a job's, as the agents' resolvers name it"),
    ):
        group.add_argument(
            f"--{prefix}{name}", action="append", default=[], help=f"{what} (repeatable: any)"
        )
    group.add_argument(
        f"--{prefix}session",
        action="append",
        default=[],
        help="an on-demand session's (its id, as `profile` prints it)",
    )


def add_drawing_arguments(parser: argparse.ArgumentParser) -> None:
    """--title and the SVG's orientation (--icicle/--flame)."""
    parser.add_argument("--title", help="the graph's title (default: names the event)")
    orientation = parser.add_mutually_exclusive_group()
    orientation.add_argument(
        "--icicle",
        action="store_true",
        default=None,
        help="SVG: root at the top (default: when the graph is deeper than a screen)",
    )
    orientation.add_argument(
        "--flame",
        dest="icicle",
        action="store_false",
        default=None,
        help="SVG: root at the bottom, always",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    add_output_argument(parser, "the file to write; its suffix gives the format", required=True)
    parser.add_argument(
        "--event", default="cpu", choices=sorted(EVENT_UNITS), help="what the weights count"
    )
    add_selection_arguments(parser)
    add_drawing_arguments(parser)
    parser.add_argument(
        "--sandwich",
        metavar="FUNCTION",
        help="one function's callers (inverted) and callees instead of the whole graph",
    )
    parser.add_argument(
        "--frequency",
        type=float,
        metavar="HZ",
        help="the agents' sampling frequency: pprof then also gives CPU nanoseconds",
    )


def selection_from(args: argparse.Namespace, prefix: str = "") -> SampleFilter:
    texts: dict[str, list[str]] = {}
    for key in SELECTION_KEYS:
        value = getattr(args, f"{prefix.replace('-', '_')}{key}")
        texts[prefix + key] = value if isinstance(value, list) else [value] if value else []
    return parse_selection(texts, args.event, prefix)


def run(args: argparse.Namespace) -> int:
    from fleetprof.query.graph import write_graph
    from fleetprof.query.render import RenderOptions
    from fleetprof.query.render.base import format_weight

    selection = selection_from(args)
    options = RenderOptions(
        title=args.title
        or f"fleetprof {selection.event} "
        + (f"sandwich of {args.sandwich}" if args.sandwich else "flame graph"),
        event=selection.event,
        unit=EVENT_UNITS[selection.event],
        subtitle="left: its callers, inverted; right: its callees" if args.sandwich else "",
        frequency_hz=args.frequency,
        icicle=args.icicle,
    )
    source = open_profiles(args)
    try:
        total = write_graph(source, selection, args.output, options, args.sandwich)
    finally:
        source.close()
    print(f"wrote {args.output} ({format_weight(total, options.unit)})")
    return 0
