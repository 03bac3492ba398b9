"""One sampler per signal, each owning its BPF C file next to its Python module.

Every sampler counts (pid, tid, comm, kernel stack, user stack, detail) → weight in the
kernel, in the two-generation maps that stack_maps.GenerationalStackMaps drains
(bpf_sampler.BpfSampler is what they share). A sampler may count several events (lock, wait
and offcpu share the programs run at every context switch): each drained sample's event is
what `event_of` says of its detail and symbolized frames.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from fleetprof.node_agent.samplers.stack_maps import StackSample
from fleetprof.node_agent.symbolize.frame import Frame

# Ring buffer size (pages, a power of two) of a sampler's process events (new_pids.bpf.h):
# first samples only, at most one per process image.
PROCESS_EVENT_PAGES = 16


@dataclass(frozen=True)
class SamplerOptions:
    # On-CPU sampling rate per CPU; a prime, like the peers, so it does not beat with timers.
    frequency: int = 19
    include_idle: bool = False
    max_sample_keys: int = 65_536
    max_stacks: int = 32_768
    # offcpu: only times off CPU at least this long count (shorter ones are the bulk of
    # context switches and rarely the problem).
    offcpu_min_us: int = 1000
    # lock, io syscalls: waits shorter than this are sampled (probability wait / this,
    # weight this), keeping totals unbiased while skipping most stack walks.
    wait_sample_us: int = 1000
    # An on-demand session's sampler: only pids put in its session_pids map count.
    session_filter: bool = False
    # The id of the native unwinder (node_agent/unwind/native.py) whose tables user stacks
    # are unwound with; empty: frame pointers only.
    native_unwind: str = ""
    max_unwind_rows: int = 1 << 23
    max_unwind_ranges: int = 1 << 17
    max_unwind_pids: int = 1 << 14
    # Walk CPython processes' own frames at each sample (python_stacks.bpf.h).
    python_frames: bool = True

    def cflags(self) -> list[str]:
        """Defines every BPF program of ours understands."""
        return [
            f"-DAGENT_PID={os.getpid()}",
            f"-DINCLUDE_IDLE={int(self.include_idle)}",
            f"-DMAX_SAMPLE_KEYS={self.max_sample_keys}",
            f"-DMAX_STACKS={self.max_stacks}",
            f"-DOFFCPU_MIN_NS={self.offcpu_min_us * 1000}ULL",
            f"-DWAIT_SAMPLE_NS={self.wait_sample_us * 1000}ULL",
            f"-DSESSION_FILTER={int(self.session_filter)}",
            f"-DNATIVE_UNWIND={int(bool(self.native_unwind))}",
            f"-DMAX_UNWIND_ROWS={self.max_unwind_rows}",
            f"-DMAX_UNWIND_RANGES={self.max_unwind_ranges}",
            f"-DMAX_UNWIND_PIDS={self.max_unwind_pids}",
            # A session's samplers count processes user space already knows (and their
            # children): no first-sample events (new_pids.bpf.h) from them.
            f"-DNOTE_SAMPLED_PIDS={int(not self.session_filter)}",
            f"-DPROCESS_EVENT_PAGES={PROCESS_EVENT_PAGES}",
            # /proc/PID/stat's clock ticks, which first-sample events give start times in.
            f"-DNS_PER_CLOCK_TICK={10**9 // os.sysconf('SC_CLK_TCK')}ULL",
            f"-DPYTHON_FRAMES={int(self.python_frames)}",
        ]


class LatencyBucket(NamedTuple):
    """Block requests of one (process, device, op) whose latency was in one log2 bucket."""

    pid: int
    comm: str
    device: str
    op: str
    # Latencies in (bucket_le_ns / 2, bucket_le_ns].
    bucket_le_ns: int
    count: int


class Drain(NamedTuple):
    """What a sampler counted since its previous drain."""

    samples: list[StackSample]
    # Block I/O latency histograms (block only).
    io_latency: Sequence[LatencyBucket] = ()


class Sampler(Protocol):
    # The events it ships, in the order asked for.
    events: tuple[str, ...]
    # "samples" (counts) or "ns" (time): what `weight` means for its events.
    unit: str

    def event_of(self, detail: int, frames: Sequence[Frame]) -> str | None:
        """The event of a drained sample (frames root first), or None: not shipped (an
        event counted by the same programs but not asked for). Detail 0 (the agent's own
        `[dropped]` weight) is the first event's."""
        ...

    def drain(self) -> Drain: ...

    def add_pids(self, pids: Iterable[int]) -> None:
        """Let these processes be counted (a sampler built with session_filter only)."""
        ...

    def process_events_fd(self) -> int | None:
        """Its ring buffer of first samples (process_events.py), if it reports them."""
        ...

    def dropped_samples(self) -> int:
        """Weight (in `unit`) the kernel could not count since start (map full)."""
        ...

    def close(self) -> None: ...
