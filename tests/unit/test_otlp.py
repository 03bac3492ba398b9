"""OTLP profiles in and out: a real OTLP/gRPC client (opentelemetry-proto's messages and
stub) exports to an aggregator's --otlp-listen; `.otlp.pb` and `fleetprof export` send
fleetprof's samples back out; hostile requests are refused whole."""

from __future__ import annotations

import gzip
import logging
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pyarrow as pa
import pytest
from opentelemetry.proto.collector.profiles.v1development import (
    profiles_service_pb2,
    profiles_service_pb2_grpc,
)
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.profiles.v1development import profiles_pb2

from fleetprof.aggregator import otlp_receiver
from fleetprof.aggregator.otlp_decode import decode_request
from fleetprof.aggregator.server import Aggregator
from fleetprof.aggregator.storage import ProfileStore
from fleetprof.cli import main
from fleetprof.proto import otlp, schema
from fleetprof.proto.schema import EVENT_UNITS
from fleetprof.proto.security import (
    ANYONE,
    AccessScope,
    ClientSecurity,
    NodeGrant,
    ServerSecurity,
)
from fleetprof.proto.stacks import LOST_FRAME, StackRow, stack_id, stacks_table
from fleetprof.query.render.folded import PROCESS_HEADER
from tests.unit.test_security import Pki, pki  # noqa: F401 (the fixture)
from tests.unit.test_sql_views import fill

Request = profiles_service_pb2.ExportProfilesServiceRequest


class Builder:
    """An OTLP request as a profiler would write one: a shared dictionary, each entry once."""

    def __init__(self) -> None:
        self.request = Request()
        d = self.request.dictionary
        self.d = d
        d.string_table.append("")
        for table in (
            d.mapping_table,
            d.location_table,
            d.function_table,
            d.link_table,
            d.attribute_table,
            d.stack_table,
        ):
            table.add()

    def string(self, text: str) -> int:
        table = self.d.string_table
        if text not in table:
            table.append(text)
        return list(table).index(text)

    def attribute(self, key: str, value: str | int) -> int:
        any_value = (
            common_pb2.AnyValue(string_value=value)
            if isinstance(value, str)
            else common_pb2.AnyValue(int_value=value)
        )
        self.d.attribute_table.add(key_strindex=self.string(key), value=any_value)
        return len(self.d.attribute_table) - 1

    def location(self, names: list[str], binary: str, frame_type: str) -> int:
        self.d.mapping_table.add(filename_strindex=self.string(binary))
        lines = []
        for name in names:
            self.d.function_table.add(name_strindex=self.string(name))
            lines.append(profiles_pb2.Line(function_index=len(self.d.function_table) - 1))
        self.d.location_table.add(
            mapping_index=len(self.d.mapping_table) - 1,
            lines=lines,
            attribute_indices=[self.attribute("profile.frame.type", frame_type)],
        )
        return len(self.d.location_table) - 1

    def stack(self, locations: list[int]) -> int:
        self.d.stack_table.add(location_indices=locations)
        return len(self.d.stack_table) - 1

    def profile(
        self, resource: dict[str, str], sample_type: tuple[str, str], period: bool = False
    ) -> profiles_pb2.Profile:
        added = self.request.resource_profiles.add()
        for key, value in resource.items():
            added.resource.attributes.add(key=key, value=common_pb2.AnyValue(string_value=value))
        profile = added.scope_profiles.add().profiles.add()
        profile.sample_type.type_strindex = self.string(sample_type[0])
        profile.sample_type.unit_strindex = self.string(sample_type[1])
        if period:
            profile.period_type.type_strindex = self.string("cpu")
            profile.period_type.unit_strindex = self.string("nanoseconds")
            profile.period = 20_000_000
        profile.time_unix_nano = time.time_ns() - 10 * 10**9
        profile.duration_nano = 5 * 10**9
        return profile


RESOURCE = {
    "host.name": "otel-node",
    "service.name": "checkout",
    "k8s.namespace.name": "shop",
    "k8s.pod.name": "checkout-7d9f",
    "k8s.container.name": "app",
    "container.id": "3f2a",  # no column: dropped, and said so
}
# root first, as fleetprof stores them: memcpy was inlined into compute (one location)
FRAMES = ["main", "compute", "memcpy", "do_syscall_64"]


def otel_request(resource: dict[str, str] | None = None) -> Request:
    """What the OpenTelemetry eBPF profiler sends: samples/count at a CPU period, process
    and thread attributes on samples, a kernel frame, and an off-CPU profile (events in
    nanoseconds, no period); plus a heap profile fleetprof has no event for."""
    b = Builder()
    kernel = b.location(["do_syscall_64"], "[kernel.kallsyms]", "kernel")
    inlined = b.location(["memcpy", "compute"], "/usr/bin/app", "native")
    main_ = b.location(["main"], "/usr/bin/app", "native")
    stack = b.stack([kernel, inlined, main_])  # leaf first
    process = [
        b.attribute("process.pid", 4242),
        b.attribute("thread.id", 4243),
        b.attribute("process.executable.name", "app"),
    ]
    cpu = b.profile(resource or RESOURCE, ("samples", "count"), period=True)
    cpu.samples.add(stack_index=stack, attribute_indices=process, values=[7])
    start = cpu.time_unix_nano
    cpu.samples.add(
        stack_index=stack,
        attribute_indices=process,
        timestamps_unix_nano=[start + 10**9, start + 2 * 10**9, start + 2 * 10**9 + 5],
    )
    off_cpu = b.profile(resource or RESOURCE, ("events", "nanoseconds"))
    off_cpu.samples.add(stack_index=stack, attribute_indices=process, values=[1_500_000])
    heap = b.profile(resource or RESOURCE, ("alloc_space", "bytes"))
    heap.samples.add(stack_index=stack, attribute_indices=process, values=[4096])
    return b.request


VALID = otel_request().SerializeToString()


@pytest.fixture
def receiving(tmp_path: Path) -> Iterator[Aggregator]:
    server = Aggregator(
        tmp_path / "otlp.duckdb",
        "127.0.0.1:0",
        otlp_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
    )
    server.start()
    yield server
    server.stop(grace_s=0)


def export(
    aggregator: Aggregator, request: Request | bytes, token: str | None = None
) -> profiles_service_pb2.ExportProfilesServiceResponse:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(aggregator.otlp.address) as channel:
        if isinstance(request, bytes):  # as sent, however malformed
            call = channel.unary_unary(
                "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export",
                response_deserializer=profiles_service_pb2.ExportProfilesServiceResponse.FromString,
            )
            return call(request, timeout=30, metadata=metadata)
        stub = profiles_service_pb2_grpc.ProfilesServiceStub(channel)
        return stub.Export(request, timeout=30, metadata=metadata)


def sql(aggregator: Aggregator, query: str) -> list[tuple]:
    return sql_store(aggregator.store, query)


def sql_store(store: ProfileStore, query: str) -> list[tuple]:
    cur = store.reader()
    try:
        return cur.execute(query).fetchall()
    finally:
        cur.close()


SAMPLES_SQL = """
    SELECT node, pid, tid, comm, job, namespace, pod, container, event, sum(weight)::BIGINT
    FROM samples GROUP BY ALL ORDER BY event
"""
EXPECTED = [
    ("otel-node", 4242, 4243, "app", "checkout", "shop", "checkout-7d9f", "app", "cpu", 10),
    (
        "otel-node",
        4242,
        4243,
        "app",
        "checkout",
        "shop",
        "checkout-7d9f",
        "app",
        "offcpu",
        1_500_000,
    ),
]


def test_a_real_otlp_client_export_becomes_samples_once(
    receiving: Aggregator, tmp_path: Path
) -> None:
    request = otel_request()
    response = export(receiving, request)
    # the heap profile and container.id have no place in fleetprof: said so, not guessed
    assert response.partial_success.rejected_profiles == 1
    assert "alloc_space/bytes" in response.partial_success.error_message
    assert "attribute container.id" in response.partial_success.error_message
    assert sql(receiving, SAMPLES_SQL) == EXPECTED
    (stack,) = sql(receiving, "SELECT DISTINCT frames, modules, kinds FROM stacks")
    assert stack == (
        FRAMES,
        ["app", "app", "app", "[kernel.kallsyms]"],
        ["native", "native", "inlined", "kernel"],
    )
    # the timestamped sample's observations are filed under their seconds
    seconds = sql(receiving, "SELECT count(DISTINCT ts) FROM samples WHERE event = 'cpu'")
    assert seconds == [(3,)]

    # a retried export counts once
    export(receiving, request)
    assert sql(receiving, SAMPLES_SQL) == EXPECTED

    folded = tmp_path / "cpu.folded"
    address = receiving.address
    assert main(["flamegraph", "--aggregator", address, "-o", str(folded)]) == 0
    assert folded.read_text() == f"{PROCESS_HEADER}\napp;" + ";".join(FRAMES) + " 10\n"
    off = tmp_path / "off.folded"
    args = ["flamegraph", "--aggregator", address, "--event", "offcpu", "-o", str(off)]
    assert main(args) == 0
    assert off.read_text() == f"{PROCESS_HEADER}\napp;" + ";".join(FRAMES) + " 1500000\n"


def test_data_without_a_column_is_logged_once(
    receiving: Aggregator, caplog: pytest.LogCaptureFixture
) -> None:
    # a key of this test's own: each kind is logged once per process, whichever test sent it
    key = f"test.unlogged.{uuid.uuid4().hex}"
    caplog.set_level(logging.WARNING, logger=otlp_receiver.__name__)
    for node in ("first", "second"):
        export(receiving, otel_request({**RESOURCE, "host.name": node, key: "x"}))
    logged = [record.getMessage() for record in caplog.records if key in record.getMessage()]
    assert len(logged) == 1 and "not stored" in logged[0], logged


@pytest.mark.parametrize("event", sorted(EVENT_UNITS))
def test_every_event_goes_out_and_comes_back_as_itself(tmp_path: Path, event: str) -> None:
    b = Builder()
    stack = b.stack([b.location(["work"], "/usr/bin/app", "native")])
    profile = b.profile(RESOURCE, otlp.EVENT_SAMPLE_TYPES[event])
    profile.samples.add(stack_index=stack, values=[3])
    db = tmp_path / "p.duckdb"
    store = ProfileStore(db)
    try:
        otlp_receiver.export(store, b.request.SerializeToString(), ANYONE)
    finally:
        store.close()
    out = tmp_path / "out.otlp.pb"
    assert main(["flamegraph", "--db", str(db), "--event", event, "-o", str(out)]) == 0
    (batch,) = decode_request(out.read_bytes()).batches
    samples = schema.decode_samples(batch.samples, batch.schema_version).to_pylist()
    assert [(row["event"], row["weight"]) for row in samples] == [(event, 3)]


def post(
    aggregator: Aggregator,
    body: bytes,
    content_type: str,
    encoding: str = "",
    token: str | None = None,
) -> tuple[int, bytes]:
    headers = {"Content-Type": content_type}
    if encoding:
        headers["Content-Encoding"] = encoding
    if token:
        headers["Authorization"] = f"Bearer {token}"
    http = urllib.request.Request(
        f"{aggregator.web.url}v1development/profiles", data=body, headers=headers
    )
    try:
        with urllib.request.urlopen(http, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_otlp_over_http(receiving: Aggregator) -> None:
    request = otel_request().SerializeToString()
    # gzipped, as the Collector's OTLP/HTTP exporter sends by default
    status, body = post(receiving, gzip.compress(request), "application/x-protobuf", "gzip")
    assert status == 200
    response = profiles_service_pb2.ExportProfilesServiceResponse.FromString(body)
    assert response.partial_success.rejected_profiles == 1
    assert post(receiving, request, "application/x-protobuf")[0] == 200  # a retry: once
    assert sql(receiving, SAMPLES_SQL) == EXPECTED
    status, body = post(receiving, request[:-3], "application/x-protobuf")
    assert status == 400
    # google.rpc.Status {code, message}: its fields are those of a partial success
    problem = profiles_service_pb2.ExportProfilesPartialSuccess.FromString(body)
    assert problem.rejected_profiles == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "malformed" in problem.error_message
    assert post(receiving, b"{}", "application/json")[0] == 415
    bomb = gzip.compress(b"\0" * (schema.MAX_MESSAGE_BYTES + 1))
    status, body = post(receiving, bomb, "application/x-protobuf", "gzip")
    assert status == 400
    assert (
        "once decompressed"
        in profiles_service_pb2.ExportProfilesPartialSuccess.FromString(body).error_message
    )
    assert sql(receiving, SAMPLES_SQL) == EXPECTED


def folded_of(request: Request) -> Counter[str]:
    """Folded stacks (process name as the root) of an OTLP request, read with the
    official messages alone."""
    d = request.dictionary
    strings = d.string_table
    folded: Counter[str] = Counter()
    for resource in request.resource_profiles:
        for scope in resource.scope_profiles:
            for profile in scope.profiles:
                for sample in profile.samples:
                    attributes = {
                        strings[d.attribute_table[i].key_strindex]: d.attribute_table[i].value
                        for i in sample.attribute_indices
                    }
                    leaf_first = [
                        strings[d.function_table[line.function_index].name_strindex]
                        for index in d.stack_table[sample.stack_index].location_indices
                        for line in d.location_table[index].lines
                    ]
                    comm = attributes["process.executable.name"].string_value
                    folded[";".join([comm, *leaf_first[::-1]])] += sum(sample.values)
    return folded


def test_otlp_file_holds_the_folded_graph(tmp_path: Path) -> None:
    db = tmp_path / "p.duckdb"
    store = ProfileStore(db)
    fill(store)
    store.close()
    for suffix in ("folded", "otlp.pb"):
        assert main(["flamegraph", "--db", str(db), "-o", str(tmp_path / f"g.{suffix}")]) == 0
    header, *lines = (tmp_path / "g.folded").read_text().splitlines()
    assert header == PROCESS_HEADER
    expected = Counter({line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in lines})
    request = Request.FromString((tmp_path / "g.otlp.pb").read_bytes())
    assert folded_of(request) == expected
    # one dictionary shared by every resource: each string once
    strings = list(request.dictionary.string_table)
    assert strings[0] == "" and len(strings) == len(set(strings))
    nodes = {
        kv.value.string_value
        for resource in request.resource_profiles
        for kv in resource.resource.attributes
        if kv.key == "host.name"
    }
    assert nodes == {"node-a", "node-b"}


def test_otlp_round_trip_keeps_inlined_frames(receiving: Aggregator, tmp_path: Path) -> None:
    export(receiving, otel_request())
    second = Aggregator(tmp_path / "second.duckdb", "127.0.0.1:0", otlp_listen="127.0.0.1:0")
    second.start()
    try:
        args = ["export", "--aggregator", receiving.address, "--otlp-endpoint"]
        assert main([*args, second.otlp.address]) == 0
        assert main([*args, second.otlp.address, "--event", "offcpu"]) == 0
        assert sql(second, SAMPLES_SQL) == EXPECTED
        out = tmp_path / "again.otlp.pb"
        assert main(["flamegraph", "--aggregator", second.address, "-o", str(out)]) == 0
    finally:
        second.stop(grace_s=0)
    request = Request.FromString(out.read_bytes())
    assert folded_of(request) == Counter({"app;" + ";".join(FRAMES): 10})
    d = request.dictionary
    (profile,) = request.resource_profiles[0].scope_profiles[0].profiles
    locations = [
        d.location_table[i] for i in d.stack_table[profile.samples[0].stack_index].location_indices
    ]
    # leaf first, as sent: memcpy is still a line of compute's location, not a caller
    lines = [
        [d.string_table[d.function_table[line.function_index].name_strindex] for line in at.lines]
        for at in locations
    ]
    assert lines == [["do_syscall_64"], ["memcpy", "compute"], ["main"]]
    frame_types = [
        d.attribute_table[at.attribute_indices[0]].value.string_value for at in locations
    ]
    assert frame_types == ["kernel", "native", "native"]
    mappings = [
        d.string_table[d.mapping_table[at.mapping_index].filename_strindex] for at in locations
    ]
    assert mappings == ["[kernel.kallsyms]", "app", "app"]


# The OpenTelemetry eBPF profiler's CPython frames (interpreter/python/python.go): the
# function's name is the code object's qualname, its file name co_filename, the line's
# number the line being run; no mapping, frame type cpython. Leaf first.
PY_FRAMES = [
    ("Reader.decode", "/usr/lib/python3.11/json/decoder.py", 353),
    ("transform", "/srv/etl/jobs/clean.py", 42),
    ("<module>", "/srv/etl/run.py", 7),
]
# What fleetprof's agent stores for them (docs/python.md), root first
PY_STORED = [
    ("Py_RunMain", "python3.11", "native"),
    ("run.<module>", "/srv/etl/run.py:7", "python"),
    ("clean.transform", "/srv/etl/jobs/clean.py:42", "python"),
    ("json.decoder.Reader.decode", "/usr/lib/python3.11/json/decoder.py:353", "python"),
]


def python_request() -> Request:
    b = Builder()
    locations = []
    for qualname, filename, line in PY_FRAMES:
        b.d.function_table.add(
            name_strindex=b.string(qualname), filename_strindex=b.string(filename)
        )
        b.d.location_table.add(
            lines=[profiles_pb2.Line(function_index=len(b.d.function_table) - 1, line=line)],
            attribute_indices=[b.attribute("profile.frame.type", "cpython")],
        )
        locations.append(len(b.d.location_table) - 1)
    main_ = b.location(["Py_RunMain"], "/usr/bin/python3.11", "native")
    stack = b.stack([*locations, main_])
    process = [b.attribute("process.pid", 77), b.attribute("process.executable.name", "python3")]
    cpu = b.profile({"host.name": "py-node"}, ("samples", "count"), period=True)
    cpu.samples.add(stack_index=stack, attribute_indices=process, values=[5])
    return b.request


def leaf_locations(request: Request) -> list[tuple[str, str, str, int, str]]:
    """(frame type, function name, file name, line, mapping) of the first sample's stack's
    locations' last lines, leaf first."""
    d = request.dictionary
    strings = d.string_table
    (profile,) = request.resource_profiles[0].scope_profiles[0].profiles
    found = []
    for index in d.stack_table[profile.samples[0].stack_index].location_indices:
        location = d.location_table[index]
        attributes = {
            strings[d.attribute_table[i].key_strindex]: d.attribute_table[i].value.string_value
            for i in location.attribute_indices
        }
        line = location.lines[-1]
        function = d.function_table[line.function_index]
        found.append(
            (
                attributes.get("profile.frame.type", ""),
                strings[function.name_strindex],
                strings[function.filename_strindex],
                line.line,
                strings[d.mapping_table[location.mapping_index].filename_strindex],
            )
        )
    return found


def test_otel_cpython_frames_are_python_frames(receiving: Aggregator, tmp_path: Path) -> None:
    response = export(receiving, python_request())
    assert response.partial_success.rejected_profiles == 0
    (stack,) = sql(receiving, "SELECT frames, modules, kinds FROM stacks")
    assert list(zip(*stack, strict=True)) == PY_STORED
    # found by SQL as the agent's Python frames are (docs/python.md)
    by_function = sql(
        receiving,
        """SELECT f.function, f.module, sum(s.weight)::BIGINT
           FROM samples s JOIN frames f USING (stack_id)
           WHERE f.kind = 'python' AND f.module LIKE '/srv/%' GROUP BY ALL ORDER BY 1""",
    )
    assert by_function == [
        ("clean.transform", "/srv/etl/jobs/clean.py:42", 5),
        ("run.<module>", "/srv/etl/run.py:7", 5),
    ]

    # and out again as the profiler sent them: OTLP -> fleetprof -> OTLP
    out = tmp_path / "py.otlp.pb"
    assert main(["flamegraph", "--aggregator", receiving.address, "-o", str(out)]) == 0
    assert leaf_locations(Request.FromString(out.read_bytes())) == [
        *(("cpython", qualname, filename, line, "") for qualname, filename, line in PY_FRAMES),
        ("native", "Py_RunMain", "", 0, "python3.11"),
    ]


def test_every_frame_kind_survives_an_otlp_round_trip(
    receiving: Aggregator, tmp_path: Path
) -> None:
    """fleetprof -> OTLP -> fleetprof: each kind comes back as itself. Those OTLP has a
    frame type for go out with it; the others (their runtime unknown) with fleetprof's."""
    root_first = [
        LOST_FRAME,
        ("[libfoo.so]", "libfoo.so", "unknown"),
        ("start_thread", "libc.so.6", "native"),
        ("Interpreter", "Interpreter", "interpreted"),
        ("com.acme.Server.handle", "void com.acme.Server.handle()", "jit"),
        # an inlined line leaves with its location's module, and comes back with it
        ("com.acme.Cache.get", "void com.acme.Server.handle()", "inlined"),
        ("app.<module>", "/srv/app.py:3", "python"),
        ("app.Job.run", "/srv/app.py:10", "python"),
        ("[python code 0x7f00]", "", "python"),
        ("ksys_read", "[kernel.kallsyms]", "kernel"),
    ]
    row = StackRow(*(tuple(column) for column in zip(*root_first, strict=True)))
    db = tmp_path / "kinds.duckdb"
    store = ProfileStore(db)
    sample = {"ts": datetime.now(UTC), "pid": 9, "tid": 9, "comm": "app", "event": "cpu",
              "stack_id": stack_id(row), "weight": 3}  # fmt: skip
    samples = pa.Table.from_pylist([sample], schema=schema.SAMPLES)
    store.append("agent-n", 1, "n", samples, stacks_table({stack_id(row): row}))
    store.close()
    out = tmp_path / "kinds.otlp.pb"
    assert main(["flamegraph", "--db", str(db), "-o", str(out)]) == 0
    request = Request.FromString(out.read_bytes())
    assert leaf_locations(request) == [
        ("kernel", "ksys_read", "", 0, "[kernel.kallsyms]"),
        ("cpython", "[python code 0x7f00]", "", 0, ""),
        ("cpython", "Job.run", "/srv/app.py", 10, ""),
        ("cpython", "<module>", "/srv/app.py", 3, ""),
        ("", "com.acme.Server.handle", "", 0, "void com.acme.Server.handle()"),
        ("", "Interpreter", "", 0, "Interpreter"),
        ("native", "start_thread", "", 0, "libc.so.6"),
        ("", "[libfoo.so]", "", 0, "libfoo.so"),
        ("", "[lost stack]", "", 0, ""),
    ]
    assert export(receiving, request).partial_success.rejected_profiles == 0
    assert sql(receiving, "SELECT frames, modules, kinds FROM stacks") == [tuple(map(list, row))]


def test_otlp_senders_prove_their_nodes_as_agents_do(tmp_path: Path) -> None:
    """Agent credentials (docs/security.md): an agent token writes the nodes it names, a
    query token that sees everything any node, a query token of some namespaces none; over
    gRPC and HTTP alike, and a refused request stores nothing."""
    security = ServerSecurity(
        tokens={"all": None, "shop": AccessScope(namespaces=frozenset({"shop"}))},
        agents={"otel-agent": NodeGrant("token of line 1", ("otel-*",))},
    )
    server = Aggregator(
        tmp_path / "t.duckdb",
        "127.0.0.1:0",
        security=security,
        otlp_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
    )
    server.start()
    try:
        for token in (None, "wrong", "shop"):
            with pytest.raises(grpc.RpcError) as refused:
                export(server, otel_request(), token=token)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
            assert post(server, VALID, "application/x-protobuf", token=token)[0] == 401, token
        elsewhere = otel_request({**RESOURCE, "host.name": "db-7"})
        with pytest.raises(grpc.RpcError) as outside:
            export(server, elsewhere, token="otel-agent")
        assert outside.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "may not write node 'db-7'" in outside.value.details()
        status, body = post(
            server, elsewhere.SerializeToString(), "application/x-protobuf", token="otel-agent"
        )
        assert status == 403
        assert (
            "db-7"
            in profiles_service_pb2.ExportProfilesPartialSuccess.FromString(body).error_message
        )
        assert sql(server, "SELECT count(*) FROM samples") == [(0,)]
        export(server, otel_request(), token="otel-agent")
        assert (
            post(server, elsewhere.SerializeToString(), "application/x-protobuf", token="all")[0]
            == 200
        )
        nodes = sql(server, "SELECT DISTINCT node FROM samples ORDER BY node")
        assert nodes == [("db-7",), ("otel-node",)]
    finally:
        server.stop(grace_s=0)


def test_otlp_http_is_closed_where_grpc_demands_certificates(tmp_path: Path) -> None:
    """The web server asks for no client certificate: under a client CA without any token
    credential, OTLP/HTTP refuses everyone rather than take what gRPC would refuse."""
    store = ProfileStore(tmp_path / "p.duckdb")
    try:
        security = ServerSecurity(client_ca=str(tmp_path / "ca.pem"))
        status, body = otlp_receiver.http_export(store, security, [], VALID, "")
        assert status == 401
        problem = profiles_service_pb2.ExportProfilesPartialSuccess.FromString(body)
        assert "client certificates" in problem.error_message
        assert sql_store(store, "SELECT count(*) FROM samples") == [(0,)]
    finally:
        store.close()


def test_export_over_mutual_tls_with_a_token(
    tmp_path: Path,
    pki: Pki,  # noqa: F811
) -> None:
    db = tmp_path / "p.duckdb"
    store = ProfileStore(db)
    fill(store)
    store.close()
    security = ServerSecurity(
        cert=str(pki.server_cert),
        key=str(pki.server_key),
        client_ca=str(pki.ca),
        tokens={"secret": None},
    )
    server = Aggregator(
        tmp_path / "t.duckdb", "127.0.0.1:0", security=security, otlp_listen="127.0.0.1:0"
    )
    server.start()
    try:
        args = ["export", "--db", str(db), "--otlp-endpoint", server.otlp.address]
        tls = ["--otlp-tls-ca", str(pki.ca)]
        client = ["--otlp-tls-cert", str(pki.agent_cert), "--otlp-tls-key", str(pki.agent_key)]
        assert main([*args, *tls, "--otlp-token", "secret"]) == 2  # no client certificate
        assert sql(server, "SELECT count(*) FROM samples") == [(0,)]
        # a certificate of the client CA writes as an agent's does (no node names in
        # agent credentials); the same export again with a token counts once
        assert main([*args, *tls, *client]) == 0
        assert main([*args, *tls, *client, "--otlp-token", "secret"]) == 0
        assert sql(server, "SELECT sum(weight) FROM samples") == sql_db(
            db, "SELECT sum(weight) FROM samples WHERE event = 'cpu'"
        )
        # the channel the tests use is that of ClientSecurity: the same refusal
        plain = ClientSecurity(ca=str(pki.ca), token="secret")
        with plain.channel(server.otlp.address) as channel:
            stub = profiles_service_pb2_grpc.ProfilesServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Export(otel_request(), timeout=10, metadata=plain.metadata())
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace_s=0)


def sql_db(db: Path, query: str) -> list[tuple]:
    store = ProfileStore(db)
    try:
        return sql_store(store, query)
    finally:
        store.close()


def first_profile(request: Request) -> profiles_pb2.Profile:
    return request.resource_profiles[0].scope_profiles[0].profiles[0]


def hostile_requests() -> Iterator[tuple[str, bytes]]:
    """(what the refusal says, a request) for each kind of bad input."""
    yield "malformed", b"\x0a\xff\xff\xff\xff\x0f"

    def mutated(change: Callable[[Request, profiles_pb2.Sample], object]) -> bytes:
        request = otel_request()
        change(request, first_profile(request).samples[0])
        return request.SerializeToString()

    def mismatched(_: Request, sample: profiles_pb2.Sample) -> None:
        sample.timestamps_unix_nano.append(1)
        sample.values.extend([1, 2])

    def future(request: Request, _: profiles_pb2.Sample) -> None:
        first_profile(request).time_unix_nano = time.time_ns() + 3600 * 10**9

    def huge(request: Request, _: profiles_pb2.Sample) -> None:
        request.dictionary.string_table.extend([""] * 1_000_001)

    yield "stack_table index 99", mutated(lambda _, s: setattr(s, "stack_index", 99))
    yield (
        "location_table index 77",
        mutated(lambda r, _: r.dictionary.stack_table[1].location_indices.append(77)),
    )
    yield (
        "function_table index -3",
        mutated(
            lambda r, _: setattr(r.dictionary.location_table[1].lines[0], "function_index", -3)
        ),
    )
    yield (
        "string_table (attribute key) index 5000",
        mutated(lambda r, _: setattr(r.dictionary.attribute_table[1], "key_strindex", 5000)),
    )
    yield "attribute_table index 123", mutated(lambda _, s: s.attribute_indices.append(123))
    yield (
        "mapping_table index 9",
        mutated(lambda r, _: setattr(r.dictionary.location_table[2], "mapping_index", 9)),
    )
    yield (
        "string_table[0] must be the empty string",
        mutated(lambda r, _: r.dictionary.string_table.__setitem__(0, "x")),
    )
    yield "string_table has more than 1000000 entries", mutated(huge)
    yield "3 values but 1 timestamps", mutated(mismatched)
    yield "negative value", mutated(lambda _, s: s.values.append(-5))
    yield (
        "process.pid 1099511627776 out of range",
        mutated(lambda r, _: setattr(r.dictionary.attribute_table[4].value, "int_value", 2**40)),
    )
    yield "neither values nor timestamps", mutated(lambda _, s: s.ClearField("values"))
    yield "in the future", mutated(future)

    # nesting (the only way a request refers to itself) past the parser's depth limit,
    # written by hand: the library refuses to build it
    def field(number: int, body: bytes) -> bytes:
        return _varint(number << 3 | 2) + _varint(len(body)) + body

    nested = common_pb2.AnyValue(string_value="x").SerializeToString()
    for _ in range(200):
        nested = field(5, field(1, nested))  # AnyValue.array_value.values[0]
    attribute = field(1, b"deep") + field(2, nested)  # KeyValue
    yield "malformed", VALID + field(1, field(1, field(1, attribute)))

    # a good node then a bad one: the good one is not stored either
    def second_node_bad(request: Request, _: profiles_pb2.Sample) -> None:
        bad = otel_request({**RESOURCE, "host.name": "x" * 300})
        request.resource_profiles.extend(bad.resource_profiles)

    yield "node must have 1 to 256 characters", mutated(second_node_bad)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def test_hostile_otlp_requests_are_refused_whole(receiving: Aggregator) -> None:
    for reason, payload in hostile_requests():
        with pytest.raises(grpc.RpcError) as refused:
            export(receiving, payload)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, reason
        assert reason in refused.value.details(), (reason, refused.value.details())
        assert sql(receiving, "SELECT count(*) FROM ingested_batches") == [(0,)], reason
    # still up, and a good request after all that is stored
    export(receiving, otel_request())
    assert sql(receiving, SAMPLES_SQL) == EXPECTED
