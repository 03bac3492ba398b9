"""OTLP profiles: one binary ExportProfilesServiceRequest (opentelemetry-proto's
profiles v1development, proto/otlp.py), for an OpenTelemetry Collector, Pyroscope or any
OTLP receiver (`fleetprof export --otlp-endpoint` sends it; `.otlp.pb` writes it).

One ResourceProfiles per (node, job, namespace, pod, container) with host.name,
service.name and k8s.* resource attributes, each with one profile of the event's sample
type; one sample per (thread, stack) with process.pid, thread.id and process.executable.name
attributes. All of them share the request's dictionary: each string, function, mapping,
location, attribute and stack once. Kernel, native and Python frames carry
profile.frame.type (Python frames also their file and line), the other kinds fleetprof's
own frame kind attribute; inlined frames are lines of the location of the code they were
compiled into.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any, BinaryIO

import pyarrow as pa
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.profiles.v1development import profiles_pb2

from fleetprof.proto import otlp, python_frames
from fleetprof.query.filters import SampleFilter
from fleetprof.query.render.base import Frame, RenderOptions, inlined_locations
from fleetprof.query.render.pprof import NANOS_PER_SECOND, StringTable

SCOPE = "fleetprof"
_RESOURCE = ("node", "job", "namespace", "pod", "container")


class _Table:
    """A dictionary table: entry 0 the zero value, each distinct key's entry once."""

    def __init__(self, table: Any) -> None:
        self._table = table
        self._index: dict[Hashable, int] = {}
        table.add()

    def __call__(self, key: Hashable, **fields: Any) -> int:
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = len(self._table)
            self._table.add(**fields)
        return index


class _Dictionary:
    def __init__(self, dictionary: profiles_pb2.ProfilesDictionary) -> None:
        self.string = StringTable(dictionary.string_table)
        dictionary.link_table.add()
        self._mappings = _Table(dictionary.mapping_table)
        self._functions = _Table(dictionary.function_table)
        self._locations = _Table(dictionary.location_table)
        self._attributes = _Table(dictionary.attribute_table)
        self.stack = _Table(dictionary.stack_table)

    def attribute(self, key: str, value: str | int) -> int:
        any_value = (
            common_pb2.AnyValue(string_value=value)
            if isinstance(value, str)
            else common_pb2.AnyValue(int_value=value)
        )
        return self._attributes((key, value), key_strindex=self.string(key), value=any_value)

    def location(self, lines: tuple[Frame, ...]) -> int:
        """The location of frames, innermost first: one line each, the last the code they
        run in, whose kind is the location's frame type and whose module its mapping (a
        CPython frame's module is its source, file:line, which goes into its line)."""
        _, module, kind = lines[-1]
        python = kind == python_frames.KIND
        binary = module and not python
        mapping = self._mappings(module, filename_strindex=self.string(module)) if binary else 0
        frame_type = otlp.KIND_FRAME_TYPES.get(kind)
        if frame_type:
            attributes = [self.attribute(otlp.FRAME_TYPE, frame_type)]
        elif kind in otlp.FRAME_KIND_VALUES:
            attributes = [self.attribute(otlp.FRAME_KIND, kind)]
        else:
            attributes = []
        return self._locations(
            lines,
            mapping_index=mapping,
            lines=[self._line(name, line_module, python) for name, line_module, _ in lines],
            attribute_indices=attributes,
        )

    def _line(self, name: str, module: str, python: bool) -> profiles_pb2.Line:
        if not python:
            return profiles_pb2.Line(function_index=self._function(name, ""))
        # as the OpenTelemetry eBPF profiler sends CPython frames: the qualname, its file
        qualname, filename, number = python_frames.source(name, module)
        return profiles_pb2.Line(function_index=self._function(qualname, filename), line=number)

    def _function(self, name: str, filename: str) -> int:
        name_index = self.string(name)
        return self._functions(
            (name, filename),
            name_strindex=name_index,
            system_name_strindex=name_index,
            filename_strindex=self.string(filename),
        )


def _resource_attributes(labels: dict[str, Any]) -> Iterable[common_pb2.KeyValue]:
    keys = {
        "node": otlp.HOST_NAME,
        "job": otlp.SERVICE_NAME,
        **{column: key for key, column in otlp.LABELS.items()},
    }
    for column in _RESOURCE:
        if labels[column] is not None:
            yield common_pb2.KeyValue(
                key=keys[column], value=common_pb2.AnyValue(string_value=labels[column])
            )


class OtlpRenderer:
    suffixes: tuple[str, ...] = (".otlp.pb",)

    def rows_sql(self, selection: SampleFilter) -> str:
        # merged per stack id before the join: the lists are fetched once per row kept
        return f"""
            SELECT m.node, m.job, m.namespace, m.pod, m.container, m.pid, m.tid, m.comm,
                   st.frames, st.modules, st.kinds, m.weight, m.first, m.last
            FROM (
                SELECT node, job, namespace, pod, container, pid, tid, comm, stack_id,
                       sum(weight)::BIGINT AS weight,
                       epoch_ns(min(ts)) AS first, epoch_ns(max(ts)) AS last
                FROM samples WHERE {selection.where()}
                GROUP BY ALL
            ) m
            JOIN stacks st USING (stack_id)
            ORDER BY m.node, m.job, m.namespace, m.pod, m.container, m.pid, m.tid, m.comm,
                     st.frames
        """

    def render_rows(self, rows: pa.RecordBatchReader, options: RenderOptions, out: BinaryIO) -> int:
        request = profiles_service_pb2.ExportProfilesServiceRequest()
        dictionary = _Dictionary(request.dictionary)
        sample_type, unit = otlp.EVENT_SAMPLE_TYPES[options.event]
        profiles: dict[tuple[Any, ...], profiles_pb2.Profile] = {}
        spans: dict[tuple[Any, ...], list[int]] = {}
        total = 0
        for batch in rows:
            for row in batch.to_pylist():
                resource = tuple(row[column] for column in _RESOURCE)
                profile = profiles.get(resource)
                if profile is None:
                    added = request.resource_profiles.add()
                    added.resource.attributes.extend(_resource_attributes(row))
                    scope = added.scope_profiles.add()
                    scope.scope.name = SCOPE
                    profile = profiles[resource] = scope.profiles.add()
                    profile.sample_type.type_strindex = dictionary.string(sample_type)
                    profile.sample_type.unit_strindex = dictionary.string(unit)
                    if options.unit == "samples" and options.frequency_hz:
                        period_type, period_unit = otlp.CPU_PERIOD_TYPE
                        profile.period_type.type_strindex = dictionary.string(period_type)
                        profile.period_type.unit_strindex = dictionary.string(period_unit)
                        profile.period = round(NANOS_PER_SECOND / options.frequency_hz)
                    spans[resource] = [row["first"], row["last"]]
                span = spans[resource]
                span[0], span[1] = min(span[0], row["first"]), max(span[1], row["last"])
                locations = tuple(
                    dictionary.location(lines)
                    for lines in inlined_locations(row["frames"], row["modules"], row["kinds"])
                )
                stack = dictionary.stack(locations, location_indices=locations)
                attributes = [
                    dictionary.attribute(otlp.PROCESS_PID, row["pid"]),
                    dictionary.attribute(otlp.THREAD_ID, row["tid"]),
                    dictionary.attribute(otlp.EXECUTABLE_NAME, row["comm"]),
                ]
                profile.samples.add(
                    stack_index=stack, attribute_indices=attributes, values=[row["weight"]]
                )
                total += row["weight"]
        for resource, profile in profiles.items():
            first, last = spans[resource]
            profile.time_unix_nano = first
            profile.duration_nano = last - first
        out.write(request.SerializeToString())
        return total
