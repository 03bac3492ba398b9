"""What .eh_frame unwinding costs, side by side in one run (issue #14's figures).

1. Workload slowdown at 99 Hz on a CPU-bound program built without frame pointers (-O2,
   one thread per CPU, fixed work): alone, under the agent walking frame pointers only
   (--no-native-unwind), under the agent unwinding from .eh_frame, and under
   `perf record -F 99 -a --call-graph dwarf`. Modes are interleaved round by round.
2. The whole agent at its default 19 Hz beside a busy JVM and this machine's processes:
   CPU once started, RSS and BPF map memory. Then the unwinder alone with the tables of
   every process on this machine loaded (plus a JVM): files, rows, time, and RSS.
3. Preparing the rows of libjvm.so and libc.so.6: cold (parsed) and cached (disk).
4. How long after a new process's first sample its tables are complete (every file it
   maps parsed: its stacks are whole from then on).
Run as root: .venv/bin/python benchmarks/native_unwind.py [--rounds N] [--repeats N]
    [--steady-seconds S]
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

# benchmarks/ is the script's folder, on sys.path: the helpers of agent_overhead.py.
from agent_overhead import process_cpu_s, rss_mb, run_workload, wait_for_line

from fleetprof import workloads
from fleetprof.node_agent.unwind.tables import UnwindTables

VENV_BIN = Path(sys.executable).parent
LIBRARIES = {
    "libjvm.so": "/usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so",
    "libc.so.6": "/lib/x86_64-linux-gnu/libc.so.6",
}


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"


def start_agent(
    address: str, work: Path, native: bool, frequency: int = 99
) -> subprocess.Popen[str]:
    command = [str(VENV_BIN / "fleetprof"), "agent", "--aggregator", address]
    command += ["--frequency", str(frequency), "--interval", "10"]
    command += ["--spool-dir", str(work / "spool")]
    command += ["--unwind-cache-dir", str(work / "unwind-cache")]
    if not native:
        command.append("--no-native-unwind")
    agent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_line(agent, "sampling")
    threading.Thread(target=agent.stderr.read, daemon=True).start()  # type: ignore[union-attr]
    time.sleep(15)  # start-up over: first drains, tables of sampled processes loaded
    return agent


def stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


def slowdown(binary: Path, work: Path, address: str, rounds: int, repeats: int) -> None:
    threads = os.cpu_count() or 1
    cpu: dict[str, list[float]] = {"alone": [], "fp": [], "eh_frame": [], "perf": []}
    agent_share: dict[str, list[float]] = {"fp": [], "eh_frame": []}
    for _ in range(repeats):
        cpu["alone"].append(run_workload(binary, threads, rounds)[0])
        for mode in ("fp", "eh_frame"):
            agent = start_agent(address, work, mode == "eh_frame")
            before, wall = process_cpu_s(agent.pid), time.monotonic()
            cpu[mode].append(run_workload(binary, threads, rounds)[0])
            agent_share[mode].append(
                (process_cpu_s(agent.pid) - before) / (time.monotonic() - wall)
            )
            stop(agent)  # type: ignore[arg-type]
        perf = subprocess.Popen(
            [
                "perf",
                "record",
                "-F",
                "99",
                "-a",
                "--call-graph",
                "dwarf",
                "-o",
                str(work / "p.data"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1)
        cpu["perf"].append(run_workload(binary, threads, rounds)[0])
        perf.send_signal(signal.SIGINT)
        perf.wait()
    alone = statistics.median(cpu["alone"])
    print(
        f"1. workload without frame pointers, {threads} threads x {rounds} rounds, {repeats} runs"
    )
    for mode, label in (
        ("alone", "alone"),
        ("fp", "agent, frame pointers only"),
        ("eh_frame", "agent, .eh_frame unwinding"),
        ("perf", "perf record --call-graph dwarf"),
    ):
        ratios = [value / alone for value in cpu[mode]]
        print(f"   {label:<32} CPU ratio {spread(ratios)}")
    for mode in ("fp", "eh_frame"):
        shares = [100 * share for share in agent_share[mode]]
        print(f"   agent ({mode}) CPU while sampling: % of a core {spread(shares)}")
    print("   (target: .eh_frame unwinding <= 1% over alone)")


def every_process_loaded(java_classes: Path) -> None:
    jvm = workloads.start_java(java_classes, seconds=60, options=())
    time.sleep(5)
    # Imported here, after agent_steady: they import BCC.
    from fleetprof.node_agent.samplers import SamplerOptions
    from fleetprof.node_agent.unwind.native import NativeUnwinder

    unwinder = NativeUnwinder(SamplerOptions(), cache_dir=None)
    rss_before = rss_mb(os.getpid(), "VmRSS")
    started = time.monotonic()
    pids = [
        int(name) for name in os.listdir("/proc") if name.isdigit() and int(name) != os.getpid()
    ]
    for pid in pids:
        unwinder.load(pid)
    while unwinder.stats()["files_waiting"]:
        time.sleep(0.05)
    took = time.monotonic() - started
    stats = unwinder.stats()
    print(f"2b. the unwinder alone, every process here ({len(pids)} pids, a JVM among them):")
    print(
        f"   {stats['files']} files, {stats['rows']:,} rows ({stats['rows'] * 8 / 2**20:.0f} MiB "
        f"of kernel map), {took:.1f} s cold; this process's RSS {rss_before:.0f} -> "
        f"{rss_mb(os.getpid(), 'VmRSS'):.0f} MB; "
        f"rows full {stats['rows_full']}, no CFI {stats['no_cfi_files']}"
    )
    unwinder.close()
    jvm.kill()
    jvm.wait()


def bpf_map_mib(pid: int) -> float:
    """Kernel memory of the BPF maps pid holds (memlock of each map fd): not in its RSS."""
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != "anon_inode:bpf-map":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:
            continue
        total += sum(
            int(line.split()[1]) for line in info.splitlines() if line.startswith("memlock:")
        )
    return total / 2**20


def agent_steady(address: str, work: Path, java_classes: Path, seconds: float) -> None:
    """The whole agent at its default rate beside a busy JVM and this machine's processes,
    every sampled one's tables loaded: CPU once past start-up, and memory.

    Measured before this process imports BCC: BCC maps LLVM, and the pages of
    LLVM the agent drops after compiling (release_compiler_memory) would stay resident in
    the agent too while another process maps them."""
    assert "bcc" not in sys.modules, "BCC imported before the agent's memory was measured"
    jvm = workloads.start_java(java_classes, seconds=seconds + 90, threads=1)
    agent = start_agent(address, work, native=True, frequency=19)
    time.sleep(30)  # past start-up: the JVM's libjvm.so parsed, its code cache read
    before, wall = process_cpu_s(agent.pid), time.monotonic()
    time.sleep(seconds)
    share = 100 * (process_cpu_s(agent.pid) - before) / (time.monotonic() - wall)
    anon, file = rss_mb(agent.pid, "RssAnon"), rss_mb(agent.pid, "RssFile")
    # Pss: pages shared with other processes (BCC's LLVM, mapped by this one too) halved.
    pss = next(
        int(line.split()[1]) / 1024
        for line in Path(f"/proc/{agent.pid}/smaps_rollup").read_text().splitlines()
        if line.startswith("Pss:")
    )
    print(
        f"2. the agent at 19 Hz beside a busy JVM, {seconds:.0f} s once started: "
        f"{share:.2f}% of a core; RSS {rss_mb(agent.pid, 'VmRSS'):.0f} MB "
        f"({anon:.0f} anonymous, {file:.0f} file pages; PSS {pss:.0f} MB), "
        f"peak {rss_mb(agent.pid, 'VmHWM'):.0f} MB; "
        f"BPF map capacity {bpf_map_mib(agent.pid):.0f} MiB (memlock; hash maps allocate "
        "as they fill) (targets: <= 1%, <= 250 MB)"
    )
    stop(agent)  # type: ignore[arg-type]
    jvm.kill()
    jvm.wait()


def preparing(work: Path) -> None:
    print("3. preparing rows (cold: parsed; cached: read back by build id)")
    for name, path in LIBRARIES.items():
        cache = work / f"cache-{name}"
        timings = []
        for _ in range(2):
            started = time.monotonic()
            found = UnwindTables(str(cache)).get((path,))
            timings.append(time.monotonic() - started)
        rows = len(found[1].rows) if found else 0
        print(f"   {name:<10} {rows:>8,} rows  cold {timings[0]:.3f} s  cached {timings[1]:.3f} s")


def first_sample_to_tables(binary: Path, repeats: int) -> None:
    from fleetprof.node_agent.samplers import SamplerOptions  # see every_process_loaded
    from fleetprof.node_agent.samplers.cpu import CpuSampler
    from fleetprof.node_agent.unwind.native import NativeUnwinder

    unwinder = NativeUnwinder(SamplerOptions(frequency=99), cache_dir=None)
    sampler = CpuSampler(unwinder.options)
    latencies = []
    for _ in range(repeats):
        process = workloads.start_native(binary, 3, 1)
        started = time.monotonic()
        while not unwinder.complete(process.pid) and process.poll() is None:
            time.sleep(0.002)
        latencies.append(time.monotonic() - started)
        process.wait()
        unwinder.forget(process.pid)
    sampler.close()
    unwinder.close()
    print(
        f"4. a new process's tables complete {spread(latencies)} s after it started "
        "(target: by the next interval, 10 s by default)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000, help="work per thread")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    work = Path(tempfile.mkdtemp(prefix="fleetprof-unwind-"))
    binary = workloads.build_native(work, frame_pointers=False)
    aggregator = subprocess.Popen(
        [
            str(VENV_BIN / "fleetprof"),
            "aggregator",
            "--db",
            str(work / "b.duckdb"),
            "--listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    address = aggregator.stdout.readline().split("listening on ")[1].split(",")[0]  # type: ignore[union-attr]
    java_classes = workloads.build_java(work / "java")
    try:
        slowdown(binary, work, address, args.rounds, args.repeats)
        agent_steady(address, work, java_classes, args.steady_seconds)
    finally:
        stop(aggregator)
    every_process_loaded(java_classes)
    preparing(work)
    first_sample_to_tables(binary, args.repeats)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
