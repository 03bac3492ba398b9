"""pprof: a gzipped perftools.profiles.Profile (google/pprof's profile.proto), for `go tool
pprof`, Pyroscope, Parca, Grafana and the other tools that read it.

One pprof sample per (node, pid, process, stack) with `node`, `comm` and `pid` labels;
one function per (name, module), one mapping per module, one location per (function,
module), except for methods the JIT inlined (kind "inlined"): they are lines of the location
of the compiled method they are in, innermost first, as pprof represents inlining.
Sample types follow the event's unit: a sampled event (cpu) has `samples/count`,
plus `<event>/nanoseconds` when the sampling frequency is known (each sample stands for
1/frequency s of CPU); a time-weighted event (lock, wait, offcpu, io, block) has
`<event>/nanoseconds`.
"""

from __future__ import annotations

import gzip
from collections.abc import MutableSequence
from typing import BinaryIO

import pyarrow as pa

from fleetprof.proto import python_frames
from fleetprof.proto.pprof import profile_pb2
from fleetprof.query.filters import SampleFilter, saturating
from fleetprof.query.render.base import Frame, RenderOptions, inlined_locations

NANOS_PER_SECOND = 1_000_000_000


class StringTable:
    """A string table (pprof's, OTLP's): index 0 is "", each string stored once."""

    def __init__(self, table: MutableSequence[str]) -> None:
        self._table = table
        self._index: dict[str, int] = {}
        self("")

    def __call__(self, text: str) -> int:
        index = self._index.get(text)
        if index is None:
            index = self._index[text] = len(self._index)
            self._table.append(text)
        return index


def sample_types(options: RenderOptions) -> list[tuple[str, str]]:
    """(type, unit) of each sample value, in order."""
    if options.unit == "ns":
        return [(options.event, "nanoseconds")]
    types = [("samples", "count")]
    if options.frequency_hz:
        types.append((options.event, "nanoseconds"))
    return types


class PprofRenderer:
    suffixes: tuple[str, ...] = (".pb.gz", ".pprof")

    def rows_sql(self, selection: SampleFilter) -> str:
        # merged per stack id before the join: the lists are fetched once per row kept
        return f"""
            SELECT m.node, m.pid, m.comm, st.frames, st.modules, st.kinds, m.weight, m.first,
                   m.last
            FROM (
                SELECT node, pid, comm, stack_id, {saturating("sum(weight)")} AS weight,
                       epoch_ns(min(ts)) AS first, epoch_ns(max(ts)) AS last
                FROM samples WHERE {selection.where()}
                GROUP BY node, pid, comm, stack_id
            ) m
            JOIN stacks st USING (stack_id)
            ORDER BY m.node, m.pid, m.comm, st.frames
        """

    def render_rows(self, rows: pa.RecordBatchReader, options: RenderOptions, out: BinaryIO) -> int:
        profile = profile_pb2.Profile()
        string = StringTable(profile.string_table)
        types = sample_types(options)
        for type_name, unit in types:
            profile.sample_type.add(type=string(type_name), unit=string(unit))
        period_ns = NANOS_PER_SECOND / options.frequency_hz if options.frequency_hz else 0
        if options.unit == "samples" and period_ns:
            profile.period_type.type = string(options.event)
            profile.period_type.unit = string("nanoseconds")
            profile.period = round(period_ns)
        profile.default_sample_type = string(types[-1][0])
        label_keys = (string("node"), string("comm"), string("pid"))
        mappings: dict[str, int] = {}
        functions: dict[tuple[str, str], int] = {}
        locations: dict[tuple[Frame, ...], int] = {}

        def function(line: Frame) -> tuple[int, int]:
            """(function id, line number) of a (name, module, kind) frame; a Python frame's
            module is file:line, a source location rather than a binary."""
            name, module, kind = line
            number = 0
            if kind == python_frames.KIND:
                _, module, number = python_frames.source(name, module)
            function_id = functions.get((name, module))
            if function_id is None:
                function_id = functions[(name, module)] = len(functions) + 1
                profile.function.add(
                    id=function_id,
                    name=string(name),
                    system_name=string(name),
                    filename=string(module) if kind == python_frames.KIND else 0,
                )
            return function_id, number

        def location(lines: tuple[Frame, ...]) -> int:
            """The location of (name, module, kind) lines, innermost first; the last is
            the frame the code runs in, whose module is the location's mapping."""
            found = locations.get(lines)
            if found is not None:
                return found
            module = lines[-1][1] if lines[-1][2] != python_frames.KIND else ""
            mapping_id = mappings.get(module)
            if mapping_id is None and module:
                mapping_id = mappings[module] = len(mappings) + 1
                profile.mapping.add(id=mapping_id, filename=string(module), has_functions=True)
            location_id = locations[lines] = len(locations) + 1
            added = profile.location.add(id=location_id, mapping_id=mapping_id or 0)
            for line in lines:
                function_id, number = function(line)
                added.line.add(function_id=function_id, line=number)
            return location_id

        total = 0
        first = last = None
        for batch in rows:
            for row in batch.to_pylist():
                weight = row["weight"]
                total += weight
                first = row["first"] if first is None else min(first, row["first"])
                last = row["last"] if last is None else max(last, row["last"])
                values = [weight]
                if len(types) == 2:
                    values.append(round(weight * period_ns))
                sample = profile.sample.add(
                    location_id=[
                        location(lines)
                        for lines in inlined_locations(row["frames"], row["modules"], row["kinds"])
                    ],
                    value=values,
                )
                sample.label.add(key=label_keys[0], str=string(row["node"]))
                sample.label.add(key=label_keys[1], str=string(row["comm"]))
                sample.label.add(key=label_keys[2], num=row["pid"])
        if first is not None:
            profile.time_nanos = first
            profile.duration_nanos = last - first
        profile.comment.append(string(options.title))
        # mtime=0: the same profile gives the same bytes
        out.write(gzip.compress(profile.SerializeToString(), mtime=0))
        return total
