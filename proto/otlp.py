"""fleetprof's columns in OTLP profiles, defined once for the receiver and the exporter.

The messages are PyPI's `opentelemetry-proto` (pinned in pyproject.toml), generated from
opentelemetry-proto PROTO_RELEASE: `opentelemetry.proto.profiles.v1development` (Alpha).
docs/otlp.md lists the mapping for users.
"""

from __future__ import annotations

from fleetprof.proto import python_frames
from fleetprof.proto.schema import EVENT_UNITS

PROTO_RELEASE = "v1.10.0"
EXPORT_METHOD = "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export"
HTTP_PATH = "/v1development/profiles"

# Attribute keys (OpenTelemetry semantic conventions) and the sample column each fills.
HOST_NAME = "host.name"  # node
PROCESS_PID = "process.pid"  # pid
THREAD_ID = "thread.id"  # tid
EXECUTABLE_NAME = "process.executable.name"  # comm
THREAD_NAME = "thread.name"  # comm, without an executable name
SERVICE_NAME = "service.name"  # job, without a `job` attribute
JOB = "job"
LABELS = {
    "k8s.namespace.name": "namespace",
    "k8s.pod.name": "pod",
    "k8s.container.name": "container",
}
FRAME_TYPE = "profile.frame.type"  # a location's: its frames' kind

# (sample type, unit) -> fleetprof event. OTLP's "samples/count" (the OpenTelemetry eBPF
# profiler's, at a CPU period) counts on-CPU samples; the time types weigh in nanoseconds:
# each time event under its own name, and "events/nanoseconds", the OpenTelemetry eBPF
# profiler's off-CPU profile (its reporter's only other sample type).
SAMPLE_TYPES = {
    ("samples", "count"): "cpu",
    ("off_cpu", "nanoseconds"): "offcpu",
    **{(event, "nanoseconds"): event for event, unit in EVENT_UNITS.items() if unit == "ns"},
    ("events", "nanoseconds"): "offcpu",
}
# The period types ("" for none) a sample type means its event with; with another period
# type it is another profile's, not stored. Sample types not listed take any period type.
PERIOD_TYPES = {
    ("samples", "count"): ("", "cpu"),
    ("events", "nanoseconds"): ("",),  # the eBPF profiler states no period for off-CPU
}
# What the exporter writes for each event (the first of SAMPLE_TYPES naming it).
EVENT_SAMPLE_TYPES = {event: pair for pair, event in reversed(SAMPLE_TYPES.items())}
CPU_PERIOD_TYPE = ("cpu", "nanoseconds")

# profile.frame.type values -> schema.FRAME_KINDS: the semantic conventions' values, and
# the OpenTelemetry eBPF profiler's own (libpf/interpretertype.go: "luajit", "unknown" and
# "abort-marker", where its unwinder gave up and the rest of the stack is lost). CPython
# frames are read as the agent stores them (proto/python_frames.py): their function name
# is the qualname, their function's file name and their line's number the source line.
# The other managed runtimes both interpret and JIT-compile, and OTLP does not say which a
# frame is: "jit" (drawn like "interpreted").
FRAME_KINDS = {
    "kernel": "kernel",
    "native": "native",
    "go": "native",
    "rust": "native",
    "cpython": python_frames.KIND,
    "php": "interpreted",
    "perl": "interpreted",
    "ruby": "interpreted",
    "jvm": "jit",
    "dotnet": "jit",
    "v8js": "jit",
    "beam": "jit",
    "luajit": "jit",
    "unknown": "unknown",
    "abort-marker": "lost",
}
# The kinds the exporter names with a profile.frame.type of the semantic conventions.
KIND_FRAME_TYPES = {"kernel": "kernel", "native": "native", python_frames.KIND: "cpython"}
# fleetprof's other kinds do not say a runtime (a "jit" frame from a perf map may be the
# JVM's, V8's, .NET's...): naming one would be a guess. They go out with this attribute
# instead, which OTLP receivers ignore and fleetprof's reads back, so that a round trip
# through OTLP keeps every kind. ("inlined" needs none: it is a line of a location.)
FRAME_KIND = "fleetprof.frame.kind"
FRAME_KIND_VALUES = ("jit", "interpreted", "unknown", "lost")
