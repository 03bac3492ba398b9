"""Several hosts on one machine: three agent processes, each in its own network namespace
with its own node name, one aggregator on the other side of their veth links. A per-job
session (`fleetprof profile`, a real process) reaches them all, survives one agent's SIGKILL
and restart, and merges their graphs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pytest

from fleetprof.proto.security import ClientSecurity
from fleetprof.query.filters import SampleFilter
from fleetprof.query.flame import load_flame
from fleetprof.query.source import AggregatorSource
from tests.conftest import require_ebpf
from tests.integration.test_faults import agent_process, start_aggregator
from tests.netns import Host, network_hosts

JOB = "multi-host-job"
NODES = 3
PORT = 7470
# Long enough for a killed agent to restart (a BPF compile, slow on a loaded machine) and
# still sample a good part of the session.
SESSION_S = 90


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    require_ebpf()
    with network_hosts(NODES) as hosts:
        yield hosts


def wait_for_line(path: Path, pattern: str, count: int = 1, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while len(re.findall(pattern, path.read_text())) < count:
        assert time.monotonic() < deadline, f"{pattern!r} not in {path}:\n{path.read_text()}"
        time.sleep(0.1)


def test_session_spans_hosts_and_survives_an_agent_restart(
    tmp_path: Path, native_binary: Path, hosts: list[Host]
) -> None:
    gateway = hosts[0].gateway  # every host reaches the root namespace through its link
    address = f"{gateway}:{PORT}"
    db, log = tmp_path / "profiles.duckdb", tmp_path / "aggregator.log"
    aggregator = start_aggregator(db, PORT, gateway, log=log)
    job = subprocess.Popen(
        [str(native_binary), str(SESSION_S + 120)], env={**os.environ, "FLEETPROF_JOB": JOB}
    )
    profile: subprocess.Popen[str] | None = None

    def start_agent(i: int) -> subprocess.Popen[str]:
        spool = tmp_path / f"spool-{i}"
        extra = ("--node", f"node-{i}", "--frequency", "19", "--interval", "2", "--insecure")
        return agent_process(address, spool, *extra, host=hosts[i])

    with ThreadPoolExecutor(NODES) as starting:
        agents = list(starting.map(start_agent, range(NODES)))
    try:
        for i in range(NODES):
            wait_for_line(log, rf"\(node-{i}\) connected")
        output = tmp_path / "job.html"
        command = [sys.executable, "-m", "fleetprof", "profile", "--job", JOB]
        command += ["--duration", f"{SESSION_S}s", "--frequency", "99", "-o", str(output)]
        profile = subprocess.Popen(
            [*command, "--aggregator", address, "--insecure"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines = [profile.stdout.readline()]
        assert f"{NODES} agent(s) connected" in lines[0], lines[0] + profile.stderr.read()
        while f"{NODES} node(s) answering" not in lines[-1]:
            lines.append(profile.stdout.readline())
            assert lines[-1], "".join(lines) + profile.stderr.read()
        time.sleep(3)  # node-2 samples and ships a while, then crashes
        agents[2].send_signal(signal.SIGKILL)
        agents[2].wait()
        killed = time.monotonic()
        agents[2] = start_agent(2)
        restart_s = time.monotonic() - killed
        out, err = profile.communicate(timeout=SESSION_S + 60)
        assert profile.returncode == 0, err
        out = "".join(lines) + out
        session_id = out.split("session ")[1].split(":")[0]
        # Each node's graph of the session, drawn from the aggregator as the merged one is.
        source = AggregatorSource(address, security=ClientSecurity(insecure=True))
        try:
            per_node = {
                f"node-{i}": load_flame(
                    source, SampleFilter(session=session_id, nodes=(f"node-{i}",))
                ).total
                for i in range(NODES)
            }
        finally:
            source.close()
    finally:
        if profile is not None:
            profile.kill()
        for agent in agents:
            agent.send_signal(signal.SIGTERM)
        for agent in agents:
            agent.wait(timeout=60)
        job.kill()
        aggregator.send_signal(signal.SIGTERM)
        aggregator.wait()

    merged = int(re.search(r"wrote .* \(([\d,]+) samples\)", out).group(1).replace(",", ""))
    assert all(total > 0 for total in per_node.values()), per_node
    assert merged == sum(per_node.values())
    # The per-node table lists every node, each finished (the restarted one too).
    table = out.split("wrote")[1]
    for node in per_node:
        finished = re.search(rf"^{node}\s+\d+\s+[\d.]+%\s+finished$", table, re.MULTILINE)
        assert finished, f"{table}(node-2 took {restart_s:.0f} s to restart)"
    with duckdb.connect(str(db), read_only=True) as conn:
        agents_of = dict(
            conn.execute(
                "SELECT node, count(DISTINCT agent_id) FROM samples WHERE session_id = ? "
                "GROUP BY node",
                [session_id],
            ).fetchall()
        )
        state = conn.execute(
            "SELECT state FROM sessions WHERE session_id = ?", [session_id]
        ).fetchone()
    # node-2's agent before the crash and its successor both sampled the session: the
    # restarted agent received the still-running session when it reconnected.
    assert agents_of == {"node-0": 1, "node-1": 1, "node-2": 2}
    assert state == ("done",)
