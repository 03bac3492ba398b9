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


class HelpFormatter(argparse.HelpFormatter):
    """Adds an option's default to its help where the default says something (not None,
    off or empty) and the help text does not already name it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            not text
            or "default" in text
            or action.default in (None, False, [], argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return text + " (default: %(default)s)"


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
            formatter_class=HelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run, subcommand=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # the subcommand's usage, not the top level's, tells what it takes
        args.subcommand.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader had enough (`| head`): stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        # Users get one line; FLEETPROF_DEBUG=1 shows the traceback.
        if os.environ.get("FLEETPROF_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"fleetprof {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
