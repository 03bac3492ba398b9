"""Run read-only SQL over profiles (views: samples, stacks; see docs/sql.md)."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack

from fleetprof.commands.options import add_source_arguments, open_profiles, output_file
from fleetprof.query.result_formats import BINARY_FORMATS, WRITERS

HELP = "run SQL over stored profiles"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sql", help="one SELECT statement")
    add_source_arguments(parser)
    parser.add_argument(
        "--format",
        choices=sorted(WRITERS),
        default="table",
        help="table: aligned text for a terminal; csv, json (one object per line), or, "
        "with -o, parquet or arrow",
    )
    parser.add_argument(
        "-o", "--output", type=output_file, metavar="FILE", help="write here instead of stdout"
    )


def run(args: argparse.Namespace) -> int:
    if args.format in BINARY_FORMATS and not args.output:
        raise ValueError(f"--format {args.format} needs -o FILE")
    source = open_profiles(args)
    with ExitStack() as stack:
        stack.callback(source.close)
        out = stack.enter_context(open(args.output, "wb")) if args.output else sys.stdout.buffer
        reader = stack.enter_context(source.stream(args.sql))
        WRITERS[args.format](reader, out)
        out.flush()
    return 0
