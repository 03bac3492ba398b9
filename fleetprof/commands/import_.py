"""Load a profile written by another tool as samples, to query and compare it like any other.

Folded stacks (`.folded`, `.collapsed`, `.txt`: flamegraph.pl's input, `frame;...;leaf N`)
and pprof (anything else: profile.proto, gzipped or not). The rows go through the normal
ingest path: to an aggregator over gRPC, or straight into a database file (no aggregator
may have it open) with the same validation and store code. Importing the same file again
adds nothing.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from fleetprof.commands.options import (
    DEFAULT_AGGREGATOR,
    add_aggregator_or_db,
    add_client_security_arguments,
    client_security,
)
from fleetprof.proto.schema import EVENT_UNITS

HELP = "import a folded-stacks or pprof file as samples"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path)
    add_aggregator_or_db(parser)
    add_client_security_arguments(parser, token=False)
    parser.add_argument(
        "--node", default=socket.gethostname(), help="the node the samples are filed under"
    )
    parser.add_argument(
        "--event",
        default="cpu",
        choices=sorted(EVENT_UNITS),
        help="what the weights count (pprof: the sample type in this event's unit is read)",
    )


def run(args: argparse.Namespace) -> int:
    from fleetprof.query.importers import batches, read_profile, send

    profile = read_profile(args.file, EVENT_UNITS[args.event])
    if not profile.rows:
        raise ValueError(f"{args.file} holds no samples")
    to_send = batches(profile, args.file, args.node, args.event)
    if args.db:
        from fleetprof.aggregator.ingest_service import store_batch
        from fleetprof.aggregator.storage import ProfileStore

        store = ProfileStore(args.db)
        try:
            acks = [store_batch(store, batch) for batch in to_send]
        finally:
            store.close()
    else:
        acks = send(args.aggregator or DEFAULT_AGGREGATOR, client_security(args), to_send)
    stored = sum(ack.rows_stored for ack in acks)
    if stored == 0 and all(ack.duplicate for ack in acks):
        print(f"{args.file} was imported before: nothing added")
    else:
        weight = sum(weight for *_, weight in profile.rows)
        print(f"imported {args.file}: {stored} sample rows, {weight} {EVENT_UNITS[args.event]}")
    return 0
