"""Process events from the kernel, dispatched to the agent's components.

The kernel reports (samplers/new_pids.bpf.h, process_events.bpf.c) each process's first
sample since it started or exec'd, every exec and exit, and the executable mmaps of the
processes sampled (the others' libraries, mapped at every start, are not sent). Components
subscribe to what they need:

- on_first_sample(pid): samples hit this process image for the first time. Per-process
  work (maps, symbol tables, job) belongs here, not at exec: most processes of a busy
  node are never sampled. It comes within milliseconds: the event wakes the agent, and
  with it the process's identity (identity(pid)), so that only its maps are left to read.
- on_exec(pid): a process sampled since it started exec'd (new program, environment,
  command line); while on-demand sessions run (report_every_process), any process.
- on_new_code(pid): a sampled process mapped new executable code (dlopen).
- on_exit(pid): a process sampled since it started exited; while sessions run, any.

Exec, mmap and exit events wait for the next poll (no wake-up per event), and the kernel
sends them only for the processes the agent keeps state of: a node that starts hundreds of
processes a second costs events only for those its samples hit. State a component keeps
of a process whose exit went unreported (it exited before its first sample was read) is
let go by the agent's sweep at the next drain.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from bcc import BPF
from bcc.libbcc import _RINGBUF_CB_TYPE, lib

from fleetprof.node_agent.samplers.bpf_sampler import BCC_LOCK, release_compiler_memory
from fleetprof.node_agent.symbolize.process import ProcessIdentity

HERE = Path(__file__).parent
BPF_FILES = (HERE / "samplers" / "new_pids.bpf.h", HERE / "process_events.bpf.c")
EVENT_EXEC, EVENT_EXEC_MMAP, EVENT_EXIT, EVENT_FIRST_SAMPLE = 1, 2, 3, 4
# Process events of exec/mmap/exit: everything the node starts (pages, a power of two).
_PAGES = 64

Callback = Callable[[int], None]


class _ProcessEvent(ctypes.Structure):
    _fields_ = (
        ("ts", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("kind", ctypes.c_uint32),
        ("start_ticks", ctypes.c_uint64),
        ("ppid", ctypes.c_uint32),
        ("nspid", ctypes.c_uint32),
        ("comm", ctypes.c_char * 16),
    )


class ProcessEvents:
    """One ring-buffer poller over the process events of the kernel and of every sampler.

    `rings`: the samplers' process event ring buffers (map fds), whose first samples are
    reported. Not thread-safe: the agent's loop polls it and owns the subscribers.
    """

    def __init__(self, rings: Iterable[int] = ()) -> None:
        self._subscribers: dict[int, list[Callback]] = {
            kind: [] for kind in (EVENT_EXEC, EVENT_EXEC_MMAP, EVENT_EXIT, EVENT_FIRST_SAMPLE)
        }
        self._agent_pid = os.getpid()
        # Pids whose current image was sampled: first samples of several samplers are
        # reported once, new code only for them. Bounded by live processes (exits leave).
        self.sampled: set[int] = set()
        # Of sampled pids, their identity as the kernel read it at the first sample.
        self._identities: dict[int, ProcessIdentity] = {}
        self._pending: list[tuple[int, int, int, ProcessIdentity | None]] = []
        with BCC_LOCK:
            self._bpf = BPF(
                text=b"".join(path.read_bytes() for path in BPF_FILES),
                cflags=["-DNOTE_SAMPLED_PIDS=0", f"-DPROCESS_EVENT_PAGES={_PAGES}"],
            )
            release_compiler_memory()
        # One manager over every ring: one wait wakes for all. The samplers' rings come
        # first: consuming in that order, an exec is never read after a first sample it
        # preceded (see poll).
        self._watched = self._bpf[b"watched_pids"]
        self._tracked = self._bpf[b"tracked_pids"]
        self._every = self._bpf[b"report_every_process"]
        self._callback = _RINGBUF_CB_TYPE(self._collect)
        fds = [*rings, self._bpf[b"process_events"].map_fd]
        self._manager = lib.bpf_new_ringbuf(fds[0], self._callback, None)
        if not self._manager:
            raise OSError("cannot open the process events ring buffer")
        for fd in fds[1:]:
            if lib.bpf_add_ringbuf(self._manager, fd, self._callback, None) < 0:
                raise OSError("cannot add a sampler's process events ring buffer")

    def subscribe(
        self,
        *,
        on_first_sample: Callback | None = None,
        on_exec: Callback | None = None,
        on_new_code: Callback | None = None,
        on_exit: Callback | None = None,
    ) -> None:
        """Call these for every later event of their kind, in subscription order."""
        for kind, callback in (
            (EVENT_FIRST_SAMPLE, on_first_sample),
            (EVENT_EXEC, on_exec),
            (EVENT_EXEC_MMAP, on_new_code),
            (EVENT_EXIT, on_exit),
        ):
            if callback is not None:
                self._subscribers[kind].append(callback)

    def _collect(self, _ctx: int, data: int, _size: int) -> int:
        event = _ProcessEvent.from_address(data)
        if event.pid == self._agent_pid:
            return 0
        identity = None
        if event.kind == EVENT_FIRST_SAMPLE and event.nspid:
            comm = event.comm.decode("utf-8", "replace")
            identity = ProcessIdentity(comm, event.start_ticks, event.ppid, event.nspid)
        self._pending.append((event.ts, event.kind, event.pid, identity))
        return 0

    def identity(self, pid: int) -> ProcessIdentity | None:
        """pid's identity as its first sample gave it; None if the kernel could not tell."""
        return self._identities.get(pid)

    def poll(self, timeout_ms: int) -> None:
        """Wait up to timeout_ms for a first sample, then deliver every pending event."""
        lib.bpf_poll_ringbuf(self._manager, timeout_ms)
        # Rings not yet read (no wake-up), read in order: a first sample read here has its
        # exec, if any, read too; sorting puts the exec first.
        lib.bpf_consume_ringbuf(self._manager)
        pending, self._pending = self._pending, []
        pending.sort(key=lambda event: event[:3])
        for _, kind, pid, identity in pending:
            self._dispatch(kind, pid, identity)

    def _dispatch(self, kind: int, pid: int, identity: ProcessIdentity | None) -> None:
        if kind == EVENT_FIRST_SAMPLE:
            if pid in self.sampled:
                return  # another sampler's, or an evicted entry's, report
            self.sampled.add(pid)
            if identity is not None:
                self._identities[pid] = identity
            with contextlib.suppress(Exception):  # BCC: a bare Exception when full
                self._watched[self._watched.Key(pid)] = self._watched.Leaf(1)
                self._tracked[self._tracked.Key(pid)] = self._tracked.Leaf(1)
        elif kind == EVENT_EXEC_MMAP:
            if pid not in self.sampled:
                return  # its first sample will read its maps, new code included
        elif kind in (EVENT_EXEC, EVENT_EXIT):
            self.sampled.discard(pid)
            self._identities.pop(pid, None)
        for callback in self._subscribers[kind]:
            callback(pid)

    def report_every_process(self, every: bool) -> None:
        """Report every process's exec and exit (on-demand sessions consider each), or only
        those of the processes sampled since they started."""
        self._every[self._every.Key(0)] = self._every.Leaf(every)

    def forget(self, pids: Iterable[int]) -> None:
        """Exited processes whose exit went unreported (the agent's sweep found them)."""
        self.sampled.difference_update(pids)
        for pid in pids:
            self._identities.pop(pid, None)

    def close(self) -> None:
        lib.bpf_free_ringbuf(self._manager)
        with BCC_LOCK:
            self._bpf.cleanup()
