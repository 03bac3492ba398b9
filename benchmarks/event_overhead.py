"""What the wait events (lock/wait, offcpu, io, block) cost the workloads they watch, at
high rates.

Fixed-work workloads of the bundled waits.c, timed alone and under an agent recording some
events (shipping to an aggregator, both in this process), in one run; printed as ratios of
the workload's CPU time (and wall time) to its run alone just before (so slow drifts of
the machine's load hit both), medians over interleaved rounds with their min-max, and the
load average. "sched floor" is two empty BPF programs on the tracepoints lock, wait and
offcpu use (sched_switch and sched_exit_tp): what any per-switch tracing costs here before
doing anything; "over floor" is a setting's median ratio less the floor's.
  futex     a thread pair per CPU (pinned) passing a turn through a futex, with some work
            per turn: about 200k futex waits/s in all (the rate is printed)
  syscalls  pread 4 KiB from the page cache and write it to /dev/null, over and over
  switches  the same pairs with no work per turn: context switches as fast as they go

lock+offcpu runs lock, wait and offcpu in one pair of programs: it should cost about what
the dearer of lock and offcpu costs alone, not their sum.
Run as root: .venv/bin/python benchmarks/event_overhead.py [--repeats N] [--rounds N]
[--settings lock,offcpu,lock+offcpu]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bcc import BPF

from fleetprof import workloads
from fleetprof.aggregator.server import Aggregator
from fleetprof.node_agent.agent import Agent, AgentConfig

# Setting name: the agent's events.
SETTINGS = {
    "lock": ("lock", "wait"),
    "offcpu": ("offcpu",),
    "lock+offcpu": ("lock", "wait", "offcpu"),
    "io": ("io",),
    "block": ("block",),
}
FLOOR = "sched floor"
EMPTY_SCHED_PROGRAMS = b"""
RAW_TRACEPOINT_PROBE(sched_switch) { return 0; }
RAW_TRACEPOINT_PROBE(sched_exit_tp) { return 0; }
"""
# Work per turn of the futex workload: about 200k futex waits/s on this 2-CPU machine.
FUTEX_SPIN_NS = 2500


def run(command: list[str]) -> tuple[float, float, str]:
    """(CPU seconds, wall seconds, stdout) of one run of a workload."""
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise RuntimeError(f"{command} failed ({status})")
    return usage.ru_utime + usage.ru_stime, time.monotonic() - start, output


@contextmanager
def agent_recording(setting: str, work: Path) -> Iterator[None]:
    aggregator = Aggregator(work / f"{setting}.duckdb", "127.0.0.1:0")
    aggregator.start()
    events = SETTINGS[setting]
    config = AgentConfig(aggregator.address, "bench", 10.0, events, spool_dir=str(work / "spool"))
    agent = Agent(config)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,))
    thread.start()
    time.sleep(2)  # past start-up
    try:
        yield
        if not thread.is_alive():  # its traceback is above: the figures are not the agent's
            raise RuntimeError(f"the agent stopped while {setting} was measured")
    finally:
        stop.set()
        thread.join()
        aggregator.stop(grace_s=0)


@contextmanager
def empty_sched_programs() -> Iterator[None]:
    bpf = BPF(text=EMPTY_SCHED_PROGRAMS)
    try:
        yield
    finally:
        bpf.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=100_000, help="turns per thread pair")
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"some of {','.join(SETTINGS)}"
    )
    args = parser.parse_args()
    settings = args.settings.split(",")
    if not set(settings) <= SETTINGS.keys():
        parser.error(f"--settings takes some of {','.join(SETTINGS)}")
    with tempfile.TemporaryDirectory(prefix="fleetprof-events-") as work:
        benchmark(Path(work), args.repeats, args.rounds, settings)


def benchmark(work: Path, repeats: int, rounds: int, settings: list[str]) -> None:
    binary = str(workloads.build_native(work, workloads.WAITS_SOURCE))
    data = work / "data"
    data.write_bytes(os.urandom(4096))
    commands = {
        "futex": [binary, "pingpong", str(rounds), str(FUTEX_SPIN_NS)],
        "syscalls": [binary, "syscalls", str(5 * rounds), str(data)],
        "switches": [binary, "pingpong", str(rounds), "0"],
    }
    # (setting, workload) -> per round, (cpu, wall) ratio to the run alone just before.
    ratios: dict[tuple[str, str], list[tuple[float, float]]] = {}
    alone: dict[str, list[float]] = {}
    rates: list[float] = []
    loads: list[float] = []

    def measure(setting: str, reference: dict[str, tuple[float, float]]) -> None:
        cells = []
        for name, command in commands.items():
            seconds, elapsed, _ = run(command)
            cpu0, wall0 = reference[name]
            ratios.setdefault((setting, name), []).append((seconds / cpu0, elapsed / wall0))
            cells.append(f"{name} {seconds / cpu0:.3f}")
        # As it goes: a long run cut short still says what it measured.
        print(
            f"  {setting}: cpu ratios {', '.join(cells)}; load {os.getloadavg()[0]:.1f}",
            flush=True,
        )

    def measure_alone() -> dict[str, tuple[float, float]]:
        reference = {}
        for name, command in commands.items():
            seconds, elapsed, output = run(command)
            reference[name] = (seconds, elapsed)
            alone.setdefault(name, []).append(seconds)
            if name == "futex":
                rates.append(float(re.findall(r"(\d+) futex waits/s", output)[0]))
        loads.append(os.getloadavg()[0])
        return reference

    for round_number in range(repeats):
        print(f"round {round_number + 1}", flush=True)
        reference = measure_alone()
        with empty_sched_programs():
            measure(FLOOR, reference)
        for setting in settings:
            reference = measure_alone()
            with agent_recording(setting, work):
                measure(setting, reference)

    print(
        f"{repeats} rounds, medians (min-max); futex workload alone: "
        f"{statistics.median(rates):,.0f} futex waits/s; load average (1 min) "
        f"{statistics.median(loads):.2f} ({min(loads):.2f}-{max(loads):.2f}) on "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'':12}" + "".join(f"{name:>44}" for name in commands))
    floor = {name: statistics.median(c for c, _ in ratios[FLOOR, name]) for name in commands}
    for setting in (FLOOR, *settings):
        cells = []
        for name in commands:
            cpu = [c for c, _ in ratios[setting, name]]
            wall = [w for _, w in ratios[setting, name]]
            over = "" if setting == FLOOR else f" +{statistics.median(cpu) - floor[name]:.3f}"
            cells.append(
                f"cpu {statistics.median(cpu):.3f} ({min(cpu):.2f}-{max(cpu):.2f}){over}"
                f" wall {statistics.median(wall):.3f}"
            )
        print(f"{setting:12}" + "".join(f"{cell:>44}" for cell in cells))
    print(
        "alone: "
        + ", ".join(
            f"{name} {statistics.median(alone[name]):.2f} CPU s "
            f"(sd {statistics.pstdev(alone[name]) / statistics.median(alone[name]):.1%})"
            for name in commands
        )
    )


if __name__ == "__main__":
    main()
