"""Debug files of stripped binaries fetched from a real `debuginfod` server (elfutils) by
a real agent, and what the agent does when the server is silent or absent."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest

from fleetprof.node_agent.symbolize.debuginfod import DebuginfodOptions
from tests.conftest import free_port, require
from tests.integration.test_native_unwind import STRIPPED, build, build_id, stored_stacks

INTERVAL_S = 1.0
TIMEOUT_S = 5.0


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


def timed(call: Callable[..., object], spans: list[tuple[float, float]]) -> Callable[..., object]:
    """`call`, recording each call's (start, end) in spans."""

    def timed_call(*args: object) -> object:
        start = time.monotonic()
        try:
            return call(*args)
        finally:
            spans.append((start, time.monotonic()))

    return timed_call


def share(stacks: dict[tuple[str, ...], int], leaf: str) -> tuple[int, float]:
    """(samples, share of them whose leaf is `leaf`). Whether stacks reach main is
    test_native_unwind.py's business: a busy machine can delay a process's tables."""
    total = sum(stacks.values())
    return total, sum(n for path, n in stacks.items() if path[-1:] == (leaf,)) / max(total, 1)


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
    stacks = stored_stacks(aggregator, process.pid, named_since)
    total, named = share(stacks, "hidden_work")
    assert total >= 30 and named >= 0.9, stacks
    assert any("main" in path for path in stacks), stacks  # named from the fetched file too
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
    """A server that accepts and never answers (the client waits its whole timeout, then
    again a second later for the next build id) or refuses: whole drains run while the
    client waits, its calls from the drain thread return at once, and the frames keep their
    fallback name."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    waits: list[tuple[float, float]] = []  # (connected, closed by the client) per request
    if server == "silent":
        listener.listen(16)
        threading.Thread(target=never_answer, args=(listener, waits), daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    binary = stripped_binary(tmp_path, "unserved", None)
    options = DebuginfodOptions((url,), str(tmp_path / "cache"), timeout_s=TIMEOUT_S, retry_s=1)
    try:
        agent = running_agent(frequency=99, interval_s=INTERVAL_S, debuginfod=options)
        drains: list[tuple[float, float]] = []  # (start, end)
        calls: list[tuple[float, float]] = []  # the drain thread's calls to the client
        agent.drain_once = timed(agent.drain_once, drains)  # type: ignore[attr-defined]
        client = agent.debuginfod  # type: ignore[attr-defined]
        client.request, client.deliver = timed(client.request, calls), timed(client.deliver, calls)
        started = datetime.now(UTC)
        process = subprocess.Popen([str(binary), str(3 * int(TIMEOUT_S))])
        process.wait()
        time.sleep(2.5 * INTERVAL_S)
    finally:
        listener.close()
    assert client.stats["failed"] and not client.stats["fetched"], client.stats
    assert len(drains) >= 4, drains
    assert calls and max(end - start for start, end in calls) < 0.5, calls
    gaps = [later[0] - earlier[0] for earlier, later in pairwise(drains)]
    assert max(gaps) < TIMEOUT_S, drains  # a drain that waited would leave more
    if server == "silent":
        during = [d for d in drains if any(w[0] < d[0] and d[1] < w[1] for w in waits)]
        assert during, (waits, drains)
    # Named as without a debuginfod client: after its file ("[unserved]"), everywhere.
    total, fallback = share(stored_stacks(aggregator, process.pid, started), "[unserved]")
    assert total >= 30 and fallback >= 0.9, stored_stacks(aggregator, process.pid, started)


def never_answer(listener: socket.socket, waits: list[tuple[float, float]]) -> None:
    """Accept connections until the listener closes; read each, never answer it, and note
    (when it came, when its client gave up)."""

    def wait(connection: socket.socket, since: float) -> None:
        with connection, contextlib.suppress(OSError):
            while connection.recv(4096):
                pass
            waits.append((since, time.monotonic()))

    with contextlib.suppress(OSError):
        while True:
            connection = listener.accept()[0]
            threading.Thread(target=wait, args=(connection, time.monotonic()), daemon=True).start()
