"""User stacks of code built without frame pointers, unwound from .eh_frame in the kernel,
held against `perf record --call-graph dwarf` on the same process in the same run."""

from __future__ import annotations

import math
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fleetprof import workloads
from fleetprof.aggregator.server import Aggregator
from fleetprof.query.filters import SampleFilter
from fleetprof.query.flame import load_flame
from fleetprof.query.flame_tree import FlameNode
from fleetprof.query.source import AggregatorSource
from tests.conftest import require

# A leaf under two callers that call it 3:1 (by work), the path to main through them.
CALLERS = r"""
#include <stdlib.h>
#include <time.h>
__attribute__((noinline)) double leaf_work(double x, int n)
{
    for (int i = 0; i < n; i++)
        x = x * 1.0000001 + 0.5 / (x + 1.0);
    return x;
}
__attribute__((noinline)) double caller_big(double x) { return leaf_work(x, 3000) + 1; }
__attribute__((noinline)) double caller_small(double x) { return leaf_work(x, 1000) + 2; }
static double elapsed(struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) + (t.tv_nsec - t0->tv_nsec) / 1e9;
}
int main(int argc, char **argv)
{
    double seconds = atof(argv[1]), acc = 0;
    unsigned int state = 2463534242u;
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (elapsed(&t0) < seconds)
        for (int i = 0; i < 1000; i++) {
            // Each caller half of the calls, in a random order: a fixed-rate sampler then
            // does not beat with a period of the loop (which made shares spread 1.5 times
            // their binomial error across runs).
            state ^= state << 13, state ^= state >> 17, state ^= state << 5;
            acc += (state & 1) ? caller_big(acc) : caller_small(acc);
            acc = acc > 1e6 ? 1 : acc;
        }
    return acc == 42;
}
"""

# Hot code reached through glibc: a qsort comparator.
QSORT = r"""
#include <stdlib.h>
#include <time.h>
static int compare_keys(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    for (int i = 0; i < 40; i++)
        x = x * 1.0000001 + 1e-9;
    return (x > y) - (x < y);
}
__attribute__((noinline)) double sort_batches(double *keys, int n)
{
    for (int i = 0; i < n; i++)
        keys[i] = (double)rand() / RAND_MAX;
    qsort(keys, n, sizeof(double), compare_keys);
    return keys[n / 2];  // not a tail call: sort_batches keeps its frame
}
int main(int argc, char **argv)
{
    static double keys[20000];
    time_t end = time(0) + atoi(argv[1]);
    while (time(0) < end)
        sort_batches(keys, 20000);
    return 0;
}
"""

# main waits in pthread_join while its worker sleeps.
JOIN = r"""
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>
static void *worker(void *arg)
{
    for (int i = 0; i < atoi(arg) * 10; i++)
        usleep(100000);
    return 0;
}
__attribute__((noinline)) int wait_for_worker(pthread_t thread)
{
    void *result;
    pthread_join(thread, &result);
    return result != 0;  // not a tail call: wait_for_worker keeps its frame
}
int main(int argc, char **argv)
{
    pthread_t thread;
    pthread_create(&thread, 0, worker, argv[1]);
    return wait_for_worker(thread);
}
"""


def build(folder: Path, name: str, source: str, *flags: str) -> Path:
    require(bool(subprocess.run(["which", "gcc"], capture_output=True).stdout), "no gcc")
    (folder / f"{name}.c").write_text(source)
    binary = folder / name
    # -O2 omits frame pointers, as Debian's own packages do.
    subprocess.run(
        ["gcc", "-O2", *flags, "-o", str(binary), str(folder / f"{name}.c"), "-lpthread"],
        check=True,
    )
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(binary)], capture_output=True, check=True
    ).stdout
    main = listing.split(b"<main>:")[1].split(b"\n\n")[0]
    assert b"mov    %rsp,%rbp" not in main, (
        "main keeps a frame pointer: the test would prove nothing"
    )
    return binary


def build_id(binary: Path) -> str:
    """The file's GNU build id, in hex, as readelf prints it."""
    notes = subprocess.run(
        ["readelf", "-n", str(binary)], capture_output=True, text=True, check=True
    )
    return notes.stdout.split("Build ID: ")[1].split()[0]


def paths(tree: FlameNode) -> Counter[tuple[str, ...]]:
    """Every path from below the process's node to a frame, with its self weight."""
    found: Counter[tuple[str, ...]] = Counter()
    pending: list[tuple[FlameNode, tuple[str, ...]]] = [
        (process, ()) for process in tree.children.values()
    ]
    while pending:  # not recursive: stacks are deeper than Python's recursion limit
        node, path = pending.pop()
        if node.self_weight:
            found[path] += node.self_weight
        pending.extend((child, (*path, child.name)) for child in node.children.values())
    return found


def stored_stacks(
    aggregator: Aggregator, pid: int, since: datetime, event: str = "cpu"
) -> Counter[tuple[str, ...]]:
    source = AggregatorSource(aggregator.address)
    try:
        return paths(load_flame(source, SampleFilter(event=event, pids=(pid,), since=since)))
    finally:
        source.close()


def perf_stacks(
    pid: int, seconds: float, output: Path, call_graph: str = "dwarf"
) -> Counter[tuple[str, ...]]:
    """What `perf record --call-graph dwarf` sees of pid (root first), over `seconds`."""
    subprocess.run(
        ["perf", "record", "-q", "-F", "99", "--call-graph", call_graph, "-p", str(pid),
         "-o", str(output), "--", "sleep", str(seconds)],
        check=True, capture_output=True,
    )  # fmt: skip
    script = subprocess.run(
        ["perf", "script", "-i", str(output), "-F", "ip,sym"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    stacks: Counter[tuple[str, ...]] = Counter()
    for block in script.split("\n\n"):
        frames = [line.split(None, 1)[1] for line in block.strip().split("\n") if " " in line]
        if frames:
            stacks[tuple(reversed(frames))] += 1
    return stacks


def shares(stacks: Counter[tuple[str, ...]], leaf: str) -> tuple[int, float, float]:
    """(samples in `leaf`, share of them reaching main, share of them under caller_big)."""
    hits = {path: n for path, n in stacks.items() if path and path[-1] == leaf}
    total = sum(hits.values())
    under_main = sum(n for path, n in hits.items() if "main" in path)
    under_big = sum(n for path, n in hits.items() if "caller_big" in path)
    return total, under_main / max(total, 1), under_big / max(total, 1)


def finish(process: subprocess.Popen[bytes]) -> None:
    """Wait for process, then for the agent's next two drains (interval 1 s) to store what
    it counted last: a wait is counted when it ends."""
    process.wait()
    time.sleep(2.5)


# A process's tables are complete milliseconds to seconds after its first sample (files
# parsed cold, on a busy machine): workloads get this long on top of what a test measures.
LOAD_ALLOWANCE_S = 30


def start_unwound(
    running_agent: Callable[..., object],
    command: list[str],
    seconds: int,
    after: tuple[str, ...] = (),
    **agent: object,
) -> tuple[subprocess.Popen[bytes], datetime]:
    """Start command (then for how long it runs, then `after`) under a running agent and
    stop it (SIGTERM) `seconds` after its tables are complete; returns it and from when
    its samples are whole (samples taken before are frame-pointer walks, by design)."""
    started = running_agent(frequency=99, interval_s=1.0, **agent)
    return start_under(started, command, seconds, after)


def start_under(
    agent: object, command: list[str], seconds: int, after: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], datetime]:
    """start_unwound's, under an agent already started."""
    process = subprocess.Popen(
        [*command, str(seconds + LOAD_ALLOWANCE_S), *after], stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + LOAD_ALLOWANCE_S
    while not agent.unwinder.complete(process.pid):  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the process's unwind tables were never complete"
        assert process.poll() is None
        time.sleep(0.05)
    stop = threading.Timer(seconds, process.terminate)
    stop.daemon = True
    stop.start()
    # Samples are stored with their drain's time: the next full interval is all unwound.
    return process, datetime.now(UTC) + timedelta(seconds=1.5)


@pytest.mark.parametrize("flags", [(), ("-no-pie", "-fno-pie")], ids=["pie", "no-pie"])
def test_callers_of_a_frameless_leaf_match_perf_dwarf(
    aggregator, running_agent, tmp_path, flags
) -> None:
    binary = build(tmp_path, "callers", CALLERS, *flags)
    process, since = start_unwound(running_agent, [str(binary)], 14)
    time.sleep(1.5)
    reference = perf_stacks(process.pid, 8, tmp_path / "perf.data")
    finish(process)
    ours = stored_stacks(aggregator, process.pid, since)

    total, main, big = shares(ours, "leaf_work")
    perf_total, perf_main, perf_big = shares(reference, "leaf_work")
    # ~1,000 and ~600 samples on a quiet machine: 3 standard errors of a 75% share are
    # then 4 and 5 points.
    assert total >= 300, f"too few samples: {total}"
    assert perf_total >= 100, f"perf saw too few samples: {perf_total}"
    assert perf_main >= 0.95, "the reference itself does not reach main"
    assert main >= 0.95, f"{main:.1%} of leaf samples reach main; stacks: {ours.most_common(4)}"
    assert abs(big - 0.75) <= 0.05, f"caller_big {big:.1%} of leaf samples"
    both = 3 * math.sqrt(0.75 * 0.25 * (1 / total + 1 / perf_total))
    assert abs(big - perf_big) <= max(0.05, both), (
        f"caller_big {big:.1%}, perf --call-graph dwarf {perf_big:.1%}"
    )


def test_qsort_comparator_keeps_its_callers(aggregator, running_agent, tmp_path) -> None:
    binary = build(tmp_path, "sorter", QSORT)
    process, since = start_unwound(running_agent, [str(binary)], 8)
    finish(process)
    ours = stored_stacks(aggregator, process.pid, since)
    comparator = {path: n for path, n in ours.items() if path and path[-1] == "compare_keys"}
    total = sum(comparator.values())
    assert total >= 100, f"too few comparator samples: {total}; stacks {ours.most_common(4)}"
    through = sum(n for path, n in comparator.items() if "sort_batches" in path and "main" in path)
    assert through / total >= 0.90, f"{through}/{total}: {ours.most_common(4)}"


def test_a_wait_in_pthread_join_reaches_main(aggregator, running_agent, tmp_path) -> None:
    binary = build(tmp_path, "joiner", JOIN)
    process, since = start_unwound(running_agent, [str(binary)], 4, events=("cpu", "offcpu"))
    finish(process)
    ours = stored_stacks(aggregator, process.pid, since - timedelta(seconds=3), "offcpu")
    joined = {path: n for path, n in ours.items() if "wait_for_worker" in path}
    assert joined, f"main's wait not seen: {ours.most_common(4)}"
    reaching = sum(n for path, n in joined.items() if "main" in path)
    assert reaching == sum(joined.values()), joined


YIELDER = """
public class Yielder {
    static long spin(int n) {
        long x = 0;
        for (int i = 0; i < n; i++) x += i ^ (x >>> 3);
        return x;
    }
    static long yieldLoop(double seconds) {
        long end = System.nanoTime() + (long) (seconds * 1e9), acc = 0;
        while (System.nanoTime() < end) {
            Thread.yield();
            acc += spin(50);
        }
        return acc;
    }
    public static void main(String[] args) {
        System.out.println(yieldLoop(Double.parseDouble(args[0])));
    }
}
"""


def test_jit_frames_into_libjvm_and_libc_stay_joined(aggregator, running_agent, tmp_path) -> None:
    """Java (JIT, frame pointers) -> libjvm.so (rows) -> libc (rows), and back up through
    the call stub into libjvm and the launcher's thread: one stack."""
    require(bool(subprocess.run(["which", "javac"], capture_output=True).stdout), "no JDK")
    (tmp_path / "Yielder.java").write_text(YIELDER)
    subprocess.run(["javac", "-d", str(tmp_path), str(tmp_path / "Yielder.java")], check=True)
    java = ["java", "-XX:+PreserveFramePointer", "-cp", str(tmp_path), "Yielder"]
    process, since = start_unwound(running_agent, java, 8)
    since += timedelta(seconds=1.5)  # the JIT warmed up
    finish(process)
    ours = stored_stacks(aggregator, process.pid, since)
    in_vm = {path: n for path, n in ours.items() if "JVM_Yield" in path}
    total = sum(in_vm.values())
    assert total >= 30, f"too few samples in JVM_Yield: {ours.most_common(5)}"
    joined = sum(n for path, n in in_vm.items() if "yieldLoop" in str(path) and "JavaMain" in path)
    assert joined / total >= 0.8, (
        f"{joined}/{total}: {sorted(in_vm.items(), key=lambda i: -i[1])[:3]}"
    )


STRIPPED = r"""
#include <stdlib.h>
#include <time.h>
__attribute__((noinline)) static double hidden_work(double x)
{
    for (int i = 0; i < 100000; i++)
        x = x * 1.0000001 + 0.5 / (x + 1.0);
    return x;
}
int main(int argc, char **argv)
{
    double acc = 1;
    time_t end = time(0) + atoi(argv[1]);
    while (time(0) < end)
        acc = hidden_work(acc) > 1e6 ? 1 : acc + 1;
    return acc == 42;
}
"""


@pytest.mark.parametrize("where", ["build-id", "debuglink"])
def test_a_stripped_binary_is_named_from_its_debug_file(
    aggregator, running_agent, tmp_path, where
) -> None:
    from fleetprof.node_agent.symbolize.elf import DEBUG_ROOT, ElfSymbols

    binary = build(tmp_path, "stripped", STRIPPED, "-g", "-Wl,--build-id")
    debug = tmp_path / "stripped.debug"
    subprocess.run(["objcopy", "--only-keep-debug", str(binary), str(debug)], check=True)
    subprocess.run(["strip", "--strip-all", str(binary)], check=True)
    assert len(ElfSymbols.load(str(binary))) == 0, "strip left function symbols"
    if where == "build-id":
        hexid = build_id(binary)
        placed = Path(f"{DEBUG_ROOT}/.build-id/{hexid[:2]}/{hexid[2:]}.debug")
    else:
        subprocess.run(
            ["objcopy", f"--add-gnu-debuglink={debug}", str(binary)], check=True, cwd=tmp_path
        )
        placed = tmp_path / ".debug" / "stripped.debug"
    placed.parent.mkdir(parents=True, exist_ok=True)
    placed.write_bytes(debug.read_bytes())
    try:
        process, since = start_unwound(running_agent, [str(binary)], 5)
        finish(process)
    finally:
        placed.unlink()
    # Samples from its tables' loading on (before, frame pointers walk it by design).
    ours = stored_stacks(aggregator, process.pid, since)
    total = sum(ours.values())
    named = sum(n for path, n in ours.items() if path[-1] == "hidden_work" and "main" in path)
    assert total >= 50 and named / total >= 0.9, ours.most_common(4)


LIBRARY = r"""
__attribute__((noinline)) static double plugin_leaf(double x, int n)
{
    for (int i = 0; i < n; i++)
        x = x * 1.0000001 + 0.5 / (x + 1.0);
    return x;
}
double plugin_work(double x) { return plugin_leaf(x, 4000) + 1; }
"""

# Works in its own code, then dlopen()s a plugin (built -O2) and works in it.
LOADER = r"""
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
__attribute__((noinline)) double own_work(double x)
{
    for (int i = 0; i < 4000; i++)
        x = x * 1.0000001 + 0.5 / (x + 1.0);
    return x;
}
__attribute__((noinline)) double call_plugin(double (*work)(double), double x)
{
    return work(x) + 1;
}
int main(int argc, char **argv)
{
    double acc = 1;
    time_t start = time(0);
    while (time(0) < start + 2)
        acc = own_work(acc) > 1e6 ? 1 : acc + 1;
    double (*work)(double) = (double (*)(double))dlsym(dlopen(argv[2], RTLD_NOW), "plugin_work");
    while (time(0) < start + atoi(argv[1]))
        acc = call_plugin(work, acc) > 1e6 ? 1 : acc + 1;
    return acc == 42;
}
"""

# Spins, then execs another program in the same process.
EXECER = r"""
#include <time.h>
#include <unistd.h>
__attribute__((noinline)) double before_exec(double x)
{
    for (int i = 0; i < 4000; i++)
        x = x * 1.0000001 + 0.5 / (x + 1.0);
    return x;
}
int main(int argc, char **argv)
{
    double acc = 1;
    time_t start = time(0);
    while (time(0) < start + 2)
        acc = before_exec(acc) > 1e6 ? 1 : acc + 1;
    execv(argv[2], argv + 2);
    return 1;
}
"""


def test_a_library_opened_after_start_is_unwound(aggregator, running_agent, tmp_path) -> None:
    (tmp_path / "plugin.c").write_text(LIBRARY)
    plugin = tmp_path / "libplugin.so"
    subprocess.run(
        ["gcc", "-O2", "-shared", "-fPIC", "-o", str(plugin), str(tmp_path / "plugin.c")],
        check=True,
    )
    binary = build(tmp_path, "loader", LOADER, "-ldl")
    agent = running_agent(frequency=99, interval_s=1.0)
    process = subprocess.Popen([str(binary), "9", str(plugin)])
    time.sleep(4)  # loaded, then the plugin opened: its exec mmap reloads the process
    since = datetime.now(UTC) + timedelta(seconds=1)
    finish(process)
    assert agent.unwinder.stats()["processes_loaded"] >= 2  # type: ignore[attr-defined]
    ours = stored_stacks(aggregator, process.pid, since)
    # gcc may name its clone plugin_leaf.constprop.0
    leaf = {path: n for path, n in ours.items() if path and path[-1].startswith("plugin_leaf")}
    total = sum(leaf.values())
    assert total >= 100, f"too few plugin samples: {ours.most_common(4)}"
    reaching = sum(n for path, n in leaf.items() if "call_plugin" in path and "main" in path)
    assert reaching / total >= 0.95, f"{reaching}/{total}: {ours.most_common(4)}"


def test_a_process_that_execs_is_unwound_as_its_new_program(
    aggregator, running_agent, tmp_path
) -> None:
    first = build(tmp_path, "execer", EXECER)
    second = build(tmp_path, "callers", CALLERS, "-no-pie", "-fno-pie")
    agent = running_agent(frequency=99, interval_s=1.0)
    process = subprocess.Popen([str(first), "0", str(second), "7"])
    time.sleep(3)  # sampled and loaded as execer, then exec'd
    since = datetime.now(UTC) + timedelta(seconds=1)
    finish(process)
    assert agent.unwinder.stats()["processes_loaded"] >= 2  # type: ignore[attr-defined]
    total, main, big = shares(stored_stacks(aggregator, process.pid, since), "leaf_work")
    assert total >= 150
    assert main >= 0.95 and abs(big - 0.75) <= 0.05, (main, big)


def test_a_binary_replaced_on_disk_while_running_keeps_its_own_tables(
    aggregator, running_agent, tmp_path
) -> None:
    """A package upgrade renames a new build over a running program's file: the running
    process (its mapping now `(deleted)`) is unwound with the old file's tables, read
    through /proc/PID/map_files, and a process started from the new file with the new."""
    delayed = CALLERS.replace("#include <time.h>", "#include <time.h>\n#include <unistd.h>")
    delayed = delayed.replace(
        "    struct timespec t0;\n", "    struct timespec t0;\n    sleep(atoi(argv[2]));\n"
    )
    binary = build(tmp_path, "callers", delayed)
    running_agent(frequency=99, interval_s=1.0)
    old = subprocess.Popen([str(binary), "8", "2"])  # sleeps 2 s: sampled after the swap
    time.sleep(0.5)
    build(tmp_path, "callers-new", delayed, "-no-pie", "-fno-pie").replace(binary)
    assert "(deleted)" in Path(f"/proc/{old.pid}/maps").read_text()
    new = subprocess.Popen([str(binary), "8", "0"])
    since = datetime.now(UTC) + timedelta(seconds=4)
    finish(old)
    finish(new)
    for process in (old, new):
        total, main, big = shares(stored_stacks(aggregator, process.pid, since), "leaf_work")
        assert total >= 150, (process.args, total)
        # 3 standard errors of a 75% share: ±7 points at 350 samples.
        margin = max(0.05, 3 * math.sqrt(0.75 * 0.25 / total))
        assert main >= 0.95 and abs(big - 0.75) <= margin, (process.args, total, main, big)


# perf keeps this many frames (kernel.perf_event_max_stack's default).
PERF_FRAMES = 127


def leaf_stacks(
    stacks: Counter[tuple[str, ...]], leaf: str
) -> tuple[dict[tuple[str, ...], int], int]:
    """The stacks (root first) whose leaf is `leaf`, and their samples."""
    found = {path: n for path, n in stacks.items() if path and path[-1] == leaf}
    return found, sum(found.values())


def start_recursion(
    running_agent: Callable[..., object], folder: Path, depth: int
) -> tuple[object, subprocess.Popen[bytes], datetime]:
    """An agent, and the recursion `depth` deep under it from when all its rows are loaded
    (it runs until terminated); when that was."""
    binary = workloads.build_native(folder, workloads.RECURSION_SOURCE, frame_pointers=False)
    agent = running_agent(frequency=99, interval_s=1.0)
    return agent, *start_under(agent, [str(binary)], 120, (str(depth),))


def test_a_recursion_400_deep_keeps_its_root_where_perf_keeps_127_frames(
    aggregator, running_agent, tmp_path
) -> None:
    _, process, since = start_recursion(running_agent, tmp_path, 400)
    time.sleep(1.5)
    reference = perf_stacks(process.pid, 6, tmp_path / "perf.data", "dwarf,65528")
    time.sleep(2)
    process.terminate()
    finish(process)
    ours = stored_stacks(aggregator, process.pid, since)

    leaf, total = leaf_stacks(ours, "leaf_spin")
    assert total >= 200, f"too few samples: {total}: {ours.most_common(2)}"
    # recurse(400) .. recurse(0): 401 frames.
    whole = sum(
        n for path, n in leaf.items() if "main" in path and abs(path.count("recurse") - 401) <= 3
    )
    assert whole / total >= 0.95, (
        f"{whole}/{total} reach main through 401 recurse frames: "
        f"{[(p.count('recurse'), p[:3], n) for p, n in leaf.items()][:5]}"
    )
    # perf keeps the leaf's 127 frames: the same as ours there, never the root.
    perf_leaf, perf_total = leaf_stacks(reference, "leaf_spin")
    assert perf_total >= 50, f"perf saw too few: {reference.most_common(2)}"
    perf_top, _ = max(perf_leaf.items(), key=lambda item: item[1])
    ours_top, _ = max(leaf.items(), key=lambda item: item[1])
    assert len(perf_top) <= PERF_FRAMES and "main" not in perf_top
    assert len(ours_top) > PERF_FRAMES
    assert ours_top[-len(perf_top) :] == perf_top


def test_a_recursion_deeper_than_kept_has_a_truncated_root_and_is_counted(
    aggregator, running_agent, tmp_path
) -> None:
    agent, process, since = start_recursion(running_agent, tmp_path, 1500)
    before = agent.unwinder.stats()["truncated_stacks"]  # type: ignore[attr-defined]
    time.sleep(6)
    process.terminate()
    finish(process)
    truncated = agent.unwinder.stats()["truncated_stacks"] - before  # type: ignore[attr-defined]
    ours = stored_stacks(aggregator, process.pid, since)
    leaf, total = leaf_stacks(ours, "leaf_spin")
    assert total >= 100, f"too few samples: {total}"
    cut = {path: n for path, n in leaf.items() if path[0] == "[truncated]"}
    assert sum(cut.values()) / total >= 0.95, [(p[:2], len(p), n) for p, n in leaf.items()][:5]
    # The frames nearest the leaf: 1024 walked, the wire's 1024 with the root.
    assert all(path.count("recurse") >= 1000 and "main" not in path for path in cut)
    assert truncated >= sum(cut.values()) * 0.9, (truncated, sum(cut.values()))
