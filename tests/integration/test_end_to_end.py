"""The whole path, for real: BCC sampling → Arrow over gRPC → DuckDB → flame graph."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from fleetprof import workloads
from fleetprof.aggregator.server import Aggregator
from fleetprof.cli import main
from fleetprof.query.filters import SampleFilter
from fleetprof.query.flame import load_flame
from fleetprof.query.flame_tree import FlameNode
from fleetprof.query.render.folded import PROCESS_HEADER
from fleetprof.query.source import AggregatorSource


def weight_under(node: FlameNode, name: str) -> int:
    """Total weight of the outermost frames called `name` (a function's inclusive weight)."""
    if node.name == name:
        return node.total
    return sum(weight_under(child, name) for child in node.children.values())


def flame_for(aggregator: Aggregator, pid: int) -> FlameNode:
    source = AggregatorSource(aggregator.address)
    try:
        return load_flame(source, SampleFilter(pids=(pid,)))
    finally:
        source.close()


def test_native_shares_come_out_right(aggregator, running_agent, native_binary) -> None:
    agent = running_agent(frequency=99, interval_s=1.0)
    process = workloads.start_native(native_binary, seconds=10, threads=2)
    process.wait()
    agent.stop()
    tree = flame_for(aggregator, process.pid)
    # Enough samples for ±5 points to be ~3 standard deviations, even on a busy machine.
    assert tree.total >= 500, f"too few samples: {tree.total}"
    for function, share in workloads.NATIVE_SHARES.items():
        measured = weight_under(tree, function) / tree.total
        assert abs(measured - share) <= 0.05, f"{function}: {measured:.3f} vs {share}"
    # Frames are named from the binary's ELF symbols: nearly every sample is in one of them.
    named = weight_under(tree, "compute_alpha") + weight_under(tree, "compute_beta")
    assert named >= 0.9 * tree.total


def test_short_lived_process_is_named(aggregator, running_agent, native_binary) -> None:
    # The process runs 1 s and exits long before the agent's next drain.
    agent = running_agent(frequency=99, interval_s=4.0)
    time.sleep(0.5)
    process = workloads.start_native(native_binary, seconds=1)
    process.wait()
    agent.stop()
    tree = flame_for(aggregator, process.pid)
    assert tree.total >= 20  # a busy machine gives the 1-s process less CPU
    named = weight_under(tree, "compute_alpha") + weight_under(tree, "compute_beta")
    assert named >= 0.9 * tree.total


def test_java_hot_methods_are_named(aggregator, running_agent, java_classes) -> None:
    agent = running_agent(frequency=99, interval_s=2.0)
    # No jcmd: the agent attaches to the JVM for its perf map.
    process = workloads.start_java(java_classes, seconds=12)
    process.wait()
    agent.stop()
    tree = flame_for(aggregator, process.pid)
    names = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        names.add(node.name)
        stack.extend(node.children.values())
    for method in workloads.JAVA_SHARES:
        assert any(method in name for name in names), f"{method} not in the flame graph"


def test_flamegraph_command_writes_every_format(
    aggregator, running_agent, native_binary, tmp_path: Path
) -> None:
    agent = running_agent(frequency=99, interval_s=1.0)
    process = workloads.start_native(native_binary, seconds=2)
    process.wait()
    agent.stop()
    for suffix in ("html", "svg", "folded"):
        out = tmp_path / f"cpu.{suffix}"
        assert (
            main(
                [
                    "flamegraph",
                    "--aggregator",
                    aggregator.address,
                    "--pid",
                    str(process.pid),
                    "-o",
                    str(out),
                ]
            )
            == 0
        )
        assert "compute_alpha" in out.read_text()
    header, *folded = (tmp_path / "cpu.folded").read_text().splitlines()
    assert header == PROCESS_HEADER
    assert all(line.startswith("hotspots;") for line in folded)
    total = sum(int(line.rsplit(" ", 1)[1]) for line in folded)
    assert total == flame_for(aggregator, process.pid).total


def test_rows_carry_the_job_of_their_process(aggregator, running_agent, native_binary) -> None:
    agent = running_agent(frequency=99, interval_s=1.0)
    env = {**os.environ, "FLEETPROF_JOB": "etl-42"}
    in_job = subprocess.Popen([str(native_binary), "2"], env=env)
    outside = workloads.start_native(native_binary, seconds=2)
    in_job.wait()
    outside.wait()
    agent.stop()
    rows = dict(
        aggregator.store.reader()
        .execute(
            "SELECT pid, list_distinct(list(job)) FROM samples WHERE pid IN (?, ?) GROUP BY pid",
            [in_job.pid, outside.pid],
        )
        .fetchall()
    )
    assert rows[in_job.pid] == ["etl-42"]
    assert rows[outside.pid] == []  # NULL: no resolver names a job for it
    source = AggregatorSource(aggregator.address)
    try:
        tree = load_flame(source, SampleFilter(jobs=("etl-42",)))
    finally:
        source.close()
    assert weight_under(tree, "hotspots") == tree.total > 0
