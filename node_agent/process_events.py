"""Process exec / executable-mmap / exit events from the kernel (process_events.bpf.c)."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

from bcc import BPF

from fleetprof.node_agent.samplers.bpf_sampler import BCC_LOCK, release_compiler_memory

BPF_SOURCE = Path(__file__).with_name("process_events.bpf.c")
EVENT_EXEC, EVENT_EXEC_MMAP, EVENT_EXIT = 1, 2, 3


class _ProcessEvent(ctypes.Structure):
    _fields_ = (("pid", ctypes.c_uint32), ("kind", ctypes.c_uint32))


class ProcessEvents:
    """Calls `on_new_code(pid)` after an exec or executable mmap, `on_exit(pid)` at exit."""

    def __init__(self, on_new_code: Callable[[int], None], on_exit: Callable[[int], None]) -> None:
        self._on_new_code = on_new_code
        self._on_exit = on_exit
        self._agent_pid = os.getpid()
        with BCC_LOCK:
            self._bpf = BPF(text=BPF_SOURCE.read_bytes())
            release_compiler_memory()
        self._bpf[b"process_events"].open_ring_buffer(self._handle)

    def _handle(self, _ctx: int, data: int, _size: int) -> None:
        event = ctypes.cast(data, ctypes.POINTER(_ProcessEvent)).contents
        if event.pid == self._agent_pid:
            return
        if event.kind == EVENT_EXIT:
            self._on_exit(event.pid)
        else:
            self._on_new_code(event.pid)

    def poll(self, timeout_ms: int) -> None:
        """Deliver pending events, waiting up to timeout_ms for the first one."""
        self._bpf.ring_buffer_poll(timeout_ms)

    def close(self) -> None:
        with BCC_LOCK:
            self._bpf.cleanup()
