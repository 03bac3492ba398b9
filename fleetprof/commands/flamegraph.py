"""Write a flame graph merged over all matching samples; the format follows -o's suffix."""

from __future__ import annotations

import argparse

from fleetprof.commands.options import add_source_arguments, open_profiles
from fleetprof.proto.schema import EVENT_UNITS
from fleetprof.query.filters import SampleFilter, parse_time

HELP = "write a flame graph (.html, .svg, .folded)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="FILE")
    parser.add_argument("--event", default="cpu", choices=sorted(EVENT_UNITS))
    parser.add_argument("--since", type=parse_time, help="ISO time or duration ago (15m, 2h)")
    parser.add_argument("--until", type=parse_time, help="ISO time or duration ago")
    parser.add_argument("--node", action="append", default=[], help="repeatable")
    parser.add_argument("--pid", type=int, action="append", default=[], help="repeatable")
    parser.add_argument("--comm", action="append", default=[], help="repeatable")
    parser.add_argument("--title", default=None)


def selection_from(args: argparse.Namespace) -> SampleFilter:
    return SampleFilter(
        event=args.event,
        since=args.since,
        until=args.until,
        nodes=tuple(args.node),
        pids=tuple(args.pid),
        comms=tuple(args.comm),
    )


def run(args: argparse.Namespace) -> int:
    from fleetprof.query.flame import load_flame
    from fleetprof.query.render import RenderOptions, renderer_for

    renderer = renderer_for(args.output)
    selection = selection_from(args)
    source = open_profiles(args)
    try:
        tree = load_flame(source, selection)
    finally:
        source.close()
    if tree.total == 0:
        raise ValueError(f"no {selection.event} samples match ({selection.where()})")
    options = RenderOptions(
        title=args.title or f"fleetprof {selection.event} flame graph",
        event=selection.event,
        unit=EVENT_UNITS[selection.event],
    )
    with open(args.output, "wb") as out:
        renderer.render(tree, options, out)
    print(f"wrote {args.output} ({tree.total} {options.unit})")
    return 0
