"""Profile one job on every node it runs on, now: an on-demand session.

The aggregator orders every connected agent to sample the job's processes (in the kernel,
by pid) at the given frequency until the deadline; this command shows progress, then writes
the merged graph (format from -o's suffix, as for `flamegraph`) and a per-node table.
"""

from __future__ import annotations

import argparse
import sys
import time

from fleetprof.commands.options import (
    DEFAULT_AGGREGATOR,
    add_client_security_arguments,
    add_output_argument,
    aggregator_address,
    client_security,
)
from fleetprof.proto.control.v1 import control_pb2
from fleetprof.proto.schema import EVENT_UNITS
from fleetprof.query.filters import parse_duration

FINISHED = control_pb2.SessionState.SESSION_STATE_FINISHED

HELP = "profile a job on every node it runs on, now (on-demand session)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job", required=True, help="the job, as the agents' resolvers name it")
    parser.add_argument("--duration", type=parse_duration, default=60.0, help="e.g. 60s, 5m")
    parser.add_argument(
        "--frequency", type=int, default=199, metavar="HZ", help="samples/s per CPU"
    )
    parser.add_argument(
        "--events", default="cpu", help=f"comma-separated, of: {','.join(EVENT_UNITS)}"
    )
    add_output_argument(
        parser, "the merged graph; its suffix gives the format, as for `flamegraph`", True
    )
    parser.add_argument(
        "--aggregator",
        type=aggregator_address,
        default=DEFAULT_AGGREGATOR,
        metavar="HOST:PORT",
        help="the aggregator the agents ship to",
    )
    add_client_security_arguments(parser, token=True)


def run(args: argparse.Namespace) -> int:
    import grpc

    from fleetprof.proto.control.v1 import control_pb2_grpc
    from fleetprof.query.filters import SampleFilter
    from fleetprof.query.graph import write_graph
    from fleetprof.query.render import RenderOptions, renderer_for
    from fleetprof.query.render.base import format_weight
    from fleetprof.query.source import AggregatorSource

    renderer_for(args.output)  # an unknown suffix is refused before the session, not after
    events = [e.strip() for e in args.events.split(",") if e.strip()]
    security = client_security(args)
    channel = security.channel(args.aggregator)
    stub = control_pb2_grpc.ControlServiceStub(channel)
    try:
        session = stub.StartSession(
            control_pb2.StartSessionRequest(
                job=args.job,
                duration_s=max(1, round(args.duration)),
                frequency=args.frequency,
                events=events,
            ),
            metadata=security.metadata(),
            timeout=10,
        )
        print(
            f"session {session.session_id}: job {args.job!r}, {len(events)} event(s), "
            f"{session.agents} agent(s) connected, sampling for {args.duration:g} s",
            flush=True,
        )
        final, status = None, _Progress()
        for progress in stub.WatchSession(
            control_pb2.WatchSessionRequest(session_id=session.session_id),
            metadata=security.metadata(),
        ):
            final = progress
            status.show(progress)
        print()
    except grpc.RpcError as exc:
        problem = exc.details() or exc.code().name
        raise RuntimeError(f"aggregator {args.aggregator}: {problem}") from None
    finally:
        channel.close()

    if final is None or not any(node.samples for node in final.nodes):
        raise ValueError(
            f"no samples of job {args.job!r}: none of the {session.agents} connected agent(s) "
            f"found a process of it in {args.duration:g} s; the jobs seen so far: "
            f'fleetprof query "SELECT DISTINCT job FROM samples"'
        )
    source = AggregatorSource(args.aggregator, security=security)
    try:
        event = events[0]
        options = RenderOptions(
            title=f"fleetprof {event}: job {args.job}",
            event=event,
            unit=EVENT_UNITS[event],
            subtitle=f"session {session.session_id}",
        )
        selection = SampleFilter(event=event, session=session.session_id)
        total = write_graph(source, selection, args.output, options)
    finally:
        source.close()
    print(f"wrote {args.output} ({format_weight(total, options.unit)})")
    _node_table(final, total)
    return 0


class _Progress:
    """One status line: rewritten in place on a terminal, else printed when it changes."""

    def __init__(self) -> None:
        self._last = ""

    def show(self, progress: control_pb2.SessionProgress) -> None:
        left = max(0, round(progress.deadline_unix_ms / 1000 - time.time()))
        samples = sum(node.samples for node in progress.nodes)
        finished = sum(node.state == FINISHED for node in progress.nodes)
        line = (
            f"{len(progress.nodes)} node(s) answering, {finished} finished, "
            f"{samples} samples so far, {left} s left"
        )
        if sys.stdout.isatty():
            print(line.ljust(78), end="\r", flush=True)
        elif line.split(",")[:2] != self._last.split(",")[:2]:
            print(line, flush=True)  # nodes joined or finished
        self._last = line


def _node_table(progress: control_pb2.SessionProgress | None, total: int) -> None:
    """Samples per node, so a straggler host stands out."""
    if progress is None:
        return
    print(f"{'node':<24} {'samples':>10} {'share':>7}  state")
    for node in sorted(progress.nodes, key=lambda n: -n.samples):
        share = 100 * node.samples / total if total else 0.0
        state = control_pb2.SessionState.Name(node.state).removeprefix("SESSION_STATE_").lower()
        print(f"{node.node:<24} {node.samples:>10} {share:>6.1f}%  {state}")
