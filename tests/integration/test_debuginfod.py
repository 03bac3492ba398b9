"""Debug files of stripped binaries fetched from a real `debuginfod` server (elfutils) by
a real agent, and what the agent does when the server is silent or absent."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest

from fleetprof.node_agent.symbolize.debuginfod import DebuginfodOptions
from tests.conftest import free_port, require
from tests.integration.test_native_unwind import STRIPPED, build, build_id, stored_stacks

INTERVAL_S = 1.0


def stripped_binary(folder: Path, name: str, debug_dir: Path | None) -> Path:
    """STRIPPED built -O2 -g as `name`, stripped; its debug file into debug_dir if given.
    (The source's file name is in the debug info: each name is a build id of its own.)"""
    binary = build(folder, name, STRIPPED, "-g", "-Wl,--build-id")
    if debug_dir is not None:
        debug = debug_dir / f"{name}.debug"
        subprocess.run(["objcopy", "--only-keep-debug", str(binary), str(debug)], check=True)
    subprocess.run(["strip", "--strip-all", str(binary)], check=True)
    return binary


class Server:
    """`debuginfod -F DIR` on a loopback port, its log (-v: one line per request) kept."""

    def __init__(self, directory: Path, folder: Path) -> None:
        require(shutil.which("debuginfod") is not None, "debuginfod is not installed")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = folder / "debuginfod.log"
        self._process = subprocess.Popen(
            ["debuginfod", "-v", "-p", self.url.rsplit(":", 1)[1], "-F", str(directory),
             "-d", str(folder / "debuginfod.sqlite"), "-t", "0", "-g", "0"],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_for(self, build: str) -> None:
        """Until the server has scanned the debug file of this build id."""
        deadline = time.monotonic() + 30
        while self.status(build) != 200:
            assert self._process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "debuginfod never served the debug file"
            time.sleep(0.2)

    def status(self, build: str) -> int:
        try:
            with urllib.request.urlopen(f"{self.url}/buildid/{build}/debuginfo", timeout=5):
                return 200
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return 0

    def agent_requests(self, build: str) -> list[str]:
        """The log lines of the agent's requests for this build id."""
        lines = self.log.read_text(errors="replace").splitlines()
        return [line for line in lines if "UA:fleetprof" in line and build in line]

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(10)


@pytest.fixture
def debuginfod_server(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    served = tmp_path / "served"
    served.mkdir()
    server = Server(served, tmp_path)
    yield server, served
    server.stop()


def share(stacks: dict[tuple[str, ...], int], leaf: str) -> tuple[int, float]:
    """(samples, share of them whose leaf is `leaf` under main)."""
    total = sum(stacks.values())
    named = sum(n for path, n in stacks.items() if path[-1:] == (leaf,) and "main" in path)
    return total, named / max(total, 1)


def test_a_stripped_binary_is_named_from_a_debuginfod_server_and_a_404_is_asked_once(
    aggregator, running_agent, debuginfod_server, tmp_path
) -> None:
    server, served = debuginfod_server
    binary = stripped_binary(tmp_path, "fetched", served)
    missing = stripped_binary(tmp_path, "missing", None)  # its debug file is nowhere
    fetched_id, missing_id = build_id(binary), build_id(missing)
    server.wait_for(fetched_id)
    cache = tmp_path / "debuginfod-cache"
    options = DebuginfodOptions((server.url,), str(cache), timeout_s=5.0)
    agent = running_agent(frequency=99, interval_s=INTERVAL_S, debuginfod=options)
    process = subprocess.Popen([str(binary), "8"])
    deadline = time.monotonic() + 20
    while not agent.debuginfod.stats["fetched"]:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, agent.debuginfod.stats  # type: ignore[attr-defined]
        time.sleep(0.05)
    # Delivered at the next drain: samples stored from the one after are named.
    named_since = datetime.now(UTC) + timedelta(seconds=2 * INTERVAL_S)
    # The same build without a debug file anywhere, twice (a copy: a file of its own,
    # symbols read again): the server is asked once.
    copy = tmp_path / "copy-of-missing"
    shutil.copy(missing, copy)
    for program in (missing, copy):
        subprocess.run([str(program), "2"], check=True)
    process.wait()
    time.sleep(2.5 * INTERVAL_S)  # its last samples drained and stored
    total, named = share(stored_stacks(aggregator, process.pid, named_since), "hidden_work")
    assert total >= 50 and named >= 0.9, stored_stacks(aggregator, process.pid, named_since)
    assert (cache / fetched_id / "debuginfo").stat().st_size > 0
    stats = agent.debuginfod.stats  # type: ignore[attr-defined]
    assert stats["fetched"] == 1 and stats["not_found"] >= 1, stats
    assert len(server.agent_requests(fetched_id)) == 1
    assert len(server.agent_requests(missing_id)) == 1, server.agent_requests(missing_id)
    miss = (cache / missing_id / "debuginfo").stat()
    assert miss.st_size == 0 and miss.st_mode & 0o777 == 0  # elfutils' record of a miss


@pytest.mark.parametrize("server", ["silent", "absent"])
def test_a_silent_or_absent_server_never_delays_a_drain(
    aggregator, running_agent, tmp_path, server
) -> None:
    """A server that accepts and never answers (the client's timeout, 3 s, runs out) or
    refuses: drains keep their interval, the frames keep their fallback name."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    if server == "silent":
        listener.listen(16)  # connections complete in the backlog; nothing is ever read
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    binary = stripped_binary(tmp_path, "unserved", None)
    options = DebuginfodOptions((url,), str(tmp_path / "cache"), timeout_s=3.0)
    try:
        agent = running_agent(frequency=99, interval_s=INTERVAL_S, debuginfod=options)
        drains: list[float] = []
        drain_once = agent.drain_once  # type: ignore[attr-defined]

        def timed_drain() -> None:
            drain_once()
            drains.append(time.monotonic())

        agent.drain_once = timed_drain  # type: ignore[attr-defined]
        started = datetime.now(UTC)
        process = subprocess.Popen([str(binary), "7"])
        process.wait()
        time.sleep(2.5 * INTERVAL_S)
    finally:
        listener.close()
    stats = agent.debuginfod.stats  # type: ignore[attr-defined]
    assert stats["failed"] >= 1 and stats["fetched"] == 0, stats
    gaps = [later - earlier for earlier, later in pairwise(drains)]
    assert len(gaps) >= 6 and max(gaps) < INTERVAL_S + 1.5, gaps
    # Named as without a debuginfod client: after its file ("[unserved]"), everywhere.
    stacks = stored_stacks(aggregator, process.pid, started)
    total = sum(stacks.values())
    fallback = sum(n for path, n in stacks.items() if path[-1:] == ("[unserved]",))
    assert total >= 50 and fallback / total >= 0.9, stacks.most_common(3)
