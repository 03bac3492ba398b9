"""One selection parser (query/selection.py) for the CLI's options and the web API's
parameters: the same words pick the same samples and fail with the same message."""

from __future__ import annotations

from urllib.parse import parse_qs

import pytest

from fleetprof.aggregator import web_api
from fleetprof.cli import build_parser
from fleetprof.commands.flamegraph import selection_from
from fleetprof.query.filters import SampleFilter

SAME = [
    (
        ["--job", "etl-42", "--job", "etl-43", "--node", "a"],
        "job=etl-42&job=etl-43&node=a",
    ),
    (["--session", "s-1", "--pid", "12", "--comm", "java"], "session=s-1&pid=12&comm=java"),
    (
        ["--since", "2026-01-01T10:00:00", "--until", "2026-01-01T11:00:00+00:00"],
        "since=2026-01-01T10:00:00&until=2026-01-01T11:00:00%2B00:00",
    ),
]


def from_cli(options: list[str], command: str = "flamegraph") -> SampleFilter:
    args = build_parser().parse_args([command, "-o", "x.html", *options])
    return selection_from(args)


def from_api(query: str) -> SampleFilter:
    return web_api.selection_from(parse_qs(query, keep_blank_values=True), "cpu")


@pytest.mark.parametrize(("options", "query"), SAME)
def test_cli_and_api_pick_the_same_samples(options: list[str], query: str) -> None:
    assert from_cli(options) == from_api(query)


def test_the_selection_reads_as_the_user_wrote_it() -> None:
    selection = from_cli(["--job", "etl-42", "--session", "s-1", "--pid", "7"])
    assert (selection.jobs, selection.session, selection.pids) == (("etl-42",), "s-1", (7,))
    assert selection.describe() == "cpu samples of job etl-42, pid 7, session s-1"
    assert "session_id = 's-1'" in selection.where() and "job IN ('etl-42')" in selection.where()


@pytest.mark.parametrize(
    ("options", "query", "message"),
    [
        (["--pid", "twelve"], "pid=twelve", "bad pid 'twelve': expected an integer"),
        (["--since", "yesterday"], "since=yesterday", "since: bad time 'yesterday'"),
        (["--since", "1h", "--until", "2h"], "since=1h&until=2h", "since must be before until"),
        (["--session", "a", "--session", "b"], "session=a&session=b", "session may be given once"),
    ],
)
def test_cli_and_api_refuse_with_the_same_words(
    options: list[str], query: str, message: str
) -> None:
    with pytest.raises(ValueError) as cli_error:
        from_cli(options)
    with pytest.raises(web_api.BadRequest) as api_error:
        from_api(query)
    assert str(cli_error.value) == str(api_error.value)
    assert message.replace("given once", "given only once") in str(api_error.value)


def test_diff_base_options_use_the_same_parser() -> None:
    args = build_parser().parse_args(
        ["diff", "--base-job", "etl-41", "--base-since", "2h", "--base-until", "3h"]
    )
    with pytest.raises(ValueError, match="base-since must be before base-until"):
        selection_from(args, "base-")
    args = build_parser().parse_args(["diff", "--base-job", "etl-41", "--job", "etl-42"])
    assert selection_from(args, "base-").jobs == ("etl-41",)
    assert selection_from(args).jobs == ("etl-42",)
