"""HotSpot JVMs on this node: found in process snapshots, asked for their perf maps.

For each JVM (a process with libjvm.so mapped) the agent
- reads its options (JAVA_TOOL_OPTIONS, JDK_JAVA_OPTIONS, the command line and its @argfiles,
  _JAVA_OPTIONS) for -XX:+PreserveFramePointer and -XX:+DisableAttachMechanism;
- once it handles SIGQUIT (its start-up is done), attaches (hotspot_attach, in a helper
  process, on a worker thread) to run `Compiler.perfmap` and, the first time, `VM.flags`,
  which settles PreserveFramePointer whatever the command line said;
- asks for the map again, shortly before a drain (which symbolizes the interval's samples
  with it), when the last drain's samples hit JIT code the map did not cover, when the last
  map had grown (the JIT is warming up), and every refresh_every_s while samples run JIT
  code (it reuses the space of code it frees); so at most once an interval;
- reports what it learned as schema.PROCESSES rows, and warns once per JVM without frame
  pointers;
- once the JVM exited, removes the map it had it write from its /tmp.

A JVM whose options disable attach, or may (an unreadable options file), is never signalled.
Everything but the attach itself runs on the agent's main thread.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from fleetprof.node_agent.hotspot_attach import AttachError, attach, catches_sigquit, socket_path
from fleetprof.node_agent.symbolize.process import ProcessSnapshot, read_stat
from fleetprof.proto import schema

log = logging.getLogger(__name__)

PERF_MAP_COMMAND = "Compiler.perfmap"
FLAGS_COMMAND = "VM.flags"
ATTACH_TIMEOUT_S = 10.0
# How long before a drain to refresh maps: time for the attach (~0.1 s) to come back.
REFRESH_LEAD_S = 1.0
# A JVM not handling SIGQUIT yet is starting: look again soon; past this, it never will (-Xrs).
READY_RETRY_S = 0.5
READY_GIVE_UP_S = 60.0
# After a failed attach, wait this long before the next, doubling up to the maximum.
FAILURE_BACKOFF_S = 2.0
MAX_FAILURE_BACKOFF_S = 120.0
_MAX_OPTIONS_FILE_BYTES = 1 << 20

# `java` launcher options whose value is the next argument; the application starts at the
# first other non-option, or after -jar / -m.
_VALUE_OPTIONS = frozenset(
    {"-cp", "-classpath", "--class-path", "-p", "--module-path", "--upgrade-module-path",
     "--add-modules", "--limit-modules", "--add-exports", "--add-opens", "--add-reads",
     "--patch-module", "--enable-native-access", "--source"}
)  # fmt: skip
_APPLICATION = frozenset({"-jar", "-m", "--module"})
_OPTIONS_FILE = "-XX:VMOptionsFile="


def jvm_options(
    cmdline: list[str], environ: dict[str, str], read_file: Callable[[str], str]
) -> list[str | None]:
    """A JVM's options in the order HotSpot applies them (the last of a flag wins).

    Options files (@argfile, -XX:VMOptionsFile=) are read with read_file; one that cannot be
    read stands as None: it may set anything.
    """
    launcher: list[str] = []
    takes_value = False
    for arg in cmdline[1:]:
        if takes_value:
            takes_value = False
        elif arg.startswith("@"):
            pass  # an argfile: expanded where it stands, below
        elif arg in _APPLICATION or arg.startswith("--module=") or not arg.startswith("-"):
            break
        else:
            takes_value = arg in _VALUE_OPTIONS
        launcher.append(arg)
    options: list[str | None] = []
    for arg in [
        *_split(environ.get("JAVA_TOOL_OPTIONS", "")),
        *_split(environ.get("JDK_JAVA_OPTIONS", "")),
        *launcher,
        *_split(environ.get("_JAVA_OPTIONS", "")),
    ]:
        if arg.startswith("@"):
            path = arg[1:]
        elif arg.startswith(_OPTIONS_FILE):
            path = arg[len(_OPTIONS_FILE) :]
        else:
            options.append(arg)
            continue
        try:
            options.extend(_split(read_file(path), comments=True))
        except OSError:
            options.append(None)
    return options


def _split(text: str, *, comments: bool = False) -> list[str]:
    try:
        return shlex.split(text, comments=comments)
    except ValueError:  # unbalanced quotes: as HotSpot, split on whitespace
        return text.split()


def jvm_flag(options: Iterable[str | None], name: str) -> bool | None:
    """A boolean -XX flag: the last -XX:+NAME or -XX:-NAME; False if absent (the default of
    the flags asked here); None if an unreadable options file (None) came after."""
    value: bool | None = False
    for option in options:
        if option is None:
            value = None
        elif option in (f"-XX:+{name}", f"-XX:-{name}"):
            value = option[4] == "+"
    return value


@dataclass
class _Jvm:
    pid: int
    nspid: int
    start_time: int
    comm: str
    exe: str
    # An O_PATH descriptor of its root directory: its /tmp stays reachable after it exits,
    # for the map -XX:+DumpPerfMapAtExit writes then.
    root_fd: int
    frame_pointers: bool | None
    refusal: str | None  # why it must not be sent SIGQUIT, if it must not
    writes_map_at_exit: bool  # -XX:+DumpPerfMapAtExit (or maybe: an unreadable options file)
    attach: str | None = None
    perf_map_entries: int | None = None
    flags_known: bool = False
    due: float = math.inf  # when to attach at once (the first time)
    stale: bool = False  # wants a new map before the next drain
    not_before: float = 0.0  # no attach before this (back-off)
    attached_at: float = -math.inf
    drain_at: float = 0.0  # the drain the last attach was for: one per interval
    failures: int = 0  # in a row
    pending: Future[list[tuple[int, str]]] | None = None
    warned: bool = False
    seen_at: float = field(default_factory=time.monotonic)

    @property
    def root(self) -> str:
        return f"/proc/self/fd/{self.root_fd}"


class Jvms:
    """The JVMs the agent sampled or saw start, until forget(pid).

    reload_perf_map(pid, root) rereads a process's perf map through its root directory (a
    JVM's stays open here) and returns its entry count: Symbolizer.reload_perf_map.
    """

    def __init__(
        self,
        reload_perf_map: Callable[[int, str], int | None],
        *,
        interval_s: float,
        refresh_every_s: float = 60.0,
        attach_timeout_s: float = ATTACH_TIMEOUT_S,
        unwinds_java: Callable[[int], bool] = lambda pid: False,
    ) -> None:
        self._reload = reload_perf_map
        # Whether a JVM's Java frames are unwound without its frame pointers (its code
        # cache read from memory): then a JVM without them is not warned about.
        self._unwinds_java = unwinds_java
        self._lead_s = min(REFRESH_LEAD_S, interval_s / 2)
        self._refresh_every_s = refresh_every_s
        self._attach_timeout_s = attach_timeout_s
        self._jvms: dict[int, _Jvm] = {}
        self._rows: list[dict[str, Any]] = []
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="jvm-attach")
        self.stats = dict.fromkeys(("jvms", "attaches", "attach_failures", "refreshes"), 0)

    def observe(self, snapshot: ProcessSnapshot) -> None:
        """Start following a process if it is a JVM not followed yet (Symbolizer.on_snapshot)."""
        pid = snapshot.pid
        if not snapshot.hotspot:
            return
        known = self._jvms.get(pid)
        if known is not None:
            if known.start_time == snapshot.start_time:
                return
            os.close(self._jvms.pop(pid).root_fd)  # the pid was reused
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                pairs = f.read().decode(errors="replace").split("\0")
            root_fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return  # already gone
        environ = dict(pair.partition("=")[::2] for pair in pairs if pair)
        options = jvm_options(cmdline, environ, lambda path: _read_options_file(pid, path))
        disabled = jvm_flag(options, "DisableAttachMechanism")
        refusal = None
        if disabled is None:
            refusal = "an options file it names is unreadable: attach may be disabled"
        elif disabled:
            refusal = "disabled by -XX:+DisableAttachMechanism"
        jvm = _Jvm(
            pid,
            snapshot.nspid,
            snapshot.start_time,
            snapshot.comm,
            snapshot.exe,
            root_fd,
            frame_pointers=jvm_flag(options, "PreserveFramePointer"),
            refusal=refusal,
            writes_map_at_exit=jvm_flag(options, "DumpPerfMapAtExit") is not False,
            due=time.monotonic(),
        )
        self._jvms[pid] = jvm
        self.stats["jvms"] += 1
        self._report(jvm)

    def poll(self, drain_at: float) -> None:
        """Collect finished attaches and start due ones, stale maps' shortly before the drain
        at drain_at (time.monotonic()); never blocks."""
        now = time.monotonic()
        refresh = now >= drain_at - self._lead_s
        for jvm in list(self._jvms.values()):
            if jvm.pending is not None:
                if jvm.pending.done():
                    self._finish(jvm, now)
            elif now >= jvm.not_before and (
                jvm.due <= now or (refresh and jvm.stale and jvm.drain_at != drain_at)
            ):
                self._start(jvm, now, drain_at)

    def after_drain(self, lookups: Counter[int], misses: Counter[int]) -> None:
        """Mark stale the maps of JVMs whose samples ran JIT code (Symbolizer's
        take_jit_activity) if some of it was missing from the map, or on the timer."""
        now = time.monotonic()
        for pid in lookups:
            jvm = self._jvms.get(pid)
            if jvm is not None and (misses[pid] or now - jvm.attached_at >= self._refresh_every_s):
                jvm.stale = True

    def exited(self, pid: int) -> None:
        """A process exits: if a JVM, read its map once more (through the root it had), for
        its last samples and a map written at exit."""
        jvm = self._jvms.get(pid)
        if jvm is not None:
            self._reload(pid, jvm.root)

    def forget(self, pid: int) -> None:
        """Drop a JVM that exited (its last samples symbolized), with the perf map the agent
        had it write: else every JVM would leave one in its /tmp. One it writes itself as it
        exits (-XX:+DumpPerfMapAtExit) is its owner's and stays."""
        jvm = self._jvms.pop(pid, None)
        if jvm is None:
            return
        if jvm.perf_map_entries is not None and not jvm.writes_map_at_exit:
            _remove_perf_map(jvm)
        os.close(jvm.root_fd)

    def take_processes(self) -> pa.Table | None:
        """The PROCESSES rows learned since the last call, or None."""
        if not self._rows:
            return None
        rows, self._rows = self._rows, []
        return pa.Table.from_pylist(rows, schema=schema.PROCESSES)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for jvm in self._jvms.values():  # still running: their maps stay
            os.close(jvm.root_fd)
        self._jvms.clear()

    def _start(self, jvm: _Jvm, now: float, drain_at: float) -> None:
        jvm.due = math.inf
        if not os.path.exists(socket_path(jvm.pid, jvm.nspid)):
            # Its attach listener must be started with SIGQUIT: only if that is safe.
            if jvm.refusal is not None:
                jvm.not_before = math.inf
                self._update(jvm, attach=f"not tried: {jvm.refusal}")
                return
            try:
                with open(f"/proc/{jvm.pid}/status", encoding="utf-8") as f:
                    ready = catches_sigquit(f.read())
            except OSError:
                return  # exited: forgotten after the next drain
            if not ready:
                if now - jvm.seen_at < READY_GIVE_UP_S:
                    jvm.due = now + READY_RETRY_S
                else:
                    jvm.not_before = math.inf
                    self._update(jvm, attach="not tried: the JVM does not handle SIGQUIT")
                return
        commands = [PERF_MAP_COMMAND] if jvm.flags_known else [PERF_MAP_COMMAND, FLAGS_COMMAND]
        if jvm.attached_at > -math.inf:
            self.stats["refreshes"] += 1
        jvm.attached_at, jvm.drain_at, jvm.stale = now, drain_at, False
        jvm.pending = self._pool.submit(
            attach, jvm.pid, jvm.nspid, jvm.start_time, commands, self._attach_timeout_s
        )
        self.stats["attaches"] += 1

    def _finish(self, jvm: _Jvm, now: float) -> None:
        future, jvm.pending = jvm.pending, None
        assert future is not None
        try:
            (status, output), *flags = future.result()
        except AttachError as exc:
            self.stats["attach_failures"] += 1
            backoff = min(MAX_FAILURE_BACKOFF_S, FAILURE_BACKOFF_S * 2**jvm.failures)
            jvm.failures += 1
            jvm.not_before, jvm.due = now + backoff, now + backoff
            if _running(jvm):  # else it failed because the JVM exited: nothing to say
                log.warning("JVM %d (%s): attach failed: %s", jvm.pid, jvm.comm, exc)
            self._update(jvm, attach=f"failed: {exc}")
            return
        jvm.failures = 0
        frame_pointers = jvm.frame_pointers
        if flags and flags[0][0] == 0:
            jvm.flags_known = True
            frame_pointers = jvm_flag(flags[0][1].split(), "PreserveFramePointer")
        if status != 0:
            # Before JDK 17 there is no Compiler.perfmap: asking again cannot help.
            jvm.not_before = math.inf
            reason = f"failed: {PERF_MAP_COMMAND}: {output.strip()[:200]}"
            self._update(jvm, attach=reason, frame_pointers=frame_pointers)
            return
        entries = self._reload(jvm.pid, jvm.root)  # even if it exited since it answered
        if jvm.perf_map_entries is None:
            log.info("JVM %d (%s): perf map of %s entries", jvm.pid, jvm.comm, entries)
        # Still compiling: the next interval's samples will want a newer map.
        jvm.stale |= (entries or 0) > (jvm.perf_map_entries or 0)
        self._update(jvm, attach="ok", perf_map_entries=entries, frame_pointers=frame_pointers)

    def _update(self, jvm: _Jvm, **changes: Any) -> None:
        if any(getattr(jvm, name) != value for name, value in changes.items()):
            for name, value in changes.items():
                setattr(jvm, name, value)
            self._report(jvm)

    def _report(self, jvm: _Jvm) -> None:
        self._rows.append(
            {
                "ts": datetime.now(UTC),
                "pid": jvm.pid,
                "nspid": jvm.nspid,
                "comm": schema.printable(jvm.comm),
                "exe": jvm.exe,
                "runtime": "jvm",
                "frame_pointers": jvm.frame_pointers,
                "attach": jvm.attach,
                "perf_map_entries": jvm.perf_map_entries,
            }
        )
        if jvm.frame_pointers is False and not jvm.warned and not self._unwinds_java(jvm.pid):
            jvm.warned = True
            log.warning(
                "JVM %d (%s) runs without -XX:+PreserveFramePointer: its stacks stop at the "
                "first JIT-compiled frame; restart it with -XX:+PreserveFramePointer",
                jvm.pid,
                jvm.comm,
            )


def _running(jvm: _Jvm) -> bool:
    try:
        return read_stat(jvm.pid)[1] == jvm.start_time
    except OSError:
        return False


def _remove_perf_map(jvm: _Jvm) -> None:
    try:
        # Not through a link: a container's /tmp may be one, and the agent's root would
        # resolve it on the host.
        tmp = os.open(
            "tmp", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=jvm.root_fd
        )
    except OSError:
        return
    try:
        os.unlink(f"perf-{jvm.nspid}.map", dir_fd=tmp)  # unlinkat: never follows it either
    except OSError:
        pass  # already gone
    finally:
        os.close(tmp)


def _read_options_file(pid: int, path: str) -> str:
    """An options file named by a JVM's arguments, as the JVM saw it (relative to its cwd)."""
    base = f"/proc/{pid}/root" if path.startswith("/") else f"/proc/{pid}/cwd/"
    fd = os.open(base + path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        return os.read(fd, _MAX_OPTIONS_FILE_BYTES).decode(errors="replace")
    finally:
        os.close(fd)
