"""The `fleetprof` command: one subcommand per module in fleetprof.commands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from fleetprof.commands import (
    admin,
    agent,
    aggregator,
    demo,
    diff,
    export,
    flamegraph,
    import_,
    profile,
    query,
)

COMMANDS = {
    "aggregator": aggregator,
    "agent": agent,
    "query": query,
    "flamegraph": flamegraph,
    "profile": profile,
    "diff": diff,
    "export": export,
    "import": import_,
    "demo": demo,
    "admin": admin,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetprof", description="Cluster-wide eBPF profiling with SQL over profiles."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        sub = subcommands.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Users get one line; FLEETPROF_DEBUG=1 shows the traceback.
        if os.environ.get("FLEETPROF_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"fleetprof {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
