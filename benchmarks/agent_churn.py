"""What the agent costs a busy node: its CPU against the rate new processes start, and the
slowdown of a CPU-bound workload next to BCC's `profile` and `perf record`, in one run.

Part 1, the churn curve: a real agent (shipping to a local aggregator) at 19 Hz, then at
99 Hz; for each, windows with no churn, 25 and 100 new processes a second (mostly
/bin/true, one in five a short `python3 -c` that computes a little, so some get sampled),
rates interleaved over the repeats, each window after `--warmup` seconds at its rate (one
drain interval: an idle window would else pay for the drain of the churn before it); a
baseline agent, if given, runs side by side. The agent's CPU (% of one core) comes from
/proc/PID/stat over each window. Targets: <= 0.5% idle, <= 1% at 25/s, <= 2% at 100/s.

Part 2, workload slowdown at 99 Hz: a fixed-work CPU-bound program (2 threads) alone, under
the agent, under BCC's profile-bpfcc -F 99 and under `perf record -F 99 -a -g`, the four
interleaved in every repeat; CPU time as a ratio to alone's median. Target: <= 1.01.

Every figure is a median with its range over the repeats, with the load average: the
machine may be shared. Run as root:
    .venv/bin/python benchmarks/agent_churn.py [--repeats N] [--window S]
    [--baseline DIR]   # also measure another checkout's agent (a before/after pair): DIR
                       # holds fleetprof/ laid out as installed (see docs/agent-cost.md)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent_overhead import process_cpu_s, rss_mb, run_workload, wait_for_line

from fleetprof import workloads

THREADS = 2
# A python3 that computes ~20 ms, so the sampler sees some of them (as build hosts' would).
PYTHON_CHILD = ("/usr/bin/python3", "-c", "sum(range(400000))")
TRUE = ("/bin/true",)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """median [min..max] of values * scale."""
    v = sorted(x * scale for x in values)
    return f"{statistics.median(v):.{digits}f} [{v[0]:.{digits}f}..{v[-1]:.{digits}f}]"


def churn(rate: float, seconds: float) -> int:
    """Start `rate` short-lived processes a second for `seconds`; the number started."""
    started, children = 0, []
    begin = time.monotonic()
    while (now := time.monotonic()) < begin + seconds:
        if rate and now >= begin + started / rate:
            argv = PYTHON_CHILD if started % 5 == 4 else TRUE
            children.append(os.posix_spawn(argv[0], argv, os.environ))
            started += 1
        children = [pid for pid in children if os.waitpid(pid, os.WNOHANG)[0] == 0]
        time.sleep(0.002)
    for pid in children:
        os.waitpid(pid, 0)
    return started


@contextmanager
def running_agent(
    address: str,
    frequency: int,
    pythonpath: str | None,
    settle_s: float,
    interval_s: float = 10.0,
) -> Iterator[subprocess.Popen[str]]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetprof",
            "agent",
            "--aggregator",
            address,
            "--frequency",
            str(frequency),
            "--interval",
            f"{interval_s:g}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # `python -m` puts the working directory first on sys.path: run from the import
        # root, else a checkout's own fleetprof/ (this one's, from its top) shadows it.
        cwd=pythonpath,
    )
    try:
        wait_for_line(agent, "sampling", timeout_s=600)  # compiling BPF on a loaded host
        threading.Thread(target=agent.stderr.read, daemon=True).start()  # keep it flowing
        # Past start-up: the first drains load the symbols of what already runs.
        time.sleep(settle_s)
        yield agent
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=300)  # its last drain, slow on a loaded machine
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


@contextmanager
def running_peer(argv: list[str], ready: str | None) -> Iterator[None]:
    """A peer profiler recording system-wide until the block ends (then SIGINT)."""
    peer = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    try:
        if ready is None:
            time.sleep(2)
        else:
            deadline = time.monotonic() + 120
            assert peer.stdout is not None
            while ready not in peer.stdout.readline():
                if peer.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} did not start")
        threading.Thread(target=peer.stdout.read, daemon=True).start()
        yield
    finally:
        peer.send_signal(signal.SIGINT)
        peer.wait(timeout=120)


def agents(args: argparse.Namespace) -> dict[str, str | None]:
    """The agents to compare: this checkout's, and the baseline's if given (import roots)."""
    versions: dict[str, str | None] = {"fleetprof": None}
    if args.baseline:
        versions["baseline"] = args.baseline
    return versions


def churn_curve(args: argparse.Namespace, address: str) -> None:
    rates, versions = args.rates, agents(args)
    print(
        f"agent CPU, % of one core, over {args.window:g}-s windows, {args.repeats} repeats "
        f"({' and '.join(versions)} side by side, seeing the same churn): median [min..max]"
    )
    for frequency in args.frequencies:
        shares = {(name, rate): [] for name in versions for rate in rates}
        loads: list[str] = []
        with contextlib.ExitStack() as stack:
            running = {
                name: stack.enter_context(running_agent(address, frequency, pythonpath, 0))
                for name, pythonpath in versions.items()
            }
            time.sleep(args.settle)
            for repeat in range(args.repeats):
                # Rotate the order, so no rate always follows the same one.
                for rate in rates[repeat % len(rates) :] + rates[: repeat % len(rates)]:
                    # Unmeasured, one drain interval at this rate first: the window then
                    # sees this rate's steady state, not the drain of the last window's.
                    churn(rate, args.warmup)
                    cpu = {name: process_cpu_s(agent.pid) for name, agent in running.items()}
                    wall = time.monotonic()
                    churn(rate, args.window)
                    wall = time.monotonic() - wall
                    for name, agent in running.items():
                        shares[name, rate].append((process_cpu_s(agent.pid) - cpu[name]) / wall)
                loads.append(loadavg())
            memory = {
                name: f"{rss_mb(agent.pid, 'VmRSS'):.0f} MB, peak {rss_mb(agent.pid, 'VmHWM'):.0f}"
                for name, agent in running.items()
            }
        for rate in rates:
            label = "idle" if not rate else f"{rate:g} processes/s"
            for name in versions:
                figure = spread(shares[name, rate], 100)
                print(f"  {frequency:3d} Hz  {label:<18} {name:<10} {figure} %")
        for name in versions:
            print(f"          {name} RSS at the end: {memory[name]}")
        print(f"          load average after each repeat: {loads}")
    print("  (targets: <= 0.5% idle, <= 1% at 25/s, <= 2% at 100/s)")


def slowdown(args: argparse.Namespace, address: str, binary: Path) -> None:
    profile = shutil.which("profile-bpfcc")
    perf = shutil.which("perf")
    work = Path(tempfile.mkdtemp(prefix="fleetprof-churn-"))
    versions = agents(args)
    runs: dict[str, list[float]] = {"alone": [], **{name: [] for name in versions}}
    runs.update(profile=[], perf=[])
    loads = []
    for _ in range(args.repeats):
        runs["alone"].append(run_workload(binary, THREADS, args.rounds)[0])
        for name, pythonpath in versions.items():
            with running_agent(address, 99, pythonpath, args.settle):
                runs[name].append(run_workload(binary, THREADS, args.rounds)[0])
        if profile:
            # -f: folded output at the end only; symbolization after the run, as perf script.
            with running_peer([profile, "-F", "99", "-f"], None):
                runs["profile"].append(run_workload(binary, THREADS, args.rounds)[0])
        if perf:
            argv = [perf, "record", "-F", "99", "-a", "-g", "-o", str(work / "perf.data")]
            with running_peer(argv, None):
                runs["perf"].append(run_workload(binary, THREADS, args.rounds)[0])
        loads.append(loadavg())
    shutil.rmtree(work, ignore_errors=True)
    alone = statistics.median(runs["alone"])
    print(
        f"workload CPU time at 99 Hz ({THREADS} threads x {args.rounds} rounds), "
        f"ratio to alone's median {alone:.2f} s, {args.repeats} interleaved repeats:"
    )
    for name, cpu in runs.items():
        if cpu:
            print(f"  {name:<10} {spread([c / alone for c in cpu], digits=3)}")
        else:
            print(f"  {name:<10} not installed")
    print(f"  (target: fleetprof <= 1.010); load average after each repeat: {loads}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=float, default=15, help="seconds per churn window")
    parser.add_argument("--settle", type=float, default=30, help="seconds after start-up")
    parser.add_argument(
        "--warmup",
        type=float,
        default=10,
        help="seconds at a window's rate before it is measured (the agent's interval)",
    )
    parser.add_argument("--frequencies", type=int, nargs="+", default=[19, 99])
    parser.add_argument("--rates", type=float, nargs="+", default=[0, 25, 100])
    parser.add_argument("--rounds", type=int, default=600, help="workload work (~9 ms each)")
    parser.add_argument(
        "--baseline", metavar="DIR", help="also run the agent of this import root, interleaved"
    )
    parser.add_argument("--skip-slowdown", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleetprof-churn-"))
    binary = workloads.build_native(work)
    aggregator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetprof",
            "aggregator",
            "--db",
            str(work / "bench.duckdb"),
            "--listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert aggregator.stdout is not None
        address = aggregator.stdout.readline().split("listening on ")[1].split(",")[0]
        print(f"load average at start: {loadavg()} ({os.cpu_count()} CPUs)")
        churn_curve(args, address)
        if not args.skip_slowdown:
            slowdown(args, address, binary)
    finally:
        aggregator.send_signal(signal.SIGTERM)
        aggregator.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
