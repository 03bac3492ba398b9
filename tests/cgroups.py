"""Real processes in real cgroup v2 directories, made under the test's own cgroup and removed
after. A pytest plugin: `pytest_plugins = ["tests.cgroups"]` gives a test the `cgroups` fixture.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.conftest import require


def own_cgroup2_dir() -> Path | None:
    """This process's cgroup in the cgroup v2 hierarchy (/sys/fs/cgroup, or .../unified on a
    hybrid host), or None without one."""
    with open("/proc/self/mounts", encoding="utf-8") as f:
        mounts = [line.split() for line in f]
    roots = [fields[1] for fields in mounts if fields[2] == "cgroup2"]
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        own = next((line.strip()[3:] for line in f if line.startswith("0::")), None)
    if not roots or own is None:
        return None
    return Path(roots[0] + own)


class ScratchCgroups:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.processes: list[subprocess.Popen[bytes]] = []

    def move(self, pid: int, path: str) -> Path:
        """Create base/path (nested) and move pid into it; returns the directory."""
        directory = self.base / path
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup.procs").write_text(str(pid))
        return directory

    @staticmethod
    def wait_exec_done(pid: int) -> None:
        """Wait until pid's new program has its arguments and environment in place.

        Popen returns once the exec passed its point of no return, which is before the kernel
        copies the arguments and environment onto the new stack: until then /proc/PID/cmdline
        and environ read empty. The environment is copied last. (The agent learns of an exec
        from the sched_process_exec tracepoint, which fires after that copy.)
        """
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{pid}/environ").read_bytes():
            assert time.monotonic() < deadline, f"pid {pid} has no environment"
            time.sleep(0.001)

    def spawn(
        self,
        args: Sequence[str] = ("sleep", "60"),
        *,
        env: Mapping[str, str] | None = None,
        cgroup: str | None = None,
    ) -> int:
        """Start a process (killed at teardown), in base/cgroup if given; returns its pid."""
        process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL)
        self.processes.append(process)
        self.wait_exec_done(process.pid)
        if cgroup is not None:
            self.move(process.pid, cgroup)
        return process.pid


@pytest.fixture
def cgroups() -> Iterator[ScratchCgroups]:
    """A fresh cgroup directory below ours. Moving processes into a child of our own cgroup is
    allowed (ours has processes, so it enables no controllers for children) and keeps them
    under whatever limits our own cgroup has."""
    require(os.geteuid() == 0, "creating cgroups needs root")
    own = own_cgroup2_dir()
    require(own is not None and own.is_dir(), "no cgroup v2 hierarchy mounted")
    assert own is not None
    scratch = ScratchCgroups(own / f"fleetprof-test-{uuid.uuid4().hex[:8]}")
    scratch.base.mkdir()
    try:
        yield scratch
    finally:
        for process in scratch.processes:
            process.kill()
            process.wait()
        _remove(scratch.base)


def _remove(base: Path) -> None:
    # Deepest first; a cgroup stays busy for a moment after its last process was reaped.
    directories = sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for directory in [*directories, base]:
        deadline = time.monotonic() + 5
        while True:
            try:
                directory.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
