"""What every sampler shares: its BPF C file, compiled after user_stacks.bpf.h and
stack_counts.bpf.h, and the two-generation maps it counts into."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from bcc import BPF

from fleetprof.node_agent.samplers import Drain, SamplerOptions
from fleetprof.node_agent.samplers.stack_maps import GenerationalStackMaps

HERE = Path(__file__).parent
# Put before every sampler's own file, in this order.
PRELUDE = (HERE / "user_stacks.bpf.h", HERE / "stack_counts.bpf.h")


class BpfSampler:
    """A sampler of one event; subclasses name their BPF file and attach what BCC does not.

    Programs named TRACEPOINT_PROBE / RAW_TRACEPOINT_PROBE attach when the file loads.
    """

    event: ClassVar[str]
    unit: ClassVar[str]
    # The BPF C file next to this module.
    source: ClassVar[str]

    def __init__(self, options: SamplerOptions) -> None:
        text = b"".join(path.read_bytes() for path in (*PRELUDE, HERE / self.source))
        self._bpf = BPF(text=text, cflags=options.cflags())
        self.attach(options)
        self._maps = GenerationalStackMaps(self._bpf, self.describe)

    def attach(self, options: SamplerOptions) -> None:
        """Attach programs that do not attach on load (perf events)."""

    def describe(self, detail: int) -> str:
        """The leaf frame of a key's `detail` (see StackSample.leaf); none by default."""
        return ""

    def drain(self) -> Drain:
        return Drain(self._maps.drain())

    def dropped_samples(self) -> int:
        return int(self._bpf[b"dropped_samples"].sum(0).value)

    def close(self) -> None:
        self._bpf.cleanup()
