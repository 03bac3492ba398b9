"""The one parser of a sample selection: the CLI's options and the web API's parameters.

Both hand over what the user typed, as text per key (a repeated option or URL parameter
gives several), so `--job etl-42` and `/api/top?job=etl-42` pick the same samples and
fail with the same words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from fleetprof.query.filters import SampleFilter, parse_time

# since/until: ISO time or duration ago; session: one id; the rest repeat (any of them).
SELECTION_KEYS = ("since", "until", "node", "pid", "comm", "job", "session")
REPEATABLE = ("node", "pid", "comm", "job")


class SelectionError(ValueError):
    """A selection refused; str() is one line for the user."""


def parse_selection(
    values: Mapping[str, Sequence[str]], event: str = "cpu", prefix: str = ""
) -> SampleFilter:
    """The samples `values` picks, each key being `prefix` + one of SELECTION_KEYS (other
    keys are the caller's). Blank texts count as absent (an untouched form field)."""

    def given(key: str) -> list[str]:
        return [text.strip() for text in values.get(prefix + key, ()) if text.strip()]

    def single(key: str) -> str | None:
        texts = given(key)
        if len(texts) > 1:
            raise SelectionError(f"{prefix}{key} may be given only once")
        return texts[0] if texts else None

    def time(key: str) -> datetime | None:
        text = single(key)
        try:
            return parse_time(text) if text else None
        except ValueError as exc:
            raise SelectionError(f"{prefix}{key}: {exc}") from None

    selection = SampleFilter(
        event=event,
        since=time("since"),
        until=time("until"),
        nodes=tuple(given("node")),
        pids=tuple(_pid(text) for text in given("pid")),
        comms=tuple(given("comm")),
        jobs=tuple(given("job")),
        session=single("session"),
    )
    if selection.since and selection.until and selection.since >= selection.until:
        raise SelectionError(f"{prefix}since must be before {prefix}until")
    return selection


def _pid(text: str) -> int:
    if not text.isdigit():
        raise SelectionError(f"bad pid {text!r}: expected an integer")
    return int(text)
