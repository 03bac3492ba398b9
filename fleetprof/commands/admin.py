"""Administer a running aggregator: delete stored rows of a node or agent (audited)."""

from __future__ import annotations

import argparse

from fleetprof.commands.options import (
    DEFAULT_AGGREGATOR,
    add_client_security_arguments,
    aggregator_address,
    client_security,
)

HELP = "delete stored rows of a node or agent on a running aggregator (audited)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    delete = actions.add_parser(
        "delete",
        help="delete the rows (samples, processes, io_latency) not sealed yet",
        description="Delete the unsealed rows of a node and/or agent in a time range; the "
        "aggregator logs who asked. Sealed hours are kept until retention drops them.",
    )
    delete.add_argument(
        "--aggregator", type=aggregator_address, default=DEFAULT_AGGREGATOR, metavar="HOST:PORT"
    )
    delete.add_argument("--node", help="rows of this node")
    delete.add_argument("--agent-id", help="rows of this agent")
    delete.add_argument("--since", help="start: ISO time or 15m, 2h ago")
    delete.add_argument("--until", help="end: ISO time or duration ago")
    add_client_security_arguments(delete, token=True)


def run(args: argparse.Namespace) -> int:
    import grpc

    from fleetprof.proto.ingest.v1 import ingest_pb2, ingest_pb2_grpc
    from fleetprof.query.selection import parse_selection
    from fleetprof.query.source import rpc_error

    if not (args.node or args.agent_id):
        raise ValueError("name a --node, an --agent-id or both")
    # the time range in the words of every other command (query/selection.py)
    times = {key: [text] for key in ("since", "until") if (text := getattr(args, key))}
    selection = parse_selection(times)
    since, until = selection.since, selection.until
    security = client_security(args)
    request = ingest_pb2.DeleteRequest(
        node=args.node or "",
        agent_id=args.agent_id or "",
        since_unix_ms=int(since.timestamp() * 1000) if since else 0,
        until_unix_ms=int(until.timestamp() * 1000) if until else 0,
    )
    with security.channel(args.aggregator) as channel:
        try:
            reply = ingest_pb2_grpc.AdminServiceStub(channel).Delete(
                request, timeout=60, metadata=security.metadata()
            )
        except grpc.RpcError as exc:
            raise rpc_error(exc, args.aggregator) from None
    print(
        f"deleted {reply.samples} sample rows, {reply.processes} process rows, "
        f"{reply.io_latency} io_latency rows; {reply.sealed_files_kept} sealed files of the "
        "range kept (they go with retention)"
    )
    return 0
