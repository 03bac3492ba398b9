"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import threading
from typing import TYPE_CHECKING, Any

from fleetprof.node_agent import jobs
from fleetprof.node_agent.assignment import parse_aggregators
from fleetprof.proto.security import (
    AccessScope,
    ClientSecurity,
    ServerSecurity,
    parse_agent_credentials,
    parse_tokens,
)

if TYPE_CHECKING:
    from fleetprof.query.source import ProfileSource

DEFAULT_AGGREGATOR = "127.0.0.1:7470"


def aggregator_list(text: str) -> str:
    """argparse type of --aggregator: HOST:PORT, or a comma-separated list of them."""
    try:
        parse_aggregators(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def aggregator_address(text: str) -> str:
    """argparse type of an --aggregator that takes one HOST:PORT."""
    if len(parse_aggregators(aggregator_list(text))) > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one aggregator here, not a list")
    return text


def listen_address(text: str) -> str:
    """argparse type of a server's HOST:PORT ([::1]:PORT for IPv6; port 0: any free one)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(
            f"bad address {text!r}: expected HOST:PORT with a port from 0 to 65535"
        )
    return text


def check_can_listen(listen: str, option: str) -> None:
    """Refuse a port another program holds before any server starts (gRPC would log a
    C-core line and a hint about its own debug settings instead)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if port == "0":
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ValueError(
                    f"{option} {listen}: the port is in use (another aggregator?); "
                    "stop that program or pick another port"
                ) from None
            raise ValueError(f"{option} {listen}: cannot listen there: {exc.strerror}") from None


def output_file(text: str) -> str:
    """argparse type of -o FILE: its folder must exist, checked before any work is done."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text}: there is no folder {folder}")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"cannot write {text}: it is a folder")
    return text


def add_output_argument(parser: argparse.ArgumentParser, what: str, required: bool) -> None:
    """-o FILE, its folder checked as the options are read (output_file)."""
    parser.add_argument(
        "-o", "--output", required=required, type=output_file, metavar="FILE", help=what
    )


def add_aggregator_or_db(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--aggregator",
        type=aggregator_list,
        metavar="HOST:PORT",
        help=f"a running aggregator (default {DEFAULT_AGGREGATOR}); queries take a list: A,B,...",
    )
    source.add_argument("--db", metavar="PATH", help="a profile database file (no aggregator)")


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    add_aggregator_or_db(parser)
    parser.add_argument(
        "--lake",
        metavar="DIR",
        help="the Parquet lake of sealed hours; with --aggregator A,B,...: one fleet, the lake "
        "plus the aggregators' unsealed rows",
    )
    parser.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="with --db: DuckDB's memory limit for the query (e.g. 2GB; default 80%% of RAM)",
    )
    add_client_security_arguments(parser, token=True)


def add_client_security_arguments(
    parser: argparse.ArgumentParser, token: bool, agent: bool = False
) -> None:
    group = parser.add_argument_group("transport security (needed off loopback)")
    group.add_argument("--tls-ca", metavar="PEM", help="CA that signed the aggregator's cert")
    group.add_argument("--tls-cert", metavar="PEM", help="this client's certificate (mTLS)")
    group.add_argument("--tls-key", metavar="PEM", help="its private key")
    if token:
        group.add_argument(
            "--token",
            default=os.environ.get("FLEETPROF_TOKEN"),
            help="bearer token for queries (default: $FLEETPROF_TOKEN)",
        )
    if agent:
        group.add_argument(
            "--token-file",
            metavar="FILE",
            help="file holding this agent's token (docs/security.md); default: "
            "$FLEETPROF_AGENT_TOKEN",
        )
    group.add_argument(
        "--insecure", action="store_true", help="allow plaintext to a non-loopback address"
    )


def client_security(args: argparse.Namespace) -> ClientSecurity:
    return ClientSecurity(
        ca=args.tls_ca,
        cert=args.tls_cert,
        key=args.tls_key,
        token=getattr(args, "token", None) or _agent_token(args),
        insecure=args.insecure,
    )


def _agent_token(args: argparse.Namespace) -> str | None:
    if "token_file" not in args:
        return None
    if args.token_file:
        with open(args.token_file) as lines:
            return lines.read().strip() or None
    return os.environ.get("FLEETPROF_AGENT_TOKEN")


def add_server_security_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("transport security (needed off loopback)")
    group.add_argument("--tls-cert", metavar="PEM", help="the server's certificate chain")
    group.add_argument("--tls-key", metavar="PEM", help="its private key")
    group.add_argument(
        "--tls-client-ca", metavar="PEM", help="require agents' client certificates (mTLS)"
    )
    group.add_argument(
        "--token-file",
        metavar="FILE",
        help="bearer tokens accepted for queries, one per line: TOKEN [jobs=A,B] [namespaces=X]",
    )
    group.add_argument(
        "--agent-credentials",
        metavar="FILE",
        help="tokens and client certificates agents ingest with, and the nodes each may "
        "write, one per line: TOKEN nodes=web-*,db-1 or cert:NAME nodes=... "
        "(docs/security.md)",
    )
    group.add_argument(
        "--insecure", action="store_true", help="allow plaintext on a non-loopback address"
    )


def server_security(args: argparse.Namespace) -> ServerSecurity:
    tokens: dict[str, AccessScope | None] = {}
    if args.token_file:
        with open(args.token_file) as lines:
            tokens = parse_tokens(lines)
        if not tokens:
            raise ValueError(f"{args.token_file} holds no token")
    agents = {}
    if args.agent_credentials:
        with open(args.agent_credentials) as lines:
            agents = parse_agent_credentials(lines)
        if not agents:
            raise ValueError(f"{args.agent_credentials} holds no credential")
    return ServerSecurity(
        cert=args.tls_cert,
        key=args.tls_key,
        client_ca=args.tls_client_ca,
        tokens=tokens,
        insecure=args.insecure,
        agents=agents,
    )


def open_profiles(args: argparse.Namespace) -> ProfileSource:
    from fleetprof.query.source import open_source  # loads DuckDB: only when used

    if args.lake or (args.aggregator and "," in args.aggregator):
        if args.db:
            raise ValueError("--lake combines with --aggregator, not with --db")
        from fleetprof.node_agent.assignment import parse_aggregators
        from fleetprof.query.fleet import FleetSource

        aggregators = parse_aggregators(args.aggregator) if args.aggregator else []
        return FleetSource(
            args.lake, aggregators, client_security(args), memory_limit=args.memory_limit
        )
    if args.db:
        return open_source(None, args.db, memory_limit=args.memory_limit)
    return open_source(args.aggregator or DEFAULT_AGGREGATOR, None, client_security(args))


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, for a clean shutdown."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def job_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """From the flags of add_job_arguments: the config file's resolvers, then the flags'."""
    specs = jobs.load_config(args.job_config) if args.job_config else []
    return specs + (args.job_resolvers or [])


class _AppendResolver(argparse.Action):
    """Appends a resolver spec to one shared list, so flags keep their command-line order."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        value = values.split(",") if self.const in ("env", "k8s_label") else values
        specs = [*(getattr(namespace, self.dest) or []), {self.const: value}]
        setattr(namespace, self.dest, specs)


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "job attribution",
        "resolvers tried in order, the first naming a job wins: those of --job-config, then "
        "the flags below in command-line order; with none, the defaults (FLEETPROF_JOB and "
        "SPARK_APPLICATION_ID, Spark executor --app-id, pod labels spark-app-selector and "
        "job-name, Slurm job_N cgroups)",
    )
    group.add_argument("--job-config", metavar="FILE", help="TOML file of [[resolver]] tables")
    for flag, kind, metavar, what in (
        ("--job-env", "env", "NAME[,NAME]", "environment variables of the process"),
        ("--job-cmdline", "cmdline", "REGEX", "regex on the command line (job: group 1)"),
        ("--job-cgroup", "cgroup", "REGEX", "regex on the cgroup path (job: group 1)"),
        ("--job-k8s-label", "k8s_label", "KEY[,KEY]", "labels of the process's pod"),
    ):
        group.add_argument(
            flag,
            dest="job_resolvers",
            action=_AppendResolver,
            const=kind,
            metavar=metavar,
            help=what,
        )
