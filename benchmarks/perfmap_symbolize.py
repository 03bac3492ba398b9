"""What symbolizing a JVM costs the agent: loading and indexing its perf map, and lookups.

A synthetic map of 50k entries as a busy JVM's `Compiler.perfmap` writes them (hex start
and size, `RETURN_TYPE package.Class.method(ARGS)`), read the way the agent reads one
(PerfMapCache, from the process's /tmp), in a fresh interpreter so its RSS is the map's.
Printed against baselines measured in the same run:

- load time / the floor: reading the file and splitting every line into its three fields,
  which any parser must do;
- RSS added / the map's size on disk;
- lookups per second (random code-cache addresses; target >= 1M/s) / the floor: a bare
  bisect over the sorted starts, the least any sorted-index lookup in Python does;
- named frames per second: lookup plus the readable name (names.runtime_frame, cached).

Times are CPU times (the machine may be shared), the best of --repeats runs.
Run: .venv/bin/python benchmarks/perfmap_symbolize.py [--entries N] [--repeats N]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import subprocess
import sys
import tempfile
import time
from bisect import bisect_right
from collections.abc import Callable
from pathlib import Path

CODE_CACHE = 0x7F3A_0000_0000
LOOKUPS = 500_000
TARGET_LOOKUPS_PER_S = 1_000_000


def write_map(path: Path, entries: int) -> None:
    """HotSpot-like: methods of a few thousand classes, some at several tiers, stubs."""
    rng = random.Random(42)
    types = ["void", "int", "long", "boolean", "java.lang.Object", "java.lang.String"]
    lines, addr = [], CODE_CACHE
    for i in range(entries):
        size = rng.randrange(0x40, 0x2000)
        if i % 50 == 0:
            name = "I2C/C2I adapters"
        else:
            method = rng.randrange(entries // 2)  # ~a third are a method compiled again
            name = (
                f"{rng.choice(types)} org.apache.spark.pkg{method % 97}.Class{method % 3001}"
                f".method{method}(long, {rng.choice(types)})"
            )
        lines.append(f"0x{addr:016x} 0x{size:016x} {name}\n")
        addr += size + rng.randrange(0, 0x100)
    path.write_text("".join(lines))


def vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(field)


def best(repeats: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        started = time.process_time()
        run()
        times.append(time.process_time() - started)
    return min(times)


def measure(root: Path, repeats: int) -> dict[str, float]:
    """In a fresh interpreter: the map's load, memory and lookups."""
    from fleetprof.node_agent.agent import release_free_memory
    from fleetprof.node_agent.symbolize.names import runtime_frame
    from fleetprof.node_agent.symbolize.perfmap import PerfMapCache

    path = root / "tmp" / "perf-1.map"
    gc.collect()
    rss_before = vm_kb("VmRSS")
    started = time.process_time()
    perf_map = PerfMapCache().get(1, 1, str(root))
    first_load_s = time.process_time() - started
    gc.collect()
    release_free_memory()  # as the agent does after each drain
    rss_added_kb = vm_kb("VmRSS") - rss_before
    assert perf_map is not None and perf_map.bad_lines == 0

    load_s = best(repeats, lambda: PerfMapCache().get(1, 1, str(root)))
    floor_s = best(repeats, lambda: [line.split(None, 2) for line in path.read_text().split("\n")])

    text = path.read_text()
    starts = sorted({int(line.split()[0], 16) for line in text.splitlines()})
    end = starts[-1] + 0x2000
    rng = random.Random(7)
    addresses = [rng.randrange(CODE_CACHE, end) for _ in range(LOOKUPS)]

    def lookups() -> None:
        resolve = perf_map.resolve
        for addr in addresses:
            resolve(addr)

    def floor_lookups() -> None:
        for addr in addresses:
            bisect_right(starts, addr)

    def named_frames() -> None:
        resolve = perf_map.resolve
        for addr in addresses:
            entry = resolve(addr)
            if entry is not None:
                runtime_frame(entry)

    hits = sum(perf_map.resolve(addr) is not None for addr in addresses)
    return {
        "entries": len(perf_map),
        "map_bytes": path.stat().st_size,
        "first_load_s": first_load_s,
        "load_s": load_s,
        "floor_s": floor_s,
        "rss_added_kb": rss_added_kb,
        "lookups_per_s": LOOKUPS / best(repeats, lookups),
        "floor_lookups_per_s": LOOKUPS / best(repeats, floor_lookups),
        "named_frames_per_s": LOOKUPS / best(repeats, named_frames),
        "hit_rate": hits / LOOKUPS,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--measure", metavar="ROOT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.repeats)))
        return 0
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "tmp").mkdir()
        write_map(Path(root) / "tmp" / "perf-1.map", args.entries)
        child = subprocess.run(
            [sys.executable, __file__, "--repeats", str(args.repeats), "--measure", root],
            check=True,
            capture_output=True,
            text=True,
        )
    r = json.loads(child.stdout)
    mb = r["map_bytes"] / 1e6
    rate = r["lookups_per_s"]
    print(f"perf map: {r['entries']:,} entries, {mb:.1f} MB on disk")
    print(
        f"load + index: {r['load_s'] * 1e3:.0f} ms (first, cold: {r['first_load_s'] * 1e3:.0f} ms)"
        f" = {r['load_s'] / r['floor_s']:.1f}x the floor (read + split lines: "
        f"{r['floor_s'] * 1e3:.0f} ms)"
    )
    rss = r["rss_added_kb"] * 1024
    print(
        f"RSS added: {rss / 1e6:.1f} MB = {rss / r['map_bytes']:.2f}x the map's size, "
        f"{rss / r['entries']:.0f} bytes per entry"
    )
    print(
        f"lookups: {rate / 1e6:.2f} M/s ({r['hit_rate']:.0%} hits) = "
        f"{rate / r['floor_lookups_per_s']:.2f}x a bare bisect "
        f"({r['floor_lookups_per_s'] / 1e6:.2f} M/s); target >= 1 M/s: "
        + ("met" if rate >= TARGET_LOOKUPS_PER_S else "NOT met")
    )
    print(f"named frames (lookup + readable name): {r['named_frames_per_s'] / 1e6:.2f} M/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
