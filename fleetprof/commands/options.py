"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse
import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleetprof.query.source import ProfileSource

DEFAULT_AGGREGATOR = "127.0.0.1:7470"


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--aggregator",
        metavar="HOST:PORT",
        help=f"a running aggregator (default {DEFAULT_AGGREGATOR})",
    )
    source.add_argument("--db", metavar="PATH", help="a profile database file (no aggregator)")


def open_profiles(args: argparse.Namespace) -> ProfileSource:
    from fleetprof.query.source import open_source  # loads DuckDB: only when used

    if args.db:
        return open_source(None, args.db)
    return open_source(args.aggregator or DEFAULT_AGGREGATOR, None)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, for a clean shutdown."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop
