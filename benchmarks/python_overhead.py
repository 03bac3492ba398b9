"""What reading Python frames costs: a CPU-bound CPython program, alone and under the agent
at 99 Hz with and without the Python walk (python_stacks.bpf.h, `--no-python-frames`).

One process per CPU runs a fixed amount of pure-Python work 40 frames deep (a typical
web or Spark worker stack); its CPU time and wall time are measured alone, under an agent
that does not walk Python frames, and under one that does, in each repeat (the order
rotates from one repeat to the next, so a drift of the machine's load is not blamed on
one mode). Printed as ratios to the workload alone (median and [min-max] over the
repeats), the Python walk's own ratio (with the walk / without it, in the same repeat),
the agent's own CPU in % of a core while the workload runs, and the BPF program's time per
sample from the kernel's BPF statistics (kernel.bpf_stats_enabled), with the load average
at each figure. Figures need a quiet machine: the load average is printed to tell.

Targets: the Python walk adds <= 1% to the workload over no agent; the agent uses <= 1% of
one core.
Run as root: .venv/bin/python benchmarks/python_overhead.py [--rounds N] [--repeats N]
             [--python /usr/bin/python3] [--quick] [--bpf-only]
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


def run_workload(python: str, script: Path, rounds: int, processes: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of `processes` copies of the workload, each `rounds`
    rounds, started together."""
    start = time.monotonic()
    children = [subprocess.Popen([python, str(script), str(rounds)]) for _ in range(processes)]
    cpu = 0.0
    for child in children:
        _, _, usage = os.wait4(child.pid, 0)
        cpu += usage.ru_utime + usage.ru_stime
    return cpu, time.monotonic() - start


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
) -> tuple[tuple[float, float], float, float, str]:
    """((workload CPU s, wall s), agent CPU share, BPF ns per sample, load) under a fresh
    agent."""
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
        times = run_workload(python, script, rounds, processes)
        share = (process_cpu_s(agent.pid) - cpu_before) / (time.monotonic() - wall_before)
        bpf_after = bpf_program_ns(agent.pid)
        runs = bpf_after[1] - bpf_before[1]
        per_sample = (bpf_after[0] - bpf_before[0]) / runs if runs else float("nan")
        return times, share, per_sample, load()
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


MODES = ("alone", "agent", "agent+python")


def spread(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """median [min-max]"""
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid * scale:.{digits}f} [{low * scale:.{digits}f}-{high * scale:.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bpf-only", action="store_true", help="only the BPF program's time per sample"
    )
    parser.add_argument("--rounds", type=int, default=2000, help="work per process (~5 ms each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--python", default="/usr/bin/python3")
    parser.add_argument(
        "--quick", action="store_true", help="smallest settings: 2 repeats of 100 rounds"
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.repeats = 100, 2
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
    # Per mode, per repeat: (CPU s, wall s); the agent's share of a core; BPF ns/sample.
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    shares: dict[str, list[float]] = {mode: [] for mode in MODES[1:]}
    bpf_ns: dict[str, list[float]] = {mode: [] for mode in MODES[1:]}
    try:
        for repeat in range(args.repeats):
            shift = repeat % len(MODES)
            for mode in MODES[shift:] + MODES[:shift]:
                if mode == "alone":
                    times[mode].append(run_workload(args.python, script, args.rounds, processes))
                    cpu, wall = times[mode][-1]
                    print(f"run {repeat}: alone {cpu:.2f} CPU s {wall:.2f} s, {load()}", flush=True)
                    continue
                measured, share, ns, loaded = with_agent(
                    work, args.python, script, args.rounds, processes, mode == "agent+python"
                )
                times[mode].append(measured)
                shares[mode].append(share)
                bpf_ns[mode].append(ns)
                print(
                    f"run {repeat}: {mode} {measured[0]:.2f} CPU s {measured[1]:.2f} s, "
                    f"agent {100 * share:.2f}% of a core, BPF {ns:.0f} ns/sample, {loaded}",
                    flush=True,
                )
    finally:
        Path(BPF_STATS).write_text(stats_were)

    def ratios(mode: str, base: str, which: int) -> list[float]:
        """mode / base, repeat by repeat (`which`: 0 CPU, 1 wall)."""
        return [m[which] / b[which] for m, b in zip(times[mode], times[base], strict=True)]

    print(
        f"\nworkload: {processes} x {args.python} ({args.rounds} rounds, 40 frames deep), "
        f"{args.repeats} runs each, cpu sampler at 99 Hz; median [min-max] over the runs"
    )
    for mode in MODES[1:]:
        print(
            f"  {mode:<13} / alone:  CPU time {spread(ratios(mode, 'alone', 0))}  "
            f"wall time {spread(ratios(mode, 'alone', 1))}  "
            f"agent {spread(shares[mode], 100, 2)}% of a core  "
            f"BPF {spread(bpf_ns[mode], digits=0)} ns/sample"
        )
    print(
        f"  python walk alone (agent+python / agent):  CPU time "
        f"{spread(ratios('agent+python', 'agent', 0))}  "
        f"wall time {spread(ratios('agent+python', 'agent', 1))}"
    )
    print("  (targets: agent+python / alone <= 1.010; agent <= 1% of a core)")
    print(f"  {load()} at the end", file=sys.stdout)


if __name__ == "__main__":
    main()
