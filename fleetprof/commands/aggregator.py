"""Run the aggregator: gRPC ingest from agents and read-only SQL, stored in DuckDB."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

from fleetprof.commands.options import (
    DEFAULT_AGGREGATOR,
    add_server_security_arguments,
    check_can_listen,
    listen_address,
    server_security,
    stop_on_signals,
)

HELP = "run the aggregator (gRPC ingest + query service)"

N = TypeVar("N", int, float)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default="fleetprof.duckdb", metavar="PATH", help="DuckDB file")
    parser.add_argument(
        "--listen",
        type=listen_address,
        default=DEFAULT_AGGREGATOR,
        metavar="HOST:PORT",
        help="gRPC address for agents and queries (port 0: any free port)",
    )
    parser.add_argument(
        "--http",
        type=listen_address,
        metavar="HOST:PORT",
        help="serve the web UI and its JSON API here (e.g. 127.0.0.1:7471); off if not given",
    )
    parser.add_argument(
        "--otlp-listen",
        type=listen_address,
        metavar="HOST:PORT",
        help="also receive OTLP profiles (gRPC ProfilesService) here, e.g. 127.0.0.1:4317 "
        "(docs/otlp.md); off if not given",
    )
    parser.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="DuckDB's memory limit, shared by ingest and all queries (e.g. 4GB; "
        "default 80%% of RAM)",
    )
    parser.add_argument(
        "--max-spill",
        type=_size,
        metavar="SIZE",
        help="what queries may spill to disk past the memory limit, all together (e.g. "
        "20GB; default a quarter of the free space beside --db)",
    )
    storage = parser.add_argument_group("storage (docs/storage.md)")
    storage.add_argument(
        "--lake",
        metavar="DIR",
        help="where closed hours are sealed as Parquet (default: the --db path + .lake)",
    )
    storage.add_argument(
        "--name", help="this aggregator's name in lake file names (default: the host name)"
    )
    storage.add_argument(
        "--seal-after",
        type=_duration,
        default=timedelta(minutes=2),
        metavar="DURATION",
        help="seal an hour this long after it ends, for late batches (default 2m)",
    )
    storage.add_argument(
        "--retention",
        type=_duration,
        metavar="DURATION",
        help="drop hour partitions older than this (e.g. 14d; default: keep)",
    )
    storage.add_argument(
        "--max-disk",
        type=_size,
        metavar="SIZE",
        help="evict the oldest hours until the DuckDB file and the lake fit (e.g. 10GB)",
    )
    storage.add_argument(
        "--downsample-after",
        type=_duration,
        metavar="DURATION",
        help="merge sealed rows older than this to one per minute (e.g. 1d; default: never)",
    )
    add_server_security_arguments(parser)
    limits = parser.add_argument_group("limits (docs/security.md)")
    limits.add_argument(
        "--max-query-seconds",
        type=_above_zero(float, "a number of seconds"),
        default=60.0,
        metavar="S",
        help="longest a query may run; clients may only ask for less",
    )
    limits.add_argument(
        "--max-streams",
        type=_above_zero(int, "a whole number"),
        default=2048,
        metavar="N",
        help="open gRPC streams at most (two per agent); more are refused",
    )
    limits.add_argument(
        "--max-streams-per-peer",
        type=_above_zero(int, "a whole number"),
        default=64,
        metavar="N",
        help="open gRPC streams at most from one client address",
    )


def _above_zero(kind: Callable[[str], N], what: str) -> Callable[[str], N]:
    """An argparse type for limits: 0, negative, NaN or infinite would refuse every stream
    or stop every query at once instead of limiting them."""

    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what} above 0")
        return value

    return parse


def _duration(text: str) -> timedelta:
    from fleetprof.query.filters import parse_duration

    try:
        return timedelta(seconds=parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    from fleetprof.aggregator.partitions import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    # Imported here so that other commands (the agent above all) do not load DuckDB.
    from fleetprof.aggregator.partitions import LakePolicy
    from fleetprof.aggregator.server import Aggregator

    check_can_listen(args.listen, "--listen")
    if args.http:
        check_can_listen(args.http, "--http")
    if args.otlp_listen:
        check_can_listen(args.otlp_listen, "--otlp-listen")
    aggregator = Aggregator(
        args.db,
        args.listen,
        security=server_security(args),
        http_listen=args.http,
        otlp_listen=args.otlp_listen,
        memory_limit=args.memory_limit,
        lake_dir=args.lake,
        name=args.name,
        lake_policy=LakePolicy(
            seal_after=args.seal_after,
            retention=args.retention,
            max_disk_bytes=args.max_disk,
            downsample_after=args.downsample_after,
        ),
        max_streams=args.max_streams,
        max_streams_per_peer=args.max_streams_per_peer,
        max_query_s=args.max_query_seconds,
        max_spill_bytes=args.max_spill,
    )
    stop = stop_on_signals()
    aggregator.start()
    print(f"fleetprof aggregator listening on {aggregator.address}, database {args.db}", flush=True)
    if aggregator.web:
        print(f"fleetprof web UI on {aggregator.web.url}", flush=True)
    if aggregator.otlp:
        print(f"fleetprof OTLP profiles on {aggregator.otlp.address}", flush=True)
    # Woken every second: a signal that lands on another thread (gRPC's, DuckDB's) runs its
    # handler only when the main thread next runs Python, and a bare wait() may never end
    # (seen: SIGTERM ignored under a flood of connections until a second one).
    while not stop.wait(1.0):
        pass
    aggregator.stop()
    return 0
