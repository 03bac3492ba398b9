"""Profiles from other tools as fleetprof samples: folded stacks and pprof files.

A file becomes ordinary ingest batches (the same Arrow schemas and stack ids an agent
sends), stored through the normal write path: gRPC to an aggregator, or
`ingest_service.store_batch` on a database file. The agent id is a hash of the file and
the import's node and event, so importing the same file again is acknowledged as a
duplicate and counts once.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pyarrow as pa

from fleetprof.proto import schema
from fleetprof.proto.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from fleetprof.proto.pprof import profile_pb2
from fleetprof.proto.security import ClientSecurity
from fleetprof.proto.stacks import StackRow, fit_depth, stack_id, stacks_table
from fleetprof.query.render.folded import PROCESS_HEADER

STACKS_PER_BATCH = 20_000
# flamegraph.pl's frame annotations (perf script | stackcollapse-perf.pl --all)
_ANNOTATIONS = {"_[k]": "kernel", "_[j]": "jit", "_[i]": "native", "_[w]": "unknown"}
_MODULE_KINDS = {
    "[kernel]": "kernel",
    "[kernel.kallsyms]": "kernel",
    "vmlinux": "kernel",
    "[jit]": "jit",
}
_FOLDED_LINE = re.compile(rb"^(.*\S)\s+(\d+)\s*$")


@dataclass(frozen=True)
class Imported:
    """One profile read from a file: (stack, process name, pid, weight) rows."""

    ts: datetime
    rows: list[tuple[StackRow, str, int, int]]


def parse_folded(data: bytes, comm: str, ts: datetime) -> Imported:
    """`frame;frame;frame count` lines, root first (flamegraph.pl's input). Under
    fleetprof's own header (render/folded.py) the first frame is the process name."""
    lines = data.splitlines()
    by_process = bool(lines) and lines[0].decode("utf-8", "replace").strip() == PROCESS_HEADER
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith(b"#"):
            continue
        match = _FOLDED_LINE.match(line)
        if not match:
            raise ValueError(f"line {number}: not `frame;frame;... count`: {line[:80]!r}")
        names = match[1].decode("utf-8", "surrogateescape").split(";")
        if not all(name.strip() for name in names):
            raise ValueError(f"line {number}: an empty frame name (`;;`): {line[:80]!r}")
        process = names.pop(0) if by_process else comm  # alone: samples without a stack
        frames = []
        for name in names:
            kind = _ANNOTATIONS.get(name[-4:])
            frames.append((name[:-4], "", kind) if kind else (name, "", "unknown"))
        rows.append((fit_stack(frames), process, 0, int(match[2])))
    return Imported(ts, rows)


def parse_pprof(data: bytes, event_unit: str, comm: str, ts: datetime) -> Imported:
    """A profile.proto message, gzipped or not. The value taken from each sample is the
    first sample type in the event's unit: `count` for sampled events, `nanoseconds` for
    time-weighted ones. `comm` and `pid` labels, when present, name the process."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    profile = profile_pb2.Profile.FromString(data)
    strings = profile.string_table
    wanted = "count" if event_unit == "samples" else "nanoseconds"
    units = [strings[t.unit] for t in profile.sample_type]
    if wanted not in units:
        types = ", ".join(f"{strings[t.type]}/{strings[t.unit]}" for t in profile.sample_type)
        raise ValueError(f"no sample type in {wanted} (this profile has: {types or 'none'})")
    value_index = units.index(wanted)
    modules = {m.id: module_name(strings[m.filename]) for m in profile.mapping}
    functions = {f.id: strings[f.name] or strings[f.system_name] for f in profile.function}
    locations = {
        location.id: location_frames(
            [functions.get(line.function_id, "") for line in location.line],
            modules.get(location.mapping_id, ""),
            location.address,
        )
        for location in profile.location
    }
    if profile.time_nanos:
        ts = datetime.fromtimestamp((profile.time_nanos + profile.duration_nanos) / 1e9, UTC)
    main = modules.get(profile.mapping[0].id) if profile.mapping else None
    rows = []
    for sample in profile.sample:
        weight = sample.value[value_index]
        if weight <= 0:
            continue
        labels = {strings[label.key]: label for label in sample.label}
        process = strings[labels["comm"].str] if "comm" in labels else main or comm
        pid = labels["pid"].num if "pid" in labels else 0
        leaf_first = [f for location_id in sample.location_id for f in locations[location_id]]
        rows.append((fit_stack(leaf_first[::-1]), process, pid, weight))
    return Imported(ts, rows)


def read_profile(path: Path, event_unit: str) -> Imported:
    """A folded (`.folded`, `.collapsed`, `.txt`) or pprof (anything else) file."""
    data = path.read_bytes()
    ts = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    name = path.name.lower()
    comm = path.name.split(".")[0] or "imported"
    if name.endswith((".folded", ".collapsed", ".txt")):
        return parse_folded(data, comm, ts)
    return parse_pprof(data, event_unit, comm, ts)


def module_name(filename: str) -> str:
    """A mapping's file as the agent names a module: its file name ("libc.so.6");
    pseudo-files ("[vdso]") stay whole."""
    return filename if filename.startswith("[") else Path(filename).name


def location_frames(
    names: list[str], module: str, address: int, kind: str | None = None
) -> list[tuple[str, str, str]]:
    """The leaf-first (name, module, kind) frames of one pprof or OTLP location: one per
    line, inlined callees first; a location without names is `[module+0xADDRESS]`. The
    last line is the code that runs there, of `kind` or, without one, the module's (kernel,
    or native code when there is a module); the lines before it were inlined into it, of
    kind "inlined", as the agents store the JIT's inlining (renderers join them again)."""
    if kind is None:
        kind = _MODULE_KINDS.get(module, "native" if module else "unknown")
    fallback = f"[{module or 'unknown'}+0x{address:x}]"
    *inlined, caller = [name or fallback for name in names] or [fallback]
    return [*((name, module, "inlined") for name in inlined), (caller, module, kind)]


def fit_stack(frames: list[tuple[str, str, str]]) -> StackRow:
    """Root-first frames fitted to the wire limits: at most MAX_FRAMES_PER_STACK (the
    outermost callers give way to a "[truncated]" frame), names of MAX_STRING_BYTES."""
    frames = list(fit_depth(frames))
    if not frames:
        return StackRow((), (), ())
    names, modules, kinds = zip(*map(fit_frame, frames), strict=True)
    return StackRow(names, modules, kinds)


def fit_frame(frame: tuple[str, str, str]) -> tuple[str, str, str]:
    """A frame with its name and module cut to what a batch accepts."""
    limit = schema.MAX_STRING_BYTES // 4  # characters of up to 4 UTF-8 bytes each
    name, module, kind = frame
    return name[:limit], module[:limit], kind


def batches(
    profile: Imported, path: Path, node: str, event: str
) -> Iterator[ingest_pb2.IngestBatch]:
    """The profile as ingest batches of at most STACKS_PER_BATCH distinct stacks each."""
    digest = hashlib.blake2b(path.read_bytes(), digest_size=12)
    digest.update(f"\0{node}\0{event}".encode())
    agent_id = f"import-{digest.hexdigest()}"
    merged: dict[tuple[int, str, int], int] = {}
    stacks: dict[int, StackRow] = {}
    for stack, comm, pid, weight in profile.rows:
        key = stack_id(stack)
        stacks[key] = stack
        merged[(key, comm, pid)] = merged.get((key, comm, pid), 0) + weight
    ids = list(stacks)
    for sequence, start in enumerate(range(0, len(ids), STACKS_PER_BATCH), start=1):
        chunk = set(ids[start : start + STACKS_PER_BATCH])
        keys = [key for key in merged if key[0] in chunk]
        samples = schema.samples_table(
            {
                "ts": pa.array([profile.ts] * len(keys), pa.timestamp("us", tz="UTC")),
                "pid": [pid for _, _, pid in keys],
                "tid": [pid for _, _, pid in keys],
                "comm": [comm for _, comm, _ in keys],
                "event": [event] * len(keys),
                "stack_id": [key for key, _, _ in keys],
                "weight": [merged[key] for key in keys],
            }
        )
        yield ingest_pb2.IngestBatch(
            agent_id=agent_id,
            sequence=sequence,
            schema_version=schema.SCHEMA_VERSION,
            node=node,
            samples=schema.encode(samples),
            stacks=schema.encode(stacks_table({key: stacks[key] for key in chunk})),
        )


def send(
    address: str, security: ClientSecurity, to_send: Iterator[ingest_pb2.IngestBatch]
) -> list[ingest_pb2.IngestAck]:
    """Through an aggregator's IngestService, as an agent sends."""
    options = [("grpc.max_send_message_length", schema.MAX_MESSAGE_BYTES)]
    with security.channel(address, options) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        try:
            return list(stub.Ingest(to_send, timeout=300, metadata=security.metadata()))
        except grpc.RpcError as exc:
            raise ValueError(f"aggregator {address}: {exc.details() or exc.code().name}") from exc
