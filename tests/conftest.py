"""Shared fixtures: a real aggregator on loopback, real agents, the bundled workloads."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetprof import workloads
from fleetprof.aggregator.server import Aggregator

IN_CI = os.environ.get("CI") == "true"


def require(condition: bool, reason: str) -> None:
    """Skip on a developer machine that lacks something; in CI that is a failure."""
    if not condition:
        if IN_CI:
            pytest.fail(f"CI cannot skip: {reason}")
        pytest.skip(reason)


def require_ebpf() -> None:
    require(os.geteuid() == 0, "eBPF tests need root")
    try:
        import bcc  # noqa: F401
    except ImportError:
        require(False, "BCC (python3-bpfcc) is not installed; run ./setup-host.sh")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 8 MB filesystem of its own: a real ENOSPC without filling the machine's disk."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)])
    require(result.returncode == 0, "cannot mount a tmpfs (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def aggregator(tmp_path: Path) -> Iterator[Aggregator]:
    # the web UI too (server.web.url), on a free loopback port
    server = Aggregator(tmp_path / "profiles.duckdb", "127.0.0.1:0", http_listen="127.0.0.1:0")
    server.start()
    yield server
    server.stop(grace_s=0)


@pytest.fixture(scope="session")
def native_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(shutil.which("gcc") is not None, "gcc is not installed")
    return workloads.build_native(tmp_path_factory.mktemp("native"))


@pytest.fixture(scope="session")
def java_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(shutil.which("javac") is not None, "a JDK is not installed")
    return workloads.build_java(tmp_path_factory.mktemp("java"))


@pytest.fixture(scope="session")
def unwind_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One unwind-row cache for every test's agent, as a node's agent keeps one across
    restarts: each agent would otherwise parse the CFI of every library of the machine's
    processes (libLLVM's included) again, seconds of CPU per test."""
    return tmp_path_factory.mktemp("unwind-cache")


@pytest.fixture
def running_agent(
    aggregator: Aggregator, tmp_path: Path, unwind_cache: Path
) -> Iterator[Callable[..., object]]:
    """Start a real agent (BCC) shipping to the test aggregator; stopped at teardown."""
    require_ebpf()
    from fleetprof.node_agent.agent import Agent, AgentConfig
    from fleetprof.node_agent.samplers import SamplerOptions

    started: list[tuple[threading.Event, threading.Thread]] = []

    def start(
        frequency: int = 99,
        interval_s: float = 1.0,
        node: str = "test-node",
        events: tuple[str, ...] = ("cpu",),
        **options: Any,
    ) -> Agent:
        """`options`: more of AgentConfig's fields."""
        config = AgentConfig(
            aggregator.address,
            node,
            interval_s,
            events,
            spool_dir=str(tmp_path / f"spool-{node}"),
            sampling=SamplerOptions(frequency=frequency),
            unwind_cache_dir=str(unwind_cache),
            **options,
        )
        agent = Agent(config)
        stop = threading.Event()
        thread = threading.Thread(target=agent.run, args=(stop,), name=f"agent-{node}")
        thread.start()
        # Past start-up (its first drain loads the symbols of everything already running),
        # the agent handles process events within milliseconds.
        deadline = time.monotonic() + 60
        while not agent.stats["drains"] and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        started.append((stop, thread))
        agent.stop = lambda: (stop.set(), thread.join())  # type: ignore[attr-defined]
        return agent

    yield start
    for stop, thread in started:
        stop.set()
        thread.join()
