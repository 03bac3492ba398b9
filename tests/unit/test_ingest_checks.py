"""The structures that keep issue 18's per-batch checks cheap answer as the slow ones did:
IdSet as a Python set, the control-character scan's fast path, AgentHistory as the table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from fleetprof.aggregator import agent_history
from fleetprof.aggregator.id_set import IdSet
from fleetprof.aggregator.label_sets import group_labels
from fleetprof.aggregator.storage import ProfileStore
from fleetprof.aggregator.validate import (
    MAX_CLOCK_SKEW,
    MAX_SAMPLE_AGE,
    StreamStacks,
    check_text,
    check_time_window,
    check_weights,
    validate_batch,
)
from fleetprof.proto import schema
from fleetprof.proto.stacks import stacks_table
from tests.unit.test_ingest import STACKS, batch, samples

EDGES = np.array([0, 1, -1, 2**63 - 1, -(2**63)], np.int64)


def test_id_set_answers_as_a_python_set() -> None:
    rng = np.random.default_rng(18)
    ids, expected = IdSet(), set()
    for step in range(40):  # grows from 1024 slots past 100k ids
        new = rng.integers(-(2**63), 2**63 - 1, int(rng.integers(0, 6000)), np.int64)
        if step % 7 == 0:
            new = np.concatenate([new, EDGES[: step % 5], new[:10]])  # repeats too
        ids.add(new)
        expected.update(new.tolist())
        asked = np.concatenate([new, rng.integers(-(2**63), 2**63 - 1, 3000, np.int64), EDGES])
        assert ids.contains(asked).tolist() == [i in expected for i in asked.tolist()]
        assert len(ids) == len(expected)


def test_id_set_of_clustered_ids() -> None:
    """Consecutive ids, and ids equal but for their top bits, are found as any others."""
    ids = IdSet()
    clustered = np.concatenate([np.arange(50_000), np.arange(1, 4096) << 52]).astype(np.int64)
    ids.add(clustered)
    assert ids.contains(clustered).all()
    assert not ids.contains(clustered + (1 << 40)).any()


def test_id_set_zero_and_the_ids_that_share_its_slot() -> None:
    """0 always goes to slot 0, which holds INT64_MIN when free: 0 is found only once added,
    INT64_MIN only once added, and the ids whose home is slot 0 too (id * multiplier below
    the slot size: k / multiplier mod 2^64) are found at the next level behind 0."""
    ids = IdSet()
    inverse = pow(int(ids._multiplier), -1, 2**64)
    same_home = np.array([(k * inverse) % 2**64 for k in range(1, 6)], np.uint64).view(np.int64)
    assert not ids.contains(EDGES).any() and not ids.contains_all(EDGES[:1])
    ids.add(EDGES[:1])  # 0
    ids.add(same_home)
    assert ids.contains(same_home).all() and ids.contains_all(same_home)
    assert ids.contains(EDGES).tolist() == [True, False, False, False, False]
    ids.add(EDGES[-1:])  # INT64_MIN
    assert ids.contains(EDGES).tolist() == [True, False, False, False, True]
    assert ids.contains_all(np.concatenate([same_home, EDGES[[0, -1]]])) and len(ids) == 7


def test_stream_stacks_known_from_this_batch_or_an_earlier_one() -> None:
    stream = StreamStacks()
    stream.check(samples({11: 1}), stacks_table({11: STACKS[11]}))
    stream.check(samples({11: 1, 12: 1}), stacks_table({12: STACKS[12]}))
    with pytest.raises(schema.SchemaError, match="stack 0 was never sent"):
        stream.check(samples({11: 1, 0: 1}), stacks_table({}))


def test_nulls_in_columns_that_may_not_have_them_are_refused() -> None:
    rows = samples({11: 1, 12: 1})
    rows = rows.set_column(5, schema.SAMPLES.field("stack_id"), pa.array([11, None], pa.int64()))
    with pytest.raises(schema.SchemaError, match="stack_id has nulls"):
        validate_batch(batch(1, samples=schema.encode(rows)))


@pytest.mark.parametrize(
    ("comm", "refused"),
    [("java", False), ("café 日本", False), ("a\x7fb", True), ("a\u0085b", True), ("\x00", True)],
)
def test_control_characters_beyond_printable_ascii(comm: str, refused: bool) -> None:
    rows = samples({11: 1, 12: 1})
    rows = rows.set_column(3, schema.SAMPLES.field("comm"), pa.array(["ok", comm]))
    if refused:
        with pytest.raises(schema.SchemaError, match="comm has control characters"):
            check_text("samples", rows, ("comm",))
    else:
        check_text("samples", rows, ("comm",))


def _strings(data: bytes, offsets: list[int], valid: list[int]) -> pa.Array:
    """A string array as a client may send it: any bytes, under null rows too."""
    return pa.Array.from_buffers(
        pa.string(),
        len(valid),
        [
            pa.py_buffer(np.packbits(valid, bitorder="little").tobytes()),
            pa.py_buffer(np.array(offsets, np.int32).tobytes()),
            pa.py_buffer(data),
        ],
    )


@pytest.mark.parametrize(
    ("column", "values", "refused"),
    [
        ("comm", pa.array(["ok", "ok", "a\u0085b"]), True),  # one distinct value of three rows
        ("job", pa.array(["ok", None, "fine"]), False),
        ("job", _strings(b"okok\x01x", [0, 2, 4, 6], [1, 1, 0]), True),  # under a null row
        ("comm", _strings(b"ok\xffok\x01", [0, 2, 3, 6], [1, 1, 1]), True),  # not UTF-8
        ("comm", _strings(b"ok\xffok", [0, 2, 3, 5], [1, 1, 1]), False),
    ],
)
def test_control_characters_of_grouped_labels_as_of_every_row(
    column: str, values: pa.Array, refused: bool
) -> None:
    """check_text over the distinct label values refuses what the scan of every row's
    bytes refuses: bytes under a null row (which no distinct value holds) and labels that
    are not UTF-8 (which cannot be grouped) are looked at as rows."""
    rows = samples({11: 1, 12: 1, 13: 1})
    rows = rows.set_column(
        rows.schema.get_field_index(column), schema.SAMPLES.field(column), values
    )
    try:
        grouped = group_labels(rows)
    except UnicodeDecodeError:
        grouped = None
    checks = [
        lambda: check_text("samples", rows, ("comm", "job"), grouped),
        lambda: check_text("samples", rows, ("comm", "job")),
        lambda: validate_batch(batch(1, samples=schema.encode(rows))),
    ]
    for check in checks:
        if refused:
            with pytest.raises(schema.SchemaError, match=f"samples: {column} has control"):
                check()
        else:
            check()


def _store_batch(store: ProfileStore, agent_id: str, node: str, sequence: int) -> None:
    store.append(
        agent_id, sequence, node, samples({11: 1}), stacks_table({11: STACKS[11]}), None, None, "i"
    )


def test_agent_history_is_read_at_open_and_kept_at_commit(tmp_path) -> None:
    store = ProfileStore(tmp_path / "a.duckdb")
    _store_batch(store, "agent-1", "node-a", 7)
    assert store.agent_history("agent-1", "i") == ("node-a", 7)
    assert store.agent_history("agent-1", "other") == ("node-a", 0)
    assert store.agent_history("agent-2", "i") == (None, 0)
    store.close()
    reopened = ProfileStore(tmp_path / "a.duckdb")
    assert reopened.agent_history("agent-1", "i") == ("node-a", 7)
    assert reopened.agent_history("agent-2", "i") == (None, 0)
    reopened.close()


def test_agent_history_past_its_size_reads_the_table(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(agent_history, "MAX_HELD", 2)
    store = ProfileStore(tmp_path / "a.duckdb")
    for n in range(4):  # agent-0 and agent-1 are dropped from memory
        _store_batch(store, f"agent-{n}", f"node-{n}", n + 1)
    assert store.agent_history("agent-0", "i") == ("node-0", 1)
    assert store.agent_history("agent-9", "i") == (None, 0)
    store.close()
    reopened = ProfileStore(tmp_path / "a.duckdb")  # more stored than it holds
    assert reopened.agent_history("agent-1", "i") == ("node-1", 2)
    assert reopened.agent_history("agent-3", "i") == ("node-3", 4)
    reopened.close()


def test_id_set_contains_all_answers_as_contains() -> None:
    rng = np.random.default_rng(81)
    ids = IdSet()
    held = rng.integers(-(2**63), 2**63 - 1, 120_000, np.int64)
    ids.add(held)
    others = rng.integers(-(2**63), 2**63 - 1, 2000, np.int64)
    for asked in (held[:10_000], held[::7], np.concatenate([held[:5000], others[:1]]), others):
        assert ids.contains_all(asked) == bool(ids.contains(asked).all())
    assert ids.contains_all(held) and ids.contains_all(held[:0])
    assert not ids.contains_all(np.concatenate([held[:10], EDGES[:1]]))  # 0 not added
    ids.add(EDGES[:1])
    assert ids.contains_all(np.concatenate([held[:10], EDGES[:1]]))


def test_time_window_bounds_to_the_microsecond() -> None:
    now = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
    tick = timedelta(microseconds=1)

    def rows(ts: datetime) -> pa.Table:
        return pa.table({"ts": pa.array([now, ts], pa.timestamp("us", tz="UTC"))})

    check_time_window("samples", rows(now + MAX_CLOCK_SKEW), now)
    check_time_window("samples", rows(now - MAX_SAMPLE_AGE), now)
    with pytest.raises(schema.SchemaError, match="in the future"):
        check_time_window("samples", rows(now + MAX_CLOCK_SKEW + tick), now)
    with pytest.raises(schema.SchemaError, match="older than 7 days"):
        check_time_window("samples", rows(now - MAX_SAMPLE_AGE - tick), now)


def test_bounds_read_in_place_answer_as_arrow_over_chunks_slices_and_nulls() -> None:
    """check_weights and check_time_window read each chunk's values buffer in place: a
    slice sees its own values only, every chunk counts, and a null's slot (whatever it
    holds) does not."""
    weights = pa.chunked_array([pa.array([1, -5, 2], pa.int64())])
    check_weights(pa.table({"weight": weights}).slice(2))
    with pytest.raises(schema.SchemaError, match="negative weight"):
        check_weights(pa.table({"weight": weights}).slice(1))
    two_chunks = pa.chunked_array([pa.array([1, 2], pa.int64()), pa.array([3, -1], pa.int64())])
    with pytest.raises(schema.SchemaError, match="negative weight"):
        check_weights(pa.table({"weight": two_chunks}))
    validity = pa.py_buffer(np.packbits([1, 0, 1], bitorder="little").tobytes())
    data = pa.py_buffer(np.array([1, -5, 2], np.int64).tobytes())
    null_over_negative = pa.Array.from_buffers(pa.int64(), 3, [validity, data], null_count=1)
    check_weights(pa.table({"weight": null_over_negative}))

    now = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
    ts_type = pa.timestamp("us", tz="UTC")
    late = now + MAX_CLOCK_SKEW + timedelta(seconds=1)
    chunks = pa.chunked_array([pa.array([now], ts_type), pa.array([now, late], ts_type)])
    with pytest.raises(schema.SchemaError, match="in the future"):
        check_time_window("samples", pa.table({"ts": chunks}), now)
    check_time_window("samples", pa.table({"ts": chunks}).slice(0, 2), now)
    check_time_window("samples", pa.table({"ts": pa.array([None, now], ts_type)}), now)


def _legacy(table: pa.Table) -> bytes:
    """An IPC stream in the framing before Arrow 0.15 (no continuation marker)."""
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd", use_legacy_format=True)
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def test_decoded_size_from_the_framing_or_pyarrow_alike(monkeypatch) -> None:
    """A plain stream's sizes are read from its framing without pyarrow's reader; any other
    (the legacy framing, a stream past the limits, cut short) is read by pyarrow's, so that
    it is refused as it always was."""
    rows = samples({11: 1, 12: 1, 13: 1})
    plain, legacy = schema.encode(rows), _legacy(rows)
    opened: list[bytes] = []

    class Reader:
        @staticmethod
        def open_stream(source: pa.Buffer) -> pa.ipc.MessageReader:
            opened.append(source.to_pybytes())
            return pa.ipc.MessageReader.open_stream(source)

    monkeypatch.setattr(schema, "ipc", SimpleNamespace(MessageReader=Reader))
    schema.check_decoded_size("samples", plain)
    schema.check_decoded_size("samples", legacy)
    assert opened == [legacy]
    monkeypatch.setattr(schema, "MAX_ROWS_PER_BATCH", 2)
    for payload in (plain, legacy):
        with pytest.raises(schema.SchemaError, match="samples: more than 2 rows"):
            schema.check_decoded_size("samples", payload)
    assert opened == [legacy, plain, legacy]
    with pytest.raises(pa.ArrowInvalid):
        schema.check_decoded_size("samples", plain[: len(plain) // 2])
    assert opened[-1] == plain[: len(plain) // 2]


@pytest.mark.parametrize(
    ("event", "weights", "refused"),
    [
        ("cpu", [0, schema.MAX_WEIGHT["samples"]], None),
        ("cpu", [1, schema.MAX_WEIGHT["samples"] + 1], "cpu weight .* exceeds"),
        ("offcpu", [1, schema.MAX_WEIGHT["samples"] + 1, schema.MAX_WEIGHT["ns"]], None),
        ("offcpu", [schema.MAX_WEIGHT["ns"] + 1], "offcpu weight .* exceeds"),
        ("cpu", [5, -1], "negative weight"),
        ("cpu", [-(2**63), 2**63 - 1], "negative weight"),
    ],
)
def test_weights_past_the_one_pass_for_all_bounds(
    event: str, weights: list[int], refused: str | None
) -> None:
    """Weights read unsigned against the lightest bound first: a negative one is past it,
    and one past it is looked at again against its event's own bound."""
    rows = pa.table({"weight": pa.array(weights, pa.int64()), "event": [event] * len(weights)})
    if refused:
        with pytest.raises(schema.SchemaError, match=refused):
            check_weights(rows)
    else:
        check_weights(rows)
