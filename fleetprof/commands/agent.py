"""Run the node agent: sample stacks with eBPF and ship them to an aggregator."""

from __future__ import annotations

import argparse
import socket

from fleetprof.commands.options import (
    DEFAULT_AGGREGATOR,
    add_client_security_arguments,
    add_job_arguments,
    aggregator_list,
    client_security,
    job_specs,
    stop_on_signals,
)
from fleetprof.node_agent.assignment import parse_aggregators
from fleetprof.node_agent.symbolize.debuginfod import DEFAULT_CACHE_DIR, DebuginfodOptions
from fleetprof.proto.schema import (
    EVENT_UNITS,
    MAX_FREQUENCY_HZ,
    MAX_INTERVAL_S,
    MIN_HOST_SAMPLING,
)

HELP = "run the node agent (eBPF sampling; needs root)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--aggregator",
        type=aggregator_list,
        default=DEFAULT_AGGREGATOR,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="an aggregator, or a list of them: the node ships to one, by consistent hashing",
    )
    parser.add_argument("--node", default=socket.gethostname(), help="this node's name")
    parser.add_argument(
        "--events", default="cpu", help=f"comma-separated, of: {','.join(EVENT_UNITS)}"
    )
    parser.add_argument(
        "--frequency", type=int, default=19, metavar="HZ", help="cpu samples/s per CPU"
    )
    parser.add_argument(
        "--interval", type=float, default=10.0, metavar="SECONDS", help="time between shipments"
    )
    parser.add_argument(
        "--host-sampling",
        type=float,
        default=1.0,
        metavar="P",
        help="ship each interval with probability P (0 < P <= 1), weights scaled by 1/P",
    )
    parser.add_argument(
        "--include-idle", action="store_true", help="also count samples of the idle task"
    )
    parser.add_argument(
        "--offcpu-min-us",
        type=int,
        default=1000,
        metavar="US",
        help="offcpu: shortest time off CPU that counts (microseconds)",
    )
    parser.add_argument(
        "--no-python-frames",
        action="store_true",
        help="do not read CPython processes' own frames (docs/python.md)",
    )
    parser.add_argument(
        "--spool-dir", default="/var/lib/fleetprof/spool", help="undelivered batches wait here"
    )
    parser.add_argument(
        "--spool-max-mb", type=float, default=256, help="spool size cap; oldest dropped first"
    )
    parser.add_argument(
        "--no-native-unwind",
        dest="native_unwind",
        action="store_false",
        help="walk user stacks by frame pointer only, not from each binary's .eh_frame",
    )
    parser.add_argument(
        "--unwind-cache-dir",
        default="/var/cache/fleetprof/unwind",
        help="unwind rows prepared from binaries are kept here, by build id",
    )
    parser.add_argument(
        "--debuginfod-cache-dir",
        help="debug files fetched from DEBUGINFOD_URLS are kept here (default: "
        f"$DEBUGINFOD_CACHE_PATH, else {DEFAULT_CACHE_DIR})",
    )
    add_client_security_arguments(parser, token=False, agent=True)
    add_job_arguments(parser)
    parser.add_argument(
        "--kubeconfig", help="pod metadata outside a cluster's pods (in a pod: automatic)"
    )


def run(args: argparse.Namespace) -> int:
    # Imported here: BCC and its compiler load only for the command that samples.
    from fleetprof.node_agent.agent import Agent, AgentConfig
    from fleetprof.node_agent.samplers import SamplerOptions

    if not 1 <= args.frequency <= MAX_FREQUENCY_HZ:
        raise ValueError(f"--frequency must be between 1 and {MAX_FREQUENCY_HZ} Hz")
    parse_aggregators(args.aggregator)  # a bad list fails now, not after BPF compiles
    if not 0 < args.interval <= MAX_INTERVAL_S:
        raise ValueError(f"--interval must be positive, at most {MAX_INTERVAL_S} s")
    if not MIN_HOST_SAMPLING <= args.host_sampling <= 1:
        raise ValueError(f"--host-sampling must be in [{MIN_HOST_SAMPLING}, 1]")
    if args.offcpu_min_us < 1:
        raise ValueError("--offcpu-min-us must be at least 1")
    events = tuple(e.strip() for e in args.events.split(",") if e.strip())
    unknown = set(events) - EVENT_UNITS.keys()
    if not events or unknown:
        raise ValueError(f"--events takes some of {','.join(EVENT_UNITS)}")
    config = AgentConfig(
        aggregator=args.aggregator,
        node=args.node,
        interval_s=args.interval,
        events=events,
        spool_dir=args.spool_dir,
        spool_max_bytes=int(args.spool_max_mb * 1024 * 1024),
        security=client_security(args),
        job_resolvers=tuple(job_specs(args)),
        kubeconfig=args.kubeconfig,
        host_sampling=args.host_sampling,
        native_unwind=args.native_unwind,
        unwind_cache_dir=args.unwind_cache_dir,
        debuginfod=DebuginfodOptions.from_environment(cache_dir=args.debuginfod_cache_dir),
        sampling=SamplerOptions(
            frequency=args.frequency,
            include_idle=args.include_idle,
            offcpu_min_us=args.offcpu_min_us,
            python_frames=not args.no_python_frames,
        ),
    )
    _wake_grpc_waits_less()
    Agent(config).run(stop_on_signals())
    return 0


def _wake_grpc_waits_less() -> None:
    """grpc's blocking calls wait in steps of _common.MAXIMUM_WAIT_TIMEOUT (0.1 s), so that
    a main thread blocked in one still sees signals. The agent blocks in none on its main
    thread, but its control stream's thread waits for orders all the time: ten wake-ups a
    second cost ~0.1% of a core on an idle node (docs/agent-cost.md). A reply or a cancel
    still ends a wait at once."""
    import grpc._common

    grpc._common.MAXIMUM_WAIT_TIMEOUT = 2.0
