"""OTLP profiles as ingest batches: an ExportProfilesServiceRequest becomes one IngestBatch
per node, the Arrow SAMPLES and STACKS rows and stack ids an agent sends, so that it goes
through validate_batch and the store like any agent's (aggregator/otlp_receiver.py).

The whole request is read before anything is stored: any out-of-range index, malformed
field or table past the limits raises schema.SchemaError. Sample types and attributes
with no fleetprof column are not guessed at: they are counted in `Decoded.dropped`.
Mapping (proto/otlp.py, docs/otlp.md): resource, profile and sample attributes, the most
specific winning, give node, pid, tid, comm, job, namespace, pod, container; each
location's lines become frames (inlined callees first); observations are summed per
sample and second.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.profiles.v1development import profiles_pb2

from fleetprof.aggregator.validate import MAX_ID_CHARS
from fleetprof.proto import otlp, python_frames, schema
from fleetprof.proto.ingest.v1 import ingest_pb2
from fleetprof.proto.stacks import (
    LOST_FRAME,
    StackRow,
    frame_key,
    keyed_stack_id,
    stack_id,
    stacks_table,
)
from fleetprof.query.importers import fit_frame, fit_stack, location_frames, module_name

# Hostile-input limits of one request (beyond gRPC's message size, schema.MAX_MESSAGE_BYTES).
MAX_TABLE_ENTRIES = 1_000_000  # per dictionary table
MAX_SAMPLES = 1_000_000
MAX_OBSERVATIONS = 5_000_000  # values or timestamps, over all samples
MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1
UNKNOWN_NODE = "unknown"  # no host.name (nor any other node attribute)
UNKNOWN_COMM = "[unknown]"
NANOS = 1_000_000_000

# (node, pid, tid, comm, job, namespace, pod, container)
Labels = tuple[str, int, int, str, str | None, str | None, str | None, str | None]
AttributeValue = str | int | float | bool | None


@dataclass
class Decoded:
    """A request's batches (one per node) and what had no place in them."""

    batches: list[ingest_pb2.IngestBatch] = field(default_factory=list)
    # "attribute container.id" / "sample type alloc_space/bytes" -> samples it was on
    dropped: Counter[str] = field(default_factory=Counter)
    rejected_profiles: int = 0


def decode_request(data: bytes, received: datetime | None = None) -> Decoded:
    """Read one serialized ExportProfilesServiceRequest; raises schema.SchemaError."""
    try:
        request = profiles_service_pb2.ExportProfilesServiceRequest.FromString(data)
    except (DecodeError, RecursionError) as exc:
        raise schema.SchemaError(f"malformed ExportProfilesServiceRequest: {exc}") from None
    received = received or datetime.now(UTC)
    decoded = Decoded()
    dictionary = _Dictionary(request.dictionary)
    # (labels, event) -> (second, stack id) -> weight
    rows: dict[tuple[Labels, str], Counter[tuple[int, int]]] = defaultdict(Counter)
    samples = observations = 0
    for resource_profiles in request.resource_profiles:
        resource = {
            kv.key: dictionary.value(kv.value)
            for kv in resource_profiles.resource.attributes
            if kv.key
        }
        for scope_profiles in resource_profiles.scope_profiles:
            for profile in scope_profiles.profiles:
                samples += len(profile.samples)
                if samples > MAX_SAMPLES:
                    raise schema.SchemaError(f"more than {MAX_SAMPLES} samples")
                event = _event(dictionary, profile)
                if event is None:
                    sample_type = profile.sample_type
                    decoded.rejected_profiles += 1
                    name = dictionary.string(sample_type.type_strindex, "sample_type")
                    unit = dictionary.string(sample_type.unit_strindex, "sample_type")
                    decoded.dropped[f"sample type {name}/{unit}"] += len(profile.samples)
                    continue
                attributes = {**resource, **dictionary.attributes(profile.attribute_indices)}
                end = profile.time_unix_nano + profile.duration_nano
                default_second = end // NANOS if end else int(received.timestamp())
                labels_of: dict[tuple[int, ...], tuple[Labels, list[str]]] = {}
                for sample in profile.samples:
                    indices = tuple(sample.attribute_indices)
                    known = labels_of.get(indices)
                    if known is None:
                        merged = {**attributes, **dictionary.attributes(indices)}
                        known = labels_of[indices] = _labels(merged)
                    labels, unused = known
                    decoded.dropped.update(unused)
                    stack = dictionary.stack(sample.stack_index)
                    dictionary.check(sample.link_index, len(dictionary.links), "link_table")
                    observations += max(len(sample.values), len(sample.timestamps_unix_nano))
                    if observations > MAX_OBSERVATIONS:
                        raise schema.SchemaError(f"more than {MAX_OBSERVATIONS} observations")
                    counts = rows[(labels, event)]
                    for second, weight in _observations(sample, default_second):
                        counts[(second, stack)] += weight
    decoded.batches.extend(_batches(data, rows, dictionary.stacks_by_id, decoded))
    return decoded


def _event(dictionary: _Dictionary, profile: profiles_pb2.Profile) -> str | None:
    """The fleetprof event of a profile's sample type, or None (dropped)."""
    sample_type = profile.sample_type
    pair = (
        dictionary.string(sample_type.type_strindex, "sample_type"),
        dictionary.string(sample_type.unit_strindex, "sample_type"),
    )
    periods = otlp.PERIOD_TYPES.get(pair)
    if periods is not None:
        period = dictionary.string(profile.period_type.type_strindex, "period_type")
        if period not in periods:
            return None
    return otlp.SAMPLE_TYPES.get(pair)


def _observations(sample: profiles_pb2.Sample, default_second: int) -> Iterable[tuple[int, int]]:
    """(second, weight) of each observation: a value without timestamps is the profile's,
    a timestamp without values weighs 1."""
    values, stamps = sample.values, sample.timestamps_unix_nano
    if not values and not stamps:
        raise schema.SchemaError("a sample has neither values nor timestamps")
    if values and stamps and len(values) != len(stamps):
        raise schema.SchemaError(f"a sample has {len(values)} values but {len(stamps)} timestamps")
    if any(value < 0 for value in values):
        raise schema.SchemaError("a sample has a negative value")
    if not stamps:
        return [(default_second, sum(values))]
    return zip((t // NANOS for t in stamps), values or [1] * len(stamps), strict=True)


def _labels(attributes: dict[str, AttributeValue]) -> tuple[Labels, list[str]]:
    """A sample's columns from its attributes, and the attributes no column took."""
    used: set[str] = set()

    def text(key: str) -> str | None:
        value = attributes.get(key)
        if isinstance(value, str) and value:
            used.add(key)
            return value
        return None

    def number(key: str) -> int:
        value = attributes.get(key)
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int):
            return 0  # not an int: counted as dropped below
        if not 0 <= value <= MAX_INT32:
            raise schema.SchemaError(f"{key} {value} out of range")
        used.add(key)
        return value

    node = text(otlp.HOST_NAME) or UNKNOWN_NODE
    pid = number(otlp.PROCESS_PID)
    tid = number(otlp.THREAD_ID) or pid
    comm = text(otlp.EXECUTABLE_NAME) or text(otlp.THREAD_NAME) or UNKNOWN_COMM
    job = text(otlp.JOB) or text(otlp.SERVICE_NAME)
    namespace, pod, container = (text(key) for key in otlp.LABELS)
    labels: Labels = (node, pid, tid, comm, job, namespace, pod, container)
    return labels, sorted(f"attribute {key}" for key in attributes.keys() - used)


class _Dictionary:
    """The request's shared tables, each index checked once when first used."""

    def __init__(self, dictionary: profiles_pb2.ProfilesDictionary) -> None:
        for name in (
            "mapping_table",
            "location_table",
            "function_table",
            "link_table",
            "string_table",
            "attribute_table",
            "stack_table",
        ):
            if len(getattr(dictionary, name)) > MAX_TABLE_ENTRIES:
                raise schema.SchemaError(f"{name} has more than {MAX_TABLE_ENTRIES} entries")
        self._d = dictionary
        self.strings = dictionary.string_table
        if self.strings and self.strings[0] != "":
            raise schema.SchemaError("string_table[0] must be the empty string")
        self.links = dictionary.link_table
        self._attributes: dict[int, tuple[str, AttributeValue]] = {}
        # location index -> (its root-first frames, their frame_keys)
        self._locations: dict[int, tuple[list[tuple[str, str, str]], bytes]] = {}
        self._stacks: dict[int, int] = {}
        self.stacks_by_id: dict[int, StackRow] = {}

    @staticmethod
    def check(index: int, size: int, table: str) -> None:
        # index 0 is the zero value every table starts with: it may be left out
        if index != 0 and not 0 <= index < size:
            raise schema.SchemaError(f"{table} index {index} out of range ({size} entries)")

    def string(self, index: int, where: str) -> str:
        self.check(index, len(self.strings), f"string_table ({where})")
        return self.strings[index] if index else ""

    def value(self, value: common_pb2.AnyValue) -> AttributeValue:
        """A scalar attribute value; arrays, maps and bytes have no column (None)."""
        kind = value.WhichOneof("value")
        if kind == "string_value_strindex":
            return self.string(value.string_value_strindex, "attribute value")
        if kind in ("string_value", "int_value", "bool_value", "double_value"):
            return getattr(value, kind)
        return None

    def attributes(self, indices: Iterable[int]) -> dict[str, AttributeValue]:
        found = {}
        for index in indices:
            attribute = self._attributes.get(index)
            if attribute is None:
                self.check(index, len(self._d.attribute_table), "attribute_table")
                entry = self._d.attribute_table[index] if index else None
                key = self.string(entry.key_strindex, "attribute key") if entry else ""
                value = self.value(entry.value) if entry else None
                attribute = self._attributes[index] = (key, value)
            if attribute[0]:
                found[attribute[0]] = attribute[1]
        return found

    def stack(self, index: int) -> int:
        """The stack id of stack_table[index], its row kept in stacks_by_id."""
        known = self._stacks.get(index)
        if known is not None:
            return known
        self.check(index, len(self._d.stack_table), "stack_table")
        indices = self._d.stack_table[index].location_indices if index else ()
        if len(indices) > MAX_TABLE_ENTRIES:
            raise schema.SchemaError(f"a stack of more than {MAX_TABLE_ENTRIES} locations")
        root_first = [self._location(location) for location in reversed(indices)]
        frames = [frame for location_frames, _ in root_first for frame in location_frames]
        if 0 < len(frames) <= schema.MAX_FRAMES_PER_STACK:
            row = StackRow(*zip(*frames, strict=True))
            key = keyed_stack_id(b"".join(keys for _, keys in root_first))
        else:  # cut, or empty: the general way
            row = fit_stack(frames or [LOST_FRAME])
            key = stack_id(row)
        self._stacks[index] = key
        self.stacks_by_id[key] = row
        return key

    @staticmethod
    def _kind(attributes: dict[str, AttributeValue]) -> str | None:
        """A location's frame kind: its profile.frame.type's, else the one fleetprof wrote
        for a kind OTLP has no type for, else None (location_frames goes by the module)."""
        frame_type = attributes.get(otlp.FRAME_TYPE)
        kind = otlp.FRAME_KINDS.get(frame_type) if isinstance(frame_type, str) else None
        written = attributes.get(otlp.FRAME_KIND)
        if kind is None and written in otlp.FRAME_KIND_VALUES:
            return str(written)
        return kind

    def _location(self, index: int) -> tuple[list[tuple[str, str, str]], bytes]:
        """Root-first (name, module, kind) frames of a location, one per line (inlined
        callees last), and their frame_keys."""
        known = self._locations.get(index)
        if known is not None:
            return known
        self.check(index, len(self._d.location_table), "location_table")
        location = self._d.location_table[index] if index else profiles_pb2.Location()
        if len(location.lines) > schema.MAX_FRAMES_PER_STACK:
            raise schema.SchemaError(
                f"location {index} has more than {schema.MAX_FRAMES_PER_STACK} lines"
            )
        self.check(location.mapping_index, len(self._d.mapping_table), "mapping_table")
        mapping = self._d.mapping_table[location.mapping_index] if location.mapping_index else None
        module = module_name(self.string(mapping.filename_strindex, "mapping")) if mapping else ""
        # (function name, its file name, line number) of each line, innermost first
        sources = []
        for line in location.lines:
            self.check(line.function_index, len(self._d.function_table), "function_table")
            if line.function_index:
                function = self._d.function_table[line.function_index]
                sources.append(
                    (
                        self.string(function.name_strindex, "function")
                        or self.string(function.system_name_strindex, "function"),
                        self.string(function.filename_strindex, "function"),
                        line.line,
                    )
                )
            else:
                sources.append(("", "", 0))
        kind = self._kind(self.attributes(location.attribute_indices))
        names = [name for name, _, _ in sources]
        leaf_first = location_frames(names, module, location.address, kind)
        if kind == python_frames.KIND and sources:
            # As the agent stores CPython frames: module.qualname at file:line (a line
            # without a function keeps location_frames' name for it)
            leaf_first = [
                (
                    python_frames.frame_name(name, filename) if name else unnamed,
                    python_frames.frame_module(filename, number),
                    frame_kind,
                )
                for (unnamed, _, frame_kind), (name, filename, number) in zip(
                    leaf_first, sources, strict=True
                )
            ]
        frames = [fit_frame(frame) for frame in reversed(leaf_first)]
        known = self._locations[index] = (frames, b"".join(frame_key(*f) for f in frames))
        return known


def _batches(
    data: bytes,
    rows: dict[tuple[Labels, str], Counter[tuple[int, int]]],
    stacks: dict[int, StackRow],
    decoded: Decoded,
) -> Iterable[ingest_pb2.IngestBatch]:
    """One batch per node. Its agent id is `otlp:NODE` and its sequence a hash of the
    request and node: the same request exported again is a duplicate and counts once."""
    by_node: dict[str, list[tuple[Labels, str, Counter[tuple[int, int]]]]] = defaultdict(list)
    for (labels, event), counts in rows.items():
        by_node[labels[0]].append((labels, event, counts))
    for node, groups in by_node.items():
        columns: dict[str, list] = defaultdict(list)
        used: dict[int, StackRow] = {}
        for labels, event, counts in groups:
            for (second, stack), weight in counts.items():
                if weight == 0:
                    continue
                if weight > MAX_INT64:
                    raise schema.SchemaError("a sample's values overflow 64 bits")
                _, pid, tid, comm, job, namespace, pod, container = labels
                for name, value in (
                    ("ts", second * 1_000_000),
                    ("pid", pid),
                    ("tid", tid),
                    ("comm", comm),
                    ("event", event),
                    ("stack_id", stack),
                    ("weight", weight),
                    ("job", job),
                    ("namespace", namespace),
                    ("pod", pod),
                    ("container", container),
                ):
                    columns[name].append(value)
                used[stack] = stacks[stack]
        if not used:
            continue
        columns["ts"] = pa.array(columns["ts"], pa.timestamp("us", tz="UTC"))
        samples = schema.samples_table(dict(columns))
        digest = hashlib.blake2b(data, digest_size=8, person=b"fleetprof-otlp")
        digest.update(node.encode(errors="surrogateescape"))
        yield ingest_pb2.IngestBatch(
            agent_id=f"otlp:{node}"[:MAX_ID_CHARS],
            sequence=int.from_bytes(digest.digest(), "little"),
            schema_version=schema.SCHEMA_VERSION,
            node=node,
            samples=schema.encode(samples),
            stacks=schema.encode(stacks_table(used)),
        )
