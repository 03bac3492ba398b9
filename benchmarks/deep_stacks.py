"""What deep user stacks cost in the kernel: the cpu sampler's BPF time per sample, and the
user stack maps' memory, for stacks of several depths, beside another revision.

A program built -O2 (no frame pointers) recurses to a given depth and spins at the leaf,
one copy per CPU, under a cpu sampler at 99 Hz unwinding from .eh_frame (a NativeUnwinder
and a CpuSampler in a worker process, as the agent builds them). Per depth: BPF ns per
sample of the workload (kernel.bpf_stats_enabled: run_time_ns and run_cnt of the
perf-event program, from its fdinfo), the depth of the stacks stored, and the kernel
memory of user_stacks_<g> and the per-CPU walk scratch (their fdinfo memlock) after a
drain interval of those stacks.

The sampler is a session's (only the workload's pids are walked): on a machine shared with
other work, every other process's samples would otherwise be in the average. What the
others' samples cost (a filtered-out run) is measured in a window before the workload
starts and taken out: ns/sample = (run time - other runs x their cost) / workload samples.
`--baseline ROOT` runs the same in a worker importing fleetprof from ROOT (see
docs/agent-cost.md for making one), interleaved repeat by repeat.

Run as root: .venv/bin/python benchmarks/deep_stacks.py [--baseline ROOT] [--repeats N]
             [--depths 0,30,120,400] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fleetprof import workloads

BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"


def fdinfo(pid: int) -> list[dict[str, str]]:
    found = []
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        found.append(
            {
                k: v.strip()
                for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)
            }
        )
    return found


def program_ns() -> tuple[int, int]:
    """(run_time_ns, run_cnt) of this process's perf-event BPF programs."""
    total = count = 0
    for info in fdinfo(os.getpid()):
        if info.get("prog_type") == "7":
            total += int(info["run_time_ns"])
            count += int(info["run_cnt"])
    return total, count


def map_bytes(sampler: object, names: tuple[str, ...]) -> int:
    """Kernel memory (fdinfo memlock) of the sampler's maps named so."""
    bpf = sampler._bpf  # type: ignore[attr-defined]
    fds = {str(bpf[name.encode()].map_fd) for name in names}
    total = 0
    for fd in fds:
        text = Path(f"/proc/self/fdinfo/{fd}").read_text()
        total += int(text.split("memlock:")[1].split()[0])
    return total


def complete(unwinder: object, pid: int) -> bool:
    """NativeUnwinder.complete, for revisions without it."""
    with unwinder._lock:  # type: ignore[attr-defined]
        return pid in unwinder._processes and not any(  # type: ignore[attr-defined]
            process.pid == pid
            for wait in unwinder._waiting.values()  # type: ignore[attr-defined]
            for process, *_ in wait.mappings
        )


def worker(binary: str, depths: list[int], seconds: float) -> None:
    """One revision's figures, as JSON lines on stdout."""
    from fleetprof.node_agent.samplers import SamplerOptions
    from fleetprof.node_agent.samplers.cpu import CpuSampler
    from fleetprof.node_agent.unwind.native import NativeUnwinder

    unwinder = NativeUnwinder(SamplerOptions(frequency=99, session_filter=True), cache_dir=None)
    sampler = CpuSampler(unwinder.options)
    cpus = os.cpu_count() or 1
    for depth in depths:
        before = program_ns()
        time.sleep(2)
        after = program_ns()
        filtered = (after[0] - before[0]) / max(after[1] - before[1], 1)
        children = [
            subprocess.Popen([binary, str(int(seconds) + 8), str(depth)]) for _ in range(cpus)
        ]
        sampler.add_pids(child.pid for child in children)
        deadline = time.monotonic() + 120
        while not all(complete(unwinder, child.pid) for child in children):
            assert time.monotonic() < deadline, "tables never loaded"
            time.sleep(0.02)
        time.sleep(1)
        sampler.drain()
        before = program_ns()
        time.sleep(seconds)
        after = program_ns()
        memory = map_bytes(sampler, ("user_stacks_0", "user_stacks_1"))
        samples = sampler.drain().samples
        pids = {child.pid for child in children}
        stacks = [s for s in samples if s.pid in pids and s.user_stack]
        weights = [s.weight for s in stacks]
        depth_seen = sorted(len(s.user_stack) for s in stacks for _ in range(s.weight))  # type: ignore[arg-type]
        for child in children:
            child.kill()
            child.wait()
        runs = after[1] - before[1]
        others = runs - sum(weights)
        print(
            json.dumps(
                {
                    "depth": depth,
                    "ns": (after[0] - before[0] - others * filtered) / max(sum(weights), 1),
                    "filtered_ns": filtered,
                    "runs": runs,
                    "samples": sum(weights),
                    "stored_depth": depth_seen[len(depth_seen) // 2] if depth_seen else 0,
                    "user_stacks_bytes": memory,
                    "scratch_bytes": map_bytes(sampler, ("unwind_scratch",)),
                }
            ),
            flush=True,
        )
    sampler.close()
    unwinder.close()


def run(root: str | None, binary: Path, depths: list[int], seconds: float) -> list[dict]:
    env = dict(os.environ)
    if root:
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, __file__, "--worker", str(binary), "--depths",
               ",".join(map(str, depths)), "--seconds", str(seconds)]  # fmt: skip
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="import root of another revision")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--depths", default="0,30,120,400")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    if args.worker:
        worker(args.worker, depths, args.seconds)
        return
    work = Path(tempfile.mkdtemp(prefix="fleetprof-deep-"))
    binary = workloads.build_native(work, workloads.RECURSION_SOURCE, frame_pointers=False)
    stats_were = Path(BPF_STATS).read_text().strip()
    Path(BPF_STATS).write_text("1")
    revisions = {"this": None, **({"baseline": args.baseline} if args.baseline else {})}
    results: dict[str, list[dict]] = {name: [] for name in revisions}
    try:
        for repeat in range(args.repeats):
            order = list(revisions.items())
            for name, root in order[repeat % len(order) :] + order[: repeat % len(order)]:
                rows = run(root, binary, depths, args.seconds)
                results[name].extend(rows)
                load = " ".join(f"{x:.1f}" for x in os.getloadavg())
                for row in rows:
                    print(f"run {repeat} {name:8} {row}, load {load}", flush=True)
    finally:
        Path(BPF_STATS).write_text(stats_were)
    print("\nmedian BPF µs/sample by recursion depth (stored stack depth), user_stacks KiB:")
    for name, rows in results.items():
        for depth in depths:
            mine = [row for row in rows if row["depth"] == depth]
            ns = statistics.median(row["ns"] for row in mine)
            stored = statistics.median(row["stored_depth"] for row in mine)
            kib = statistics.median(row["user_stacks_bytes"] for row in mine) / 1024
            print(
                f"{name:8} depth {depth:4}: {ns / 1000:6.2f} µs "
                f"[{min(r['ns'] for r in mine) / 1000:.2f}-{max(r['ns'] for r in mine) / 1000:.2f}]"
                f" stored {stored:5.0f} frames, user_stacks {kib:8.0f} KiB, "
                f"scratch {mine[0]['scratch_bytes'] / 1024:.0f} KiB"
            )


if __name__ == "__main__":
    main()
