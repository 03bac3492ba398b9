"""What a new user meets first on the command line: errors say what is wrong at once, in
one line and the words of the command, and help shows each default once."""

from __future__ import annotations

import argparse
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleetprof.aggregator.server import Aggregator
from fleetprof.cli import build_parser, main
from fleetprof.query.sandbox import QueryError
from fleetprof.query.source import AggregatorSource
from tests.conftest import free_port
from tests.unit.test_sql_views import filled_database


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return filled_database(tmp_path_factory)


def refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The one-line error of a command line argparse or the command refuses."""
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    assert code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["query", "--aggregator", "127.0.0.1", "SELECT 1"], "'127.0.0.1': use HOST:PORT"),
        (["query", "--aggregator", "127.0.0.1:99999", "SELECT 1"], "a port from 1 to 65535"),
        (["flamegraph", "--aggregator", ":7470", "-o", "x.html"], "':7470': use HOST:PORT"),
        (["agent", "--aggregator", "a:7470,b"], "bad aggregator address 'b'"),
        (["profile", "--job", "j", "-o", "j.html", "--aggregator", "a:1,b:2"], "not a list"),
        (["aggregator", "--listen", "127.0.0.1:99999"], "a port from 0 to 65535"),
        (["aggregator", "--http", "7471"], "bad address '7471'"),
        (["aggregator", "--otlp-listen", "4317"], "bad address '4317'"),
        (["admin", "delete", "--node", "n", "--aggregator", "127.0.0.1"], "use HOST:PORT"),
    ],
)
def test_bad_addresses_are_named_not_unreachable(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    err = refused(capsys, argv)
    assert message in err and "unreachable" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--since", "yesterday"], "since: bad time 'yesterday': use ISO 8601 or a duration"),
        (["--since", "1h", "--until", "2h"], "since must be before until"),
        ([], "is unreachable (is `fleetprof aggregator` running there?)"),
    ],
)
def test_admin_delete_speaks_like_the_other_commands(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    argv = ["admin", "delete", "--node", "n", "--aggregator", nobody, "--token", "t", *argv]
    assert message in refused(capsys, argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-query-seconds", "0"], "'0': expected a number of seconds above 0"),
        (["--max-query-seconds", "nan"], "'nan': expected a number of seconds above 0"),
        (["--max-streams", "-1"], "'-1': expected a whole number above 0"),
        (["--max-streams-per-peer", "1.5"], "'1.5': expected a whole number above 0"),
    ],
)
def test_limits_that_would_refuse_everything_are_refused(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert message in refused(capsys, ["aggregator", *argv])


@pytest.mark.parametrize("option", ["--listen", "--http", "--otlp-listen"])
def test_a_busy_port_is_one_clear_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], option: str
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = f"127.0.0.1:{holder.getsockname()[1]}"
        argv = ["aggregator", "--db", str(tmp_path / "p.duckdb"), "--listen", "127.0.0.1:0"]
        assert main([*argv, option, busy]) == 2
    err = capfd.readouterr().err
    assert err == (
        f"fleetprof aggregator: error: {option} {busy}: the port is in use (another "
        "aggregator?); stop that program or pick another port\n"
    )
    assert not (tmp_path / "p.duckdb").exists()  # refused before anything started


def test_an_unknown_flag_shows_the_subcommands_usage(capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(capsys, ["query", "--db", "x.duckdb", "SELECT 1", "--fromat", "csv"])
    assert err.startswith("usage: fleetprof query [-h]")
    assert err.rstrip().endswith("fleetprof query: error: unrecognized arguments: --fromat csv")


def test_a_closed_pipe_ends_quietly(database: Path) -> None:
    sql = "SELECT range AS n FROM range(2000000)"
    command = [sys.executable, "-m", "fleetprof", "query", "--db", str(database), sql]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as query:
        assert query.stdout.readline().split() == [b"n"]  # as `| head -1` reads
        query.stdout.close()
        err = query.stderr.read()
        assert query.wait(timeout=60) == 141
    assert err == b""


@pytest.mark.parametrize(
    ("sql", "word"),
    [
        ("INSTALL httpfs", "INSTALL"),
        ("LOAD httpfs", "LOAD"),
        ("CHECKPOINT", "CHECKPOINT"),
        ("force checkpoint", "FORCE CHECKPOINT"),
        ("WITH x AS (SELECT 1) DELETE FROM sample_rows", "DELETE"),
        ("CALL pragma_version()", "CALL"),
    ],
)
def test_refused_statements_are_named_by_their_keyword(
    capsys: pytest.CaptureFixture[str], database: Path, sql: str, word: str
) -> None:
    err = refused(capsys, ["query", "--db", str(database), sql])
    assert err == (
        f"fleetprof query: error: refused: {word} statements are not allowed; "
        "queries are read-only\n"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["query", "SELECT 1", "-o"],
        ["flamegraph", "-o"],
        ["diff", "--base-since", "2h", "-o"],
        ["profile", "--job", "etl-42", "-o"],
    ],
)
def test_output_into_a_missing_folder_is_refused_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]
) -> None:
    # port 1 has no aggregator: had the command connected first, it would say unreachable
    missing = tmp_path / "missing" / "dir" / "x.html"
    err = refused(capsys, [*argv, str(missing), "--aggregator", "127.0.0.1:1"])
    assert f"cannot write {missing}: there is no folder {missing.parent}" in err


def test_profile_of_a_job_nobody_runs_says_so(
    capsys: pytest.CaptureFixture[str], aggregator: Aggregator, tmp_path: Path
) -> None:
    out = tmp_path / "job.html"
    argv = ["profile", "--job", "nosuchjob", "--duration", "1s", "-o", str(out)]
    err = refused(capsys, [*argv, "--aggregator", aggregator.address])
    assert err.startswith(
        "fleetprof profile: error: no samples of job 'nosuchjob': none of the 0 connected "
        "agent(s) found a process of it in 1 s"
    )
    assert "session_id" not in err and "event =" not in err and not out.exists()


def test_help_names_each_default_once_and_explains_every_option() -> None:
    parser = build_parser()
    (subcommands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in subcommands.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help text"
        for line in sub.format_help().splitlines():
            assert line.count("default") <= 1, f"{name}: {line}"
            assert "(default: None)" not in line and "(default: [])" not in line, name
    help_text = " ".join(subcommands.choices["aggregator"].format_help().split())
    assert "seal an hour this long after it ends, for late batches (default 2m)" in help_text


def test_the_aggregator_says_where_it_listens_once(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "fleetprof", "aggregator", "--db", str(tmp_path / "p.db")]
    with subprocess.Popen(
        [*command, "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as aggregator:
        lines = []
        for line in aggregator.stdout:
            lines.append(line)
            if "sealing closed hours" in line:  # the last start-up line
                break
        aggregator.terminate()
        lines += aggregator.stdout.readlines()
        aggregator.wait(timeout=30)
    text = "".join(lines)
    assert text.count("listening on") == 1 and text.count("web UI on") == 1, text


def test_csv_of_a_nested_column_fails_at_once_with_the_reason(
    capsys: pytest.CaptureFixture[str], aggregator: Aggregator
) -> None:
    argv = ["query", "--aggregator", aggregator.address, "SELECT {'a': 1} AS s", "--format", "csv"]
    err = refused(capsys, argv)
    # the writer's own error, not the call's deadline (which came 65 s later)
    assert err == (
        "fleetprof query: error: CSV cannot hold column 's' of type struct<a: int32>: use "
        "--format json or parquet, or cast it in the query (::VARCHAR)\n"
    )
    main(["query", "--aggregator", aggregator.address, "SELECT {'a': 1} AS s"])
    assert "{'a': 1}" in capsys.readouterr().out  # the table shows it


def test_a_query_past_its_timeout_stops_cleanly(
    aggregator: Aggregator, caplog: pytest.LogCaptureFixture
) -> None:
    source = AggregatorSource(aggregator.address, timeout_s=1)
    sql = "SELECT range AS n, 'frame_' || range AS s FROM range(20000000)"
    with (
        caplog.at_level(logging.ERROR),
        pytest.raises(QueryError) as error,
        source.stream(sql) as reader,
    ):
        for _ in reader:  # a slow reader: the timeout covers reading too
            time.sleep(0.3)
    source.close()
    assert str(error.value) == "query stopped after the 1 s timeout (reading its result counts)"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
