"""I/O syscall time: the application's view of its I/O (io.bpf.c). The block device's
time is block.py's event: the two overlap, so each is an event of its own."""

from __future__ import annotations

from bcc import BPF
from bcc.syscall import syscall_name

from fleetprof.node_agent.samplers import SamplerOptions
from fleetprof.node_agent.samplers.bpf_sampler import BpfSampler

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


class IoSampler(BpfSampler):
    """Weight = nanoseconds in an I/O syscall, under a leaf frame `[syscall NAME]`."""

    events = ("io",)
    unit = "ns"
    sources = ("io.bpf.c",)

    def attach(self, options: SamplerOptions) -> None:
        for name in IO_SYSCALLS:
            if BPF.tracepoint_exists("syscalls", f"sys_enter_{name}"):
                for side in ("enter", "exit"):
                    self._bpf.attach_tracepoint(
                        tp=f"syscalls:sys_{side}_{name}".encode(),
                        fn_name=f"io_syscall_{side}".encode(),
                    )

    def describe(self, detail: int) -> str:
        return f"[syscall {syscall_name(detail & 0xFFFF).decode()}]"
