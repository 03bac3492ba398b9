"""Block device time: requests from issue to completion (block.bpf.c), as weight on the
stacks of the thread that queued them and as latency histograms (io_latency)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from fleetprof.node_agent.samplers import Drain, LatencyBucket
from fleetprof.node_agent.samplers.bpf_sampler import BpfSampler
from fleetprof.proto.schema import IO_OPS

log = logging.getLogger(__name__)


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


class BlockSampler(BpfSampler):
    """Weight = nanoseconds a block request took on its device, on the submitter's stacks
    under a leaf frame `[block OP DEVICE]`."""

    events = ("block",)
    unit = "ns"
    sources = ("block.bpf.c",)
    # Block requests that found the latency map full, as last reported.
    _dropped_requests = 0

    def describe(self, detail: int) -> str:
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
            log.warning("block: %d block requests found the latency map full", dropped)
            self._dropped_requests = dropped
        return buckets
