"""OTLP profiles through a real `fleetprof aggregator --otlp-listen` process: an
OpenTelemetry client exports with an agent token, the samples are in the database file
the aggregator leaves, and a hostile request does not take the aggregator down.
(tests/unit/test_otlp.py covers the mapping, the formats and each refusal in-process.)"""

from __future__ import annotations

import csv
import io
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2_grpc

from tests.conftest import free_port
from tests.integration.test_faults import start_aggregator
from tests.unit.test_otlp import (
    EXPECTED,
    FRAMES,
    SAMPLES_SQL,
    VALID,
    Request,
    otel_request,
)

TOKEN = "otel-collector-7f3a"


def fleetprof(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "fleetprof", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_otlp_export_to_an_aggregator_process(tmp_path: Path) -> None:
    db, credentials = tmp_path / "otlp.duckdb", tmp_path / "agents"
    credentials.write_text(f"{TOKEN} nodes=otel-*\n")
    otlp_address = f"127.0.0.1:{free_port()}"
    options = ["--otlp-listen", otlp_address, "--agent-credentials", str(credentials)]
    aggregator = start_aggregator(db, free_port(), options=options)
    address = aggregator.args[aggregator.args.index("--listen") + 1]
    try:
        with grpc.insecure_channel(otlp_address) as channel:
            stub = profiles_service_pb2_grpc.ProfilesServiceStub(channel)
            metadata = [("authorization", f"Bearer {TOKEN}")]

            def export(request: Request) -> None:
                stub.Export(request, timeout=30, metadata=metadata)

            with pytest.raises(grpc.RpcError) as anonymous:
                stub.Export(otel_request(), timeout=30)
            assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
            hostile = Request.FromString(VALID)
            hostile.dictionary.stack_table[1].location_indices.append(10**6)
            with pytest.raises(grpc.RpcError) as refused:
                export(hostile)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert aggregator.poll() is None
            request = otel_request()
            export(request)
            export(request)  # an exporter's retry: counted once
        folded = tmp_path / "cpu.folded"
        fleetprof("flamegraph", "--aggregator", address, "-o", str(folded))
        assert folded.read_text().splitlines()[1:] == ["app;" + ";".join(FRAMES) + " 10"]
    finally:
        aggregator.send_signal(signal.SIGTERM)
        aggregator.wait(timeout=60)
    # what the aggregator left in its file, read by the CLI once it is gone
    answer = fleetprof("query", "--db", str(db), "--format", "csv", SAMPLES_SQL)
    _, *rows = csv.reader(io.StringIO(answer))
    assert rows == [[str(value) for value in row] for row in EXPECTED]
