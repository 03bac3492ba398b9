"""I/O latency: time in I/O syscalls, and block requests as latency histograms and stack
weights (io.bpf.c)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from bcc import BPF
from bcc.syscall import syscall_name

from fleetprof.node_agent.samplers import Drain, LatencyBucket, SamplerOptions
from fleetprof.node_agent.samplers.bpf_sampler import BpfSampler
from fleetprof.proto.schema import IO_OPS

log = logging.getLogger(__name__)

# sample_key_t.detail's top byte (io.bpf.c DETAIL_*).
DETAIL_SYSCALL = 1
DETAIL_BLOCK = 2
# The I/O syscalls timed (those of them this kernel has).
IO_SYSCALLS = (
    "read",
    "write",
    "pread64",
    "pwrite64",
    "readv",
    "writev",
    "preadv",
    "pwritev",
    "preadv2",
    "pwritev2",
    "sendfile64",
    "copy_file_range",
    "fsync",
    "fdatasync",
    "sync_file_range",
    "syncfs",
    "sync",
)


@functools.lru_cache(maxsize=256)
def device_name(dev: int) -> str:
    """A kernel dev_t (major << 20 | minor) as its /dev name, or "major:minor"."""
    number = f"{dev >> 20}:{dev & 0xFFFFF}"
    try:
        uevent = Path(f"/sys/dev/block/{number}/uevent").read_text()
    except OSError:
        return number
    for line in uevent.splitlines():
        if line.startswith("DEVNAME="):
            return line.removeprefix("DEVNAME=")
    return number


class IoSampler(BpfSampler):
    """Weight = nanoseconds in an I/O syscall (leaf frame `[syscall NAME]`) or a block
    request's device time (leaf frame `[block OP DEVICE]`, on the submitter's stacks)."""

    event = "io"
    unit = "ns"
    source = "io.bpf.c"
    # Block requests that found the latency map full, as last reported.
    _dropped_requests = 0

    def attach(self, options: SamplerOptions) -> None:
        for name in IO_SYSCALLS:
            if BPF.tracepoint_exists("syscalls", f"sys_enter_{name}"):
                for side in ("enter", "exit"):
                    self._bpf.attach_tracepoint(
                        tp=f"syscalls:sys_{side}_{name}".encode(),
                        fn_name=f"io_syscall_{side}".encode(),
                    )

    def describe(self, detail: int) -> str:
        if detail >> 56 == DETAIL_SYSCALL:
            return f"[syscall {syscall_name(detail & 0xFFFF).decode()}]"
        op, dev = (detail >> 32) & 0xFF, detail & 0xFFFF_FFFF
        return f"[block {IO_OPS[op]} {device_name(dev)}]"

    def drain(self) -> Drain:
        generation = self._maps.flip()
        return Drain(self._maps.take(generation), self._take_latency(generation))

    def _take_latency(self, generation: int) -> list[LatencyBucket]:
        histogram = self._bpf[f"latency_{generation}".encode()]
        buckets = [
            LatencyBucket(
                pid=key.pid,
                comm=key.comm.decode(errors="replace"),
                device=device_name(key.dev),
                op=IO_OPS[key.op],
                bucket_le_ns=1 << key.slot,
                count=count.value,
            )
            for key, count in histogram.items()
        ]
        histogram.clear()
        dropped = int(self._bpf[b"dropped_requests"].sum(0).value)
        if dropped > self._dropped_requests:
            log.warning("io: %d block requests found the latency map full", dropped)
            self._dropped_requests = dropped
        return buckets
