"""Which samples a flame graph or report covers, as a SQL WHERE clause."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as '90s', '15m', '2h', '7d'."""
    match = _RELATIVE.match(text.strip())
    if not match:
        raise ValueError(f"bad duration {text!r}: use a number and s, m, h or d, like 60s")
    return float(match[1]) * _UNIT_SECONDS[match[2]]


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC if no zone) or a duration ago such as '15m', '2h', '7d'."""
    if _RELATIVE.match(text.strip()):
        return (now or datetime.now(UTC)) - timedelta(seconds=parse_duration(text))
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"bad time {text!r}: use ISO 8601 or a duration like 15m, 2h") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# Sums of weights past BIGINT saturate rather than fail the whole query (DuckDB sums BIGINT
# as HUGEINT; the cast back failed with "Conversion Error: Type INT128"): 2^63-1 ns is 292
# years of thread time.
INT64_MAX = 2**63 - 1


def saturating(total: str) -> str:
    """SQL of a HUGEINT sum as a BIGINT, capped at INT64_MAX."""
    return f"least({total}, {INT64_MAX})::BIGINT"


def sql_literal(value: object) -> str:
    """Quote a value for SQL text (queries travel as text over the wire)."""
    if isinstance(value, bool | int | float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


@dataclass(frozen=True)
class SampleFilter:
    event: str = "cpu"
    since: datetime | None = None
    until: datetime | None = None
    nodes: tuple[str, ...] = ()
    pids: tuple[int, ...] = ()
    comms: tuple[str, ...] = ()
    jobs: tuple[str, ...] = ()
    # An on-demand session's rows only (fleetprof profile); None: continuous profiling.
    session: str | None = None

    def describe(self) -> str:
        """The selection in the user's words, for messages: `cpu samples of job etl-42`."""
        labels = [
            f"{label} {' or '.join(map(str, values))}"
            for label, values in (
                ("job", self.jobs),
                ("node", self.nodes),
                ("pid", self.pids),
                ("process", self.comms),
                ("session", (self.session,) if self.session else ()),
            )
            if values
        ]
        text = f"{self.event} samples" + (f" of {', '.join(labels)}" if labels else "")
        if self.since:
            text += f" since {self.since.isoformat(timespec='seconds')}"
        if self.until:
            text += f" until {self.until.isoformat(timespec='seconds')}"
        return text

    def where(self) -> str:
        clauses = [f"event = {sql_literal(self.event)}"]
        if self.since:
            clauses.append(f"ts >= {sql_literal(self.since.isoformat())}::TIMESTAMPTZ")
        if self.until:
            clauses.append(f"ts < {sql_literal(self.until.isoformat())}::TIMESTAMPTZ")
        if self.session:
            clauses.append(f"session_id = {sql_literal(self.session)}")
        columns = (
            ("node", self.nodes),
            ("pid", self.pids),
            ("comm", self.comms),
            ("job", self.jobs),
        )
        for column, values in columns:
            if values:
                clauses.append(f"{column} IN ({', '.join(sql_literal(v) for v in values)})")
        return " AND ".join(clauses)
