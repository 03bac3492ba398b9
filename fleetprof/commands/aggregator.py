"""Run the aggregator: gRPC ingest from agents and read-only SQL, stored in DuckDB."""

from __future__ import annotations

import argparse

from fleetprof.commands.options import (
    DEFAULT_AGGREGATOR,
    add_server_security_arguments,
    server_security,
    stop_on_signals,
)

HELP = "run the aggregator (gRPC ingest + query service)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default="fleetprof.duckdb", metavar="PATH", help="DuckDB file")
    parser.add_argument("--listen", default=DEFAULT_AGGREGATOR, metavar="HOST:PORT")
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve the web UI and its JSON API here (e.g. 127.0.0.1:7471); off if not given",
    )
    parser.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="DuckDB's memory limit, shared by ingest and all queries (e.g. 4GB; "
        "default 80%% of RAM)",
    )
    add_server_security_arguments(parser)


def run(args: argparse.Namespace) -> int:
    # Imported here so that other commands (the agent above all) do not load DuckDB.
    from fleetprof.aggregator.server import Aggregator

    aggregator = Aggregator(
        args.db,
        args.listen,
        security=server_security(args),
        http_listen=args.http,
        memory_limit=args.memory_limit,
    )
    stop = stop_on_signals()
    aggregator.start()
    print(f"fleetprof aggregator listening on {aggregator.address}, database {args.db}", flush=True)
    if aggregator.web:
        print(f"fleetprof web UI on {aggregator.web.url}", flush=True)
    stop.wait()
    aggregator.stop()
    return 0
