"""The wire contract: committed generated code is current; Arrow payloads round-trip."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from fleetprof.proto import generate, schema


def test_generated_code_is_current(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert written, "protoc generated nothing"
    for path in written:
        committed = generate.PROTO_ROOT / path.relative_to(tmp_path)
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run `make proto` and commit the result"
        )


def test_samples_round_trip_compressed() -> None:
    table = schema.samples_table(
        {
            "ts": [datetime(2026, 1, 1, tzinfo=UTC)] * 1000,
            "pid": [1] * 1000,
            "tid": [2] * 1000,
            "comm": ["java"] * 1000,
            "event": ["cpu"] * 1000,
            "stack_id": list(range(1000)),
            "weight": [3] * 1000,
        }
    )
    payload = schema.encode(table)
    assert len(payload) < table.nbytes  # buffers are compressed
    assert schema.decode(payload, schema.SAMPLES).equals(table)


def test_decode_names_the_problem() -> None:
    with pytest.raises(schema.SchemaError, match="malformed Arrow IPC"):
        schema.decode(b"\x00garbage", schema.SAMPLES)
    wrong = schema.encode(pa.table({"x": [1]}))
    with pytest.raises(schema.SchemaError, match="samples: schema does not match"):
        schema.decode(wrong, schema.SAMPLES)
