"""Hostile and malformed ingest: every bad batch gets a clear status; nothing stored is lost.
The same for OTLP requests (test_otlp.py has the named hostile requests)."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta

import grpc
import hypothesis.strategies as st
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings

from fleetprof.aggregator.otlp_decode import decode_request
from fleetprof.aggregator.server import Aggregator
from fleetprof.aggregator.validate import validate_batch
from fleetprof.proto import schema
from fleetprof.proto.ingest.v1 import ingest_pb2
from fleetprof.proto.stacks import StackRow, stacks_table
from tests.unit.test_ingest import batch, samples, send, totals
from tests.unit.test_otlp import VALID, Request, first_profile, otel_request


def rejected(aggregator: Aggregator, message: ingest_pb2.IngestBatch) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        send(aggregator, message)
    return error.value


def test_hostile_batches_get_clear_statuses(aggregator: Aggregator) -> None:
    send(aggregator, batch(1))
    valid = schema.encode(samples({11: 1}))
    future = samples({11: 1}).set_column(
        0, "ts", pa.array([datetime.now(UTC) + timedelta(days=365)], pa.timestamp("us", tz="UTC"))
    )
    wide = pa.table({f"c{i}": pa.array([1], pa.int8()) for i in range(20_000)})
    deep = StackRow(("f",) * 5000, ("m",) * 5000, ("native",) * 5000)
    cases = {
        "random bytes": batch(2, samples=bytes(range(256)) * 40),
        "truncated Arrow IPC": batch(2, samples=valid[: len(valid) // 2]),
        "wrong schema": batch(2, samples=schema.encode(pa.table({"weight": [1]}))),
        "many columns": batch(2, samples=schema.encode(wide)),
        "huge comm": batch(
            2,
            samples=schema.encode(
                samples({11: 1}).set_column(3, "comm", pa.array(["x" * 100_000]))
            ),
        ),
        "huge pod name": batch(
            2,
            samples=schema.encode(samples({11: 1}).set_column(10, "pod", pa.array(["p" * 5000]))),
        ),
        "negative weight": batch(2, samples=schema.encode(samples({11: -1}))),
        "future timestamp": batch(2, samples=schema.encode(future)),
        "deep stack": batch(2, stacks=schema.encode(stacks_table({99: deep}))),
        "unknown version": batch(2, schema_version=7),
        "huge agent id": batch(2, agent_id="a" * 10_000),
    }
    for name, message in cases.items():
        error = rejected(aggregator, message)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert error.details() and "\n" not in error.details(), name
    # A message over the size limit is refused by gRPC itself before any decoding.
    oversized = batch(2, samples=b"\0" * (schema.MAX_MESSAGE_BYTES + 1))
    assert rejected(aggregator, oversized).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The aggregator is still up and nothing stored before was touched.
    assert totals(aggregator) == (4, 2, 2)
    send(aggregator, batch(2))
    assert totals(aggregator) == (8, 4, 2)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.binary(max_size=4096),
    version=st.integers(min_value=0, max_value=2**32 - 1),
    agent_id=st.text(max_size=300),
)
def test_validator_never_crashes_on_garbage(payload: bytes, version: int, agent_id: str) -> None:
    """Whatever arrives, the validator accepts it or raises SchemaError: nothing else."""
    message = ingest_pb2.IngestBatch(
        agent_id=agent_id,
        sequence=1,
        schema_version=version,
        node="n",
        samples=payload,
        stacks=payload,
    )
    with contextlib.suppress(schema.SchemaError):
        validate_batch(message)


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(min_value=0, max_value=10_000), flip=st.integers(min_value=0))
def test_validator_rejects_mutated_valid_payloads(cut: int, flip: int) -> None:
    """Truncations and bit flips of a real payload are either still valid or SchemaError."""
    payload = bytearray(schema.encode(samples({11: 3, 12: 1})))
    payload = payload[: cut % (len(payload) + 1)]
    if payload:
        payload[flip % len(payload)] ^= 1 << (flip % 8)
    message = batch(1, samples=bytes(payload))
    with contextlib.suppress(schema.SchemaError):
        validate_batch(message)


def decode_and_validate(payload: bytes) -> None:
    """What the OTLP receiver does with a request before storing it."""
    for message in decode_request(payload).batches:
        validate_batch(message)


def decoded_or_refused(payload: bytes) -> None:
    """Only schema.SchemaError may come out of a request, whatever it holds."""
    with contextlib.suppress(schema.SchemaError):
        decode_and_validate(payload)


@given(payload=st.binary(max_size=4096))
@settings(max_examples=300, deadline=None)
def test_otlp_decoder_never_crashes_on_garbage(payload: bytes) -> None:
    decoded_or_refused(payload)


@given(
    cut=st.integers(min_value=0, max_value=len(VALID)), flip=st.integers(0, 255), at=st.integers(0)
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_otlp_decoder_refuses_mutated_requests_cleanly(cut: int, flip: int, at: int) -> None:
    payload = bytearray(VALID[:cut] + VALID[cut + 1 :])
    if payload:
        payload[at % len(payload)] ^= flip
    decoded_or_refused(bytes(payload))


def _sample(request: Request) -> object:
    return first_profile(request).samples[0]


# (the table an index points into, a change setting one such index of otel_request())
OTLP_INDICES = [
    ("stack_table", lambda r, i: setattr(_sample(r), "stack_index", i)),
    ("location_table", lambda r, i: r.dictionary.stack_table[1].location_indices.append(i)),
    (
        "function_table",
        lambda r, i: setattr(r.dictionary.location_table[2].lines[0], "function_index", i),
    ),
    ("mapping_table", lambda r, i: setattr(r.dictionary.location_table[2], "mapping_index", i)),
    ("attribute_table", lambda r, i: _sample(r).attribute_indices.append(i)),
    ("attribute_table", lambda r, i: r.dictionary.location_table[1].attribute_indices.append(i)),
    ("link_table", lambda r, i: setattr(_sample(r), "link_index", i)),
    ("string_table", lambda r, i: setattr(r.dictionary.function_table[1], "name_strindex", i)),
    ("string_table", lambda r, i: setattr(r.dictionary.mapping_table[1], "filename_strindex", i)),
    ("string_table", lambda r, i: setattr(r.dictionary.attribute_table[4], "key_strindex", i)),
    ("string_table", lambda r, i: setattr(first_profile(r).sample_type, "type_strindex", i)),
]


@given(
    which=st.integers(0, len(OTLP_INDICES) - 1),
    index=st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-2, 40)),
)
@settings(max_examples=400, deadline=None)
def test_otlp_dictionary_indices_out_of_range_are_refused(which: int, index: int) -> None:
    """Any index into any dictionary table: in range, the request is decoded (or refused
    for what the entry says); out of range, refused as such, never an IndexError."""
    table, change = OTLP_INDICES[which]
    request = otel_request()
    change(request, index)
    size = len(getattr(request.dictionary, table))
    in_range = index == 0 or 0 <= index < size  # 0: the zero value every table starts with
    try:
        decode_and_validate(request.SerializeToString())
    except schema.SchemaError as refused:
        # in range, the entry pointed at may still be refused (a sample type fleetprof has
        # no event for is only dropped, but a string may make a bad label)
        assert in_range or (table in str(refused) and "out of range" in str(refused)), refused
        return
    assert in_range, f"{table} index {index} of {size} entries accepted"
