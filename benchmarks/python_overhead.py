"""What reading Python frames costs: a CPU-bound CPython program, alone and under the agent
at 99 Hz with and without the Python walk (python_stacks.bpf.h, `--no-python-frames`).

One process per CPU runs a fixed amount of pure-Python work 40 frames deep (a typical
web or Spark worker stack); its CPU time is measured alone, then under an agent that does
not walk Python frames, then under one that does, in that order in each repeat. Printed as
ratios to the workload alone (median and spread over the repeats), with the agent's own
CPU while the workload runs, and the BPF program's own time per sample from the kernel's
BPF statistics (kernel.bpf_stats_enabled), with the load average at each figure.

Targets: the Python walk adds <= 1% to the workload's CPU time over no agent; the agent
uses <= 1% of one core.
Run as root: .venv/bin/python benchmarks/python_overhead.py [--seconds S] [--repeats N]
             [--python /usr/bin/python3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from agent_overhead import VENV_BIN, process_cpu_s, wait_for_line

WORKLOAD = """
import sys

def work(n):
    total = 0
    for i in range(n):
        total += i * i % 7
    return total

def deep(level, n):
    return deep(level - 1, n) if level else work(n)

for _ in range(int(sys.argv[1])):
    deep(40, 100_000)
"""
BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"


def run_workload(python: str, script: Path, rounds: int, processes: int) -> float:
    """CPU seconds of `processes` copies of the workload, each `rounds` rounds."""
    children = [subprocess.Popen([python, str(script), str(rounds)]) for _ in range(processes)]
    cpu = 0.0
    for child in children:
        _, _, usage = os.wait4(child.pid, 0)
        cpu += usage.ru_utime + usage.ru_stime
    return cpu


_PERF_EVENT_PROGRAM = "7"  # BPF_PROG_TYPE_PERF_EVENT: the cpu sampler's, one per agent


def bpf_program_ns(pid: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the agent's perf-event BPF program, from its fdinfo."""
    total = count = 0
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        if fields.get("prog_type", "").strip() == _PERF_EVENT_PROGRAM:
            total += int(fields["run_time_ns"])
            count += int(fields["run_cnt"])
    return total, count


def load() -> str:
    return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def with_agent(
    work: Path, python: str, script: Path, rounds: int, processes: int, walk: bool
) -> tuple[float, float, float, str]:
    """(workload CPU s, agent CPU share, BPF ns per sample, load) under a fresh agent."""
    fleetprof = str(VENV_BIN / "fleetprof")
    aggregator = subprocess.Popen(
        [fleetprof, "aggregator", "--db", str(work / f"bench-{walk}.duckdb"),
         "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert aggregator.stdout is not None
    address = aggregator.stdout.readline().split("listening on ")[1].split(",")[0]
    command = [fleetprof, "agent", "--aggregator", address, "--frequency", "99",
               "--interval", "10", "--spool-dir", str(work / "spool")]  # fmt: skip
    agent = subprocess.Popen(
        command + ([] if walk else ["--no-python-frames"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_line(agent, "sampling")
        assert agent.stderr is not None
        threading.Thread(target=agent.stderr.read, daemon=True).start()
        settle(agent.pid)
        bpf_before = bpf_program_ns(agent.pid)
        cpu_before, wall_before = process_cpu_s(agent.pid), time.monotonic()
        cpu = run_workload(python, script, rounds, processes)
        share = (process_cpu_s(agent.pid) - cpu_before) / (time.monotonic() - wall_before)
        bpf_after = bpf_program_ns(agent.pid)
        runs = bpf_after[1] - bpf_before[1]
        per_sample = (bpf_after[0] - bpf_before[0]) / runs if runs else float("nan")
        return cpu, share, per_sample, load()
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=300)
        aggregator.send_signal(signal.SIGTERM)
        aggregator.wait(timeout=60)


def settle(pid: int, timeout_s: float = 300) -> None:
    """Wait until the agent is past start-up (its first drains load the symbols of every
    process already running): under 5% of a core over 5 s."""
    deadline = time.monotonic() + timeout_s
    time.sleep(12)
    while time.monotonic() < deadline:
        before = process_cpu_s(pid)
        time.sleep(5)
        if process_cpu_s(pid) - before < 0.25:
            return
    raise TimeoutError("the agent stayed busy")


def bpf_cost(python: str, script: Path, rounds: int, repeats: int) -> None:
    """The cpu sampler's BPF time per sample, in this process (no agent: quick on a busy
    machine), without and with the Python walk, the workload running on every CPU."""
    from fleetprof.node_agent.samplers import SamplerOptions
    from fleetprof.node_agent.samplers.cpu import CpuSampler
    from fleetprof.node_agent.symbolize.symbolizer import Symbolizer

    processes = os.cpu_count() or 1
    for repeat in range(repeats):
        for walk in (False, True):
            sampler = CpuSampler(SamplerOptions(frequency=99, python_frames=walk))
            symbolizer = Symbolizer()
            children = [
                subprocess.Popen([python, str(script), str(rounds)]) for _ in range(processes)
            ]
            for child in children:
                symbolizer.remember(child.pid)  # as the agent does at their exec
            before = bpf_program_ns(os.getpid())
            for child in children:
                child.wait()
            after = bpf_program_ns(os.getpid())
            walks = sampler.python_walks()
            sampler.close()
            runs = after[1] - before[1]
            print(
                f"run {repeat}: python walk {'on ' if walk else 'off'}: "
                f"{(after[0] - before[0]) / max(runs, 1):6.0f} ns/sample over {runs} samples, "
                f"walks {walks}, {load()}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bpf-only", action="store_true", help="only the BPF program's time per sample"
    )
    parser.add_argument("--rounds", type=int, default=2000, help="work per process (~5 ms each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--python", default="/usr/bin/python3")
    args = parser.parse_args()
    processes = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="fleetprof-pybench-"))
    script = work / "workload.py"
    script.write_text(WORKLOAD)
    stats_were = Path(BPF_STATS).read_text().strip()
    Path(BPF_STATS).write_text("1")
    if args.bpf_only:
        try:
            bpf_cost(args.python, script, args.rounds, args.repeats)
        finally:
            Path(BPF_STATS).write_text(stats_were)
        return
    results: dict[str, list[float]] = {"alone": [], "agent": [], "agent+python": []}
    shares: dict[str, list[float]] = {"agent": [], "agent+python": []}
    bpf_ns: dict[str, list[float]] = {"agent": [], "agent+python": []}
    try:
        for repeat in range(args.repeats):
            results["alone"].append(run_workload(args.python, script, args.rounds, processes))
            print(f"run {repeat}: alone {results['alone'][-1]:.2f} CPU s, {load()}", flush=True)
            for name, walk in (("agent", False), ("agent+python", True)):
                cpu, share, ns, loaded = with_agent(
                    work, args.python, script, args.rounds, processes, walk
                )
                results[name].append(cpu)
                shares[name].append(share)
                bpf_ns[name].append(ns)
                print(
                    f"run {repeat}: {name} {cpu:.2f} CPU s, agent {100 * share:.2f}% of a core, "
                    f"BPF {ns:.0f} ns/sample, {loaded}",
                    flush=True,
                )
    finally:
        Path(BPF_STATS).write_text(stats_were)

    alone = statistics.median(results["alone"])
    print(
        f"\nworkload: {processes} x {args.python} ({args.rounds} rounds, 40 frames deep), "
        f"{args.repeats} runs each; median [min-max]"
    )
    print(f"  alone              CPU {alone:7.2f} s  ratio 1.000")
    for name in ("agent", "agent+python"):
        ratios = [cpu / alone for cpu in results[name]]
        print(
            f"  {name:<18} CPU {statistics.median(results[name]):7.2f} s  ratio "
            f"{statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]  "
            f"agent {100 * statistics.median(shares[name]):.2f}% of a core "
            f"[{100 * min(shares[name]):.2f}-{100 * max(shares[name]):.2f}]  "
            f"BPF {statistics.median(bpf_ns[name]):.0f} ns/sample"
        )
    print("  (targets: Python walk <= 1% over no agent; agent <= 1% of a core)")
    print(f"  {load()} at the end", file=sys.stdout)


if __name__ == "__main__":
    main()
