"""What the agent costs a node, against the classic `perf record | perf script` pipeline.

A fixed-work CPU-bound workload (the bundled native hotspots program, one thread per CPU)
is timed alone, with the fleetprof agent sampling at 99 Hz (shipping to a local
aggregator), and under `perf record -F 99 -a -g` followed by `perf script`, in one run.
Printed as ratios to the workload alone; the agent's own CPU and RSS come from /proc.

Targets: workload CPU time +1% at most; agent <= 0.5% of one core in steady state;
agent RSS < 250 MB.
Run as root: .venv/bin/python benchmarks/agent_overhead.py [--rounds N] [--repeats N]
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

from fleetprof import workloads

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
VENV_BIN = Path(sys.executable).parent


def run_workload(binary: Path, threads: int, rounds: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one fixed-work run."""
    start = time.monotonic()
    process = workloads.start_native(binary, 0, threads, rounds)
    _, _, usage = os.wait4(process.pid, 0)
    return usage.ru_utime + usage.ru_stime, time.monotonic() - start


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_for_line(process: subprocess.Popen[str], text: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    assert process.stderr is not None
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if text in line:
            return
        if not line and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
    raise TimeoutError(f"no {text!r} from {process.args}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000, help="work per thread (~9 ms each)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="fleetprof-bench-"))
    binary = workloads.build_native(work)
    fleetprof = str(VENV_BIN / "fleetprof")

    results: dict[str, list[float]] = {"alone": [], "agent": [], "perf": []}
    perf_script_cpu: list[float] = []
    # Baselines first: the agent's perf events would tax every run once it is loaded.
    for _ in range(args.repeats):
        results["alone"].append(run_workload(binary, threads, args.rounds)[0])
        perf_data = work / "perf.data"
        perf = subprocess.Popen(
            ["perf", "record", "-F", "99", "-a", "-g", "-o", str(perf_data)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1)
        results["perf"].append(run_workload(binary, threads, args.rounds)[0])
        perf.send_signal(signal.SIGINT)
        perf.wait()
        before = os.times()
        subprocess.run(
            ["perf", "script", "-i", str(perf_data)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )
        after = os.times()
        perf_script_cpu.append(
            after.children_user
            + after.children_system
            - before.children_user
            - before.children_system
        )

    aggregator = subprocess.Popen(
        [fleetprof, "aggregator", "--db", str(work / "bench.duckdb"), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    address = aggregator.stdout.readline().split("listening on ")[1].split(",")[0]
    agent = subprocess.Popen(
        [fleetprof, "agent", "--aggregator", address, "--frequency", "99", "--interval", "10"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_line(agent, "sampling")
    threading.Thread(target=agent.stderr.read, daemon=True).start()  # keep the pipe flowing
    # Start-up is over after the first drains: symbol tables of every process already
    # running (kallsyms, the aggregator's libraries, ...) are loaded by then.
    time.sleep(25)
    start_rss = rss_mb(agent.pid, "VmRSS")
    # Now the agent samples: measure the workload under it and the agent's own CPU.
    agent_cpu_share = []
    for _ in range(args.repeats):
        cpu_before, wall_before = process_cpu_s(agent.pid), time.monotonic()
        results["agent"].append(run_workload(binary, threads, args.rounds)[0])
        agent_cpu_share.append(
            (process_cpu_s(agent.pid) - cpu_before) / (time.monotonic() - wall_before)
        )
    steady_rss, peak_rss = rss_mb(agent.pid, "VmRSS"), rss_mb(agent.pid, "VmHWM")
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=60)
    aggregator.send_signal(signal.SIGTERM)
    aggregator.wait(timeout=30)

    alone = statistics.median(results["alone"])
    print(f"workload: {threads} threads x {args.rounds} rounds, {args.repeats} runs each, medians")
    print(f"  alone                 CPU {alone:8.2f} s   ratio 1.000")
    for name in ("agent", "perf"):
        cpu = statistics.median(results[name])
        print(f"  with {name:<16} CPU {cpu:8.2f} s   ratio {cpu / alone:.3f}")
    print("  (target: the agent adds <= 1% to the workload's CPU time)")
    print(
        f"  perf script afterwards: {statistics.median(perf_script_cpu):.2f} CPU s "
        f"(ratio to workload {statistics.median(perf_script_cpu) / alone:.3f})"
    )
    print(
        f"agent steady-state CPU: {100 * statistics.median(agent_cpu_share):.2f}% of one core "
        "(target <= 0.5%)"
    )
    print(
        f"agent RSS: {start_rss:.0f} MB after start-up, {steady_rss:.0f} MB at the end, "
        f"{peak_rss:.0f} MB peak (target < 250 MB)"
    )


if __name__ == "__main__":
    main()
