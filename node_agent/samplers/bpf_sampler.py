"""What every sampler shares: its BPF C file, compiled after the PRELUDE headers
(unwind_tables, user_stacks, new_pids, python_stacks, stack_counts), and the
two-generation maps it counts into."""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar

from fleetprof.node_agent.samplers import Drain, SamplerOptions, kernel_layout, python_stacks
from fleetprof.node_agent.samplers.bpf_loop import LoopBPF
from fleetprof.node_agent.samplers.stack_maps import GenerationalStackMaps
from fleetprof.node_agent.symbolize.frame import Frame

HERE = Path(__file__).parent
# BCC's compiler (clang and LLVM in libbcc) is not thread-safe, nor is freeing a compiled
# module: one compile or cleanup at a time per process, e.g. a session's samplers starting
# while another agent in the process starts or stops (two cleanups at once crashed).
BCC_LOCK = threading.Lock()
# Put before every sampler's own file, in this order.
PRELUDE = (
    HERE / "unwind_tables.bpf.h",
    HERE / "user_stacks.bpf.h",
    HERE / "new_pids.bpf.h",
    HERE / "python_stacks.bpf.h",
    HERE / "stack_counts.bpf.h",
)


class BpfSampler:
    """A sampler of one event (subclasses of several override events and event_of);
    subclasses name their BPF file and attach what BCC does not.

    Programs named TRACEPOINT_PROBE / RAW_TRACEPOINT_PROBE attach when the file loads.
    """

    events: tuple[str, ...]
    unit: ClassVar[str]
    # The BPF C files next to this module, after PRELUDE, in order.
    sources: ClassVar[tuple[str, ...]]

    def __init__(self, options: SamplerOptions, attach: bool = True) -> None:
        files = (*PRELUDE, *(HERE / name for name in self.sources))
        text = b"".join(path.read_bytes() for path in files)
        # The native unwinder's shared tables are named after it (unwind_tables.bpf.h).
        text = text.replace(b"UNWIND_ID", options.native_unwind.encode())
        with BCC_LOCK:
            self._bpf = LoopBPF(
                text=text, cflags=[*options.cflags(), *kernel_layout.cflags(), *self.cflags()]
            )
            release_compiler_memory()
        self._session_filter = options.session_filter
        self._python_procs = self._bpf[b"python_procs"]
        self._python_forks = self._bpf[b"python_forks"]
        python_stacks.TARGETS.add_map(self._python_procs, self._python_forks)
        if attach:
            self.attach(options)
        self._maps = GenerationalStackMaps(self._bpf, self.describe)

    def attach(self, options: SamplerOptions) -> None:
        """Attach programs that do not attach on load (perf events)."""

    def cflags(self) -> list[str]:
        """Defines of this sampler's own, after options.cflags()."""
        return []

    def detach(self) -> None:
        """Undo attach() (a prepared session sampler, between sessions)."""
        raise NotImplementedError(f"{self.events} samplers are not reused")

    def reset_pids(self) -> None:
        self._bpf[b"session_pids"].clear()

    def describe(self, detail: int) -> str:
        """The leaf frame of a key's `detail` (see StackSample.leaf); none by default."""
        return ""

    def event_of(self, detail: int, frames: Sequence[Frame]) -> str | None:
        return self.events[0]

    def drain(self) -> Drain:
        return Drain(self._maps.drain())

    def add_pids(self, pids: Iterable[int]) -> None:
        """Let these processes be counted (a sampler built with session_filter only)."""
        table = self._bpf[b"session_pids"]
        for pid in pids:
            table[table.Key(pid)] = table.Leaf(1)

    def process_events_fd(self) -> int | None:
        """The ring buffer of its first samples (new_pids.bpf.h); None for a session's."""
        if self._session_filter:
            return None
        return int(self._bpf[b"process_events"].map_fd)

    def dropped_samples(self) -> int:
        return int(self._bpf[b"dropped_samples"].sum(0).value)

    def python_walks(self) -> list[int]:
        """Python stack walks since start, by outcome (python_stacks.bpf.h PY_STAT_*)."""
        walks = self._bpf[b"python_walks"]
        return [int(walks.sum(i).value) for i in range(len(walks))]

    def close(self) -> None:
        python_stacks.TARGETS.remove_map(self._python_procs, self._python_forks)
        with BCC_LOCK:
            self._bpf.cleanup()


def release_free_memory() -> None:
    """Give freed heap back to the system (after BCC's compiler ran: ~60 MB of RSS)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_MADV_PAGEOUT = 21
_COMPILER_LIBRARIES = ("libLLVM", "libclang")


def release_compiler_memory() -> None:
    """Drop the pages of BCC's compiler libraries (LLVM, clang) from this process once BPF
    programs are compiled: ~75 MB of RSS that only the next compile would use. They are
    clean file pages: a later compile reads them back."""
    release_free_memory()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and any(lib in fields[5] for lib in _COMPILER_LIBRARIES):
                start, end = (int(address, 16) for address in fields[0].split("-"))
                libc.madvise(start, end - start, _MADV_PAGEOUT)  # best effort: kernel ≥ 5.4
