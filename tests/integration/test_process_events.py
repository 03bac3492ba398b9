"""Process events from the kernel: first samples once per process image, exec and exit of
the processes sampled (of every process while sessions run), and a session's filter taking
in children from their fork."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from tests.conftest import require_ebpf

# Burns ~0.4 s of CPU as a shell, then execs a Python that burns ~0.4 s more.
BUSY_SHELL = "i=0; while [ $i -lt 150000 ]; do i=$((i+1)); done; exec {python} -c '{busy}'"
BUSY_PYTHON = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass"


@pytest.fixture
def cpu_sampler() -> Iterator[Any]:
    require_ebpf()
    from fleetprof.node_agent.samplers import SamplerOptions
    from fleetprof.node_agent.samplers.cpu import CpuSampler

    sampler = CpuSampler(SamplerOptions(frequency=99))
    yield sampler
    sampler.close()


def poll_until(events: Any, done: Any, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        events.poll(50)


def test_first_sample_once_per_image_exec_and_exit_of_sampled_processes(cpu_sampler) -> None:
    from fleetprof.node_agent.process_events import ProcessEvents

    events = ProcessEvents([cpu_sampler.process_events_fd()])
    seen: list[tuple[str, int]] = []
    events.subscribe(
        on_first_sample=lambda pid: seen.append(("first", pid)),
        on_exec=lambda pid: seen.append(("exec", pid)),
        on_exit=lambda pid: seen.append(("exit", pid)),
    )
    try:
        script = BUSY_SHELL.format(python=sys.executable, busy=BUSY_PYTHON)
        busy = subprocess.Popen(["sh", "-c", script])
        # On a CPU for about a millisecond (its exec and start-up): at 99 Hz it is sampled
        # about once in ten runs, and then reports one first sample, never more.
        idle = subprocess.Popen(["sleep", "0.2"])
        poll_until(
            events,
            lambda: (
                busy.poll() is not None and idle.poll() is not None and ("exit", busy.pid) in seen
            ),
        )
        # Exited before its first sample was read: nothing more comes of it.
        unread = subprocess.Popen(BUSY_SHELL.format(python=sys.executable, busy="pass"), shell=True)
        unread.wait(timeout=60)
        poll_until(events, lambda: ("first", unread.pid) in seen)
        events.poll(300)
    finally:
        events.close()
    of_busy = [kind for kind, pid in seen if pid == busy.pid]
    # Its first sample as a shell, the exec of python, the first sample of that new image,
    # its exit: samples in between report nothing. (Popen's child may be sampled before its
    # exec, as a copy of pytest: then its exec is reported too, at the start.)
    assert of_busy[-4:] == ["first", "exec", "first", "exit"]
    assert of_busy[:-4] in ([], ["first", "exec"])
    # A process never sampled reports nothing; sampled, its exit (and exec) as well, unless
    # its first sample was read after it exited (a loaded machine): then, as `unread`, none.
    assert [kind for kind, pid in seen if pid == idle.pid] in (
        [],
        ["first"],
        ["first", "exit"],
        ["first", "exec", "exit"],
        ["first", "exec", "first", "exit"],
    )
    assert [kind for kind, pid in seen if pid == unread.pid][-1] == "first"
    assert busy.pid not in events.sampled  # exited: forgotten
    events.forget([unread.pid])  # the agent's sweep, at its next drain
    assert unread.pid not in events.sampled


def test_a_process_sampled_while_it_exits_is_not_reported_again(cpu_sampler) -> None:
    """Freeing a large memory takes its exiting process a tenth of a second after
    sched_process_exit: samples then are of a process already reported gone."""
    from fleetprof.node_agent.process_events import ProcessEvents

    events = ProcessEvents([cpu_sampler.process_events_fd()])
    seen: list[tuple[str, int]] = []
    events.subscribe(
        on_first_sample=lambda pid: seen.append(("first", pid)),
        on_exec=lambda pid: seen.append(("exec", pid)),
        on_exit=lambda pid: seen.append(("exit", pid)),
    )
    # 1 GiB in small pages touched, then an exit that leaves the kernel to free them all.
    hoarder = (
        "import mmap, os\n"
        "m = mmap.mmap(-1, 1 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
        "m.madvise(mmap.MADV_NOHUGEPAGE)\n"
        "m[::4096] = b'x' * (1 << 18)\n"
        "os._exit(0)\n"
    )
    pids = []
    try:
        for _ in range(6):
            process = subprocess.Popen([sys.executable, "-c", hoarder])
            pids.append(process.pid)
            # Its first sample read while it runs: its exit is then reported.
            poll_until(events, lambda p=process: p.poll() is not None, timeout_s=60)
            poll_until(events, lambda p=process: ("exit", p.pid) in seen, timeout_s=5)
        events.poll(300)
    finally:
        events.close()
    for pid in pids:
        kinds = [kind for kind, of in seen if of == pid]
        # (Popen's child may be sampled before its exec, as a copy of pytest.)
        assert kinds in ([], ["first", "exit"], ["first", "exec", "first", "exit"]), (
            f"pid {pid}: {kinds}"
        )
    assert any(("exit", pid) in seen for pid in pids), f"no hoarder was sampled: {seen}"


def test_every_process_reported_while_sessions_run(cpu_sampler) -> None:
    from fleetprof.node_agent.process_events import ProcessEvents

    events = ProcessEvents([cpu_sampler.process_events_fd()])
    seen: list[tuple[str, int]] = []
    events.subscribe(
        on_exec=lambda pid: seen.append(("exec", pid)),
        on_exit=lambda pid: seen.append(("exit", pid)),
    )
    try:
        events.report_every_process(True)
        reported = subprocess.Popen(["sleep", "0.1"])
        reported.wait(timeout=10)
        poll_until(events, lambda: ("exit", reported.pid) in seen)
        events.report_every_process(False)
        unreported = subprocess.Popen(["sleep", "0"])
        unreported.wait(timeout=10)
        events.poll(300)
    finally:
        events.close()
    assert [kind for kind, pid in seen if pid == reported.pid] == ["exec", "exit"]
    assert [kind for kind, pid in seen if pid == unreported.pid] == []


def test_first_sample_gives_the_identity_proc_gives(cpu_sampler) -> None:
    """What the kernel reads at a first sample spares the agent /proc/PID/stat and status:
    it must be what they say (comm, start time in clock ticks, parent, pid as seen inside
    its PID namespace), for a process whose sampled thread is not its main one."""
    from fleetprof.node_agent.process_events import ProcessEvents
    from fleetprof.node_agent.symbolize.process import ProcessIdentity, read_stat

    events = ProcessEvents([cpu_sampler.process_events_fd()])
    identities: dict[int, ProcessIdentity | None] = {}
    events.subscribe(on_first_sample=lambda pid: identities.__setitem__(pid, events.identity(pid)))
    burner = (
        "import sys, threading, time\n"
        "def burn():\n"
        "    end = time.process_time() + 1.5\n"
        "    while time.process_time() < end: pass\n"
        "worker = threading.Thread(target=burn, name='burner'); worker.start(); worker.join()\n"
        "sys.stdin.readline()\n"
    )
    # In a PID namespace of its own when unshare can (root): its pid inside is 1.
    unshare = ["unshare", "--pid", "--fork", "--kill-child"] if os.geteuid() == 0 else []
    program = subprocess.Popen(
        [*unshare, sys.executable, "-c", burner], stdin=subprocess.PIPE, text=True
    )
    try:
        pid = program.pid
        if unshare:  # the python under unshare's fork
            poll_until(events, lambda: _children(program.pid) != [], timeout_s=10)
            pid = _children(program.pid)[0]
        poll_until(events, lambda: pid in identities)
        comm, start_time = read_stat(pid)
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            status = dict(line.split(":\t", 1) for line in f.read().splitlines())
        expected = ProcessIdentity(
            comm, start_time, int(status["PPid"]), int(status["NSpid"].split()[-1])
        )
        assert identities[pid] == expected
        if unshare:
            assert expected.nspid == 1
    finally:
        program.communicate("\n", timeout=30)
        events.close()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="utf-8") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def test_session_filter_counts_children_from_their_fork() -> None:
    require_ebpf()
    from fleetprof.node_agent.samplers import SamplerOptions
    from fleetprof.node_agent.samplers.cpu import CpuSampler

    sampler = CpuSampler(replace(SamplerOptions(frequency=99), session_filter=True))
    # The parent waits for a line, then forks a child that burns CPU without exec'ing.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time\n"
            "sys.stdin.readline()\n"
            "child = os.fork()\n"
            "if child == 0:\n"
            "    end = time.process_time() + 0.5\n"
            "    while time.process_time() < end: pass\n"
            "    os._exit(0)\n"
            "print(child, flush=True)\n"
            "os.waitpid(child, 0)\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdin is not None and parent.stdout is not None
        sampler.add_pids([parent.pid])
        parent.stdin.write("go\n")
        parent.stdin.flush()
        child = int(parent.stdout.readline())
        parent.wait(timeout=30)
        samples = sampler.drain().samples
    finally:
        parent.kill()
        parent.wait()
        sampler.close()
    # User space never named the child: the kernel took it in at its fork.
    assert sum(s.weight for s in samples if s.pid == child) >= 10
