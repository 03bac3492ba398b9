"""Per-job on-demand sessions, end to end: `fleetprof profile` → aggregator → agents (real
BCC, in-kernel pid filter) → merged flame graph and per-node table."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

from fleetprof.cli import main

JOB = "job-7"
SESSION_HZ = 99


def cpu_seconds(pid: int) -> float:
    """user + system time of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def session_rows(aggregator, session_id: str) -> list[tuple]:
    return (
        aggregator.store.reader()
        .execute(
            "SELECT node, pid, job, sum(weight) FROM samples WHERE session_id = ? GROUP BY ALL",
            [session_id],
        )
        .fetchall()
    )


def test_profile_a_job_on_every_node(aggregator, running_agent, native_binary, tmp_path, capsys):
    first = running_agent(frequency=19, interval_s=2.0, node="node-a")
    second = running_agent(frequency=19, interval_s=2.0, node="node-b")
    env = {**os.environ, "FLEETPROF_JOB": JOB}
    in_job = subprocess.Popen([str(native_binary), "25"], env=env)
    outsider = subprocess.Popen([str(native_binary), "25"])
    output = tmp_path / "job.html"
    # node-b dies in the middle of the session and comes back: it rejoins.
    restarter = threading.Timer(2.5, lambda: (second.stop(), running_agent(19, 2.0, "node-b")))
    restarter.start()
    cpu_before = cpu_seconds(in_job.pid)
    try:
        status = main(
            [
                "profile",
                "--job",
                JOB,
                "--duration",
                "6s",
                "--frequency",
                str(SESSION_HZ),
                "-o",
                str(output),
                "--aggregator",
                aggregator.address,
            ]
        )
    finally:
        job_cpu_s = cpu_seconds(in_job.pid) - cpu_before
        restarter.join()
        in_job.kill()
        outsider.kill()
        first.stop()
    captured = capsys.readouterr()
    out = captured.out
    assert status == 0, captured.err
    session_id = out.split("session ")[1].split(":")[0]
    rows = session_rows(aggregator, session_id)
    # Only the job's process was sampled (the kernel filter), on both nodes, tagged.
    assert {pid for _, pid, _, _ in rows} == {in_job.pid}
    assert {job for _, _, job, _ in rows} == {JOB}
    per_node = {}
    for node, _, _, weight in rows:
        per_node[node] = per_node.get(node, 0) + weight
    assert set(per_node) == {"node-a", "node-b"}
    # node-a sampled the job's CPU time at 99 Hz from the session's start to its deadline:
    # some (a busy thread, even on a loaded machine), never more than the job ran while the
    # command waited (which includes its start and the wait for stragglers).
    assert 10 <= per_node["node-a"] <= 1.1 * SESSION_HZ * job_cpu_s + 5
    # The merged graph is the sum of the nodes' graphs; the table names every node.
    assert f"({sum(per_node.values()):,} samples)" in out
    assert "compute_alpha" in output.read_text()
    for node in per_node:
        assert node in out.split("wrote")[1]
    state = (
        aggregator.store.reader()
        .execute("SELECT state FROM sessions WHERE session_id = ?", [session_id])
        .fetchone()
    )
    assert state == ("done",)


def test_profile_refuses_bad_requests(aggregator, capsys) -> None:
    status = main(
        [
            "profile",
            "--job",
            "j",
            "--duration",
            "5s",
            "--events",
            "bogus",
            "-o",
            str(Path("x.html")),
            "--aggregator",
            aggregator.address,
        ]
    )
    assert status == 2
    assert "unknown event" in capsys.readouterr().err
