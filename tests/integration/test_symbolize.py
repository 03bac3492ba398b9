"""Symbolization against real processes, binaries, perf maps and the running kernel."""

from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetprof.node_agent.symbolize import process
from fleetprof.node_agent.symbolize.elf import ElfCache, ElfSymbols
from fleetprof.node_agent.symbolize.frame import Frame, LruCache
from fleetprof.node_agent.symbolize.kernel import KernelSymbols
from fleetprof.node_agent.symbolize.perfmap import PerfMap, PerfMapCache
from fleetprof.node_agent.symbolize.process import take_snapshot
from fleetprof.node_agent.symbolize.symbolizer import Symbolizer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="reads other processes' /proc as root")

PROGRAM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <time.h>

volatile unsigned long counter;

__attribute__((noinline)) void hot_beta(void) {
    for (int i = 0; i < 100000; i++) counter++;
}

__attribute__((noinline)) void hot_alpha(void) {
    hot_beta();
    counter++;
}

int main(void) {
    /* Where a JIT would put its code: anonymous executable memory. */
    void *jit = mmap(NULL, 1 << 16, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    printf("%p %p %p %p %p\n", (void *)hot_alpha, (void *)hot_beta,
           dlsym(RTLD_DEFAULT, "nanosleep"), jit, (void *)getauxval(AT_SYSINFO_EHDR));
    fflush(stdout);
    struct timespec pause = {0, 10 * 1000 * 1000};
    for (;;) {
        hot_alpha();
        nanosleep(&pause, NULL);
    }
}
"""


@dataclass
class Running:
    proc: subprocess.Popen[str]
    binary: Path
    hot_alpha: int
    hot_beta: int
    nanosleep: int
    jit: int
    vdso: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    folder = tmp_path_factory.mktemp("prog")
    source = folder / "hot.c"
    source.write_text(PROGRAM)
    built = {}
    for kind, flags in {"pie": ["-fpie", "-pie"], "no-pie": ["-fno-pie", "-no-pie"]}.items():
        built[kind] = folder / f"hot-{kind}"
        subprocess.run(
            ["gcc", "-O0", "-fno-omit-frame-pointer", *flags, "-o", built[kind], source],
            check=True,
        )
    return built


def start(binary: Path) -> Running:
    proc = subprocess.Popen([binary], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    addresses = [int(word, 16) for word in proc.stdout.readline().split()]
    return Running(proc, binary, *addresses)


@pytest.fixture(params=["pie", "no-pie"])
def running(request: pytest.FixtureRequest, binaries: dict[str, Path]) -> Iterator[Running]:
    program = start(binaries[request.param])
    yield program
    program.stop()


def elf_type(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[16:18], "little")


def test_native_frames_of_a_running_program(running: Running) -> None:
    assert elf_type(running.binary) == (3 if running.binary.name == "hot-pie" else 2)
    symbolizer = Symbolizer()
    symbolizer.remember(running.pid)

    frames = symbolizer.symbolize_user(
        running.pid, [running.hot_beta + 4, running.hot_alpha + 4, running.nanosleep + 4]
    )

    module = running.binary.name
    assert frames[:2] == [
        Frame("hot_beta", module, "native"),
        Frame("hot_alpha", module, "native"),
    ]
    assert "nanosleep" in frames[2].name
    assert frames[2].module.startswith("libc.so")
    assert symbolizer.process_name(running.pid) == module[:15]
    assert symbolizer.stats["unknown"] == 0


def test_snapshot_still_resolves_after_the_process_is_reaped(running: Running) -> None:
    symbolizer = Symbolizer(resnapshot_interval=0)
    symbolizer.remember(running.pid)
    running.stop()
    assert not os.path.exists(f"/proc/{running.pid}")

    frames = symbolizer.symbolize_user(running.pid, [running.hot_alpha, running.nanosleep + 4])
    assert frames[0].name == "hot_alpha"
    assert "nanosleep" in frames[1].name
    assert symbolizer.exited_pids() == {running.pid}

    symbolizer.prune(symbolizer.exited_pids())
    assert symbolizer.symbolize_user(running.pid, [running.hot_alpha]) == [
        Frame("[unknown]", "", "unknown")
    ]


def test_binary_deleted_while_running_resolves_through_map_files(
    binaries: dict[str, Path], tmp_path: Path
) -> None:
    binary = tmp_path / "upgraded"
    shutil.copy(binaries["pie"], binary)
    program = start(binary)
    try:
        binary.unlink()
        frames = Symbolizer().symbolize_user(program.pid, [program.hot_alpha + 4])
        assert frames == [Frame("hot_alpha", "upgraded", "native")]
    finally:
        program.stop()


def test_executable_mappings_asked_of_the_kernel_equal_the_text(
    binaries: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PROCMAP_QUERY where the kernel has it (6.11), /proc/PID/maps' text else: the same
    mappings either way, a deleted binary, anonymous (JIT) code, the vDSO and [vsyscall] too."""
    binary = tmp_path / "upgraded"
    shutil.copy(binaries["pie"], binary)
    program = start(binary)
    try:
        binary.unlink()
        asked = process.executable_mappings(program.pid)
        monkeypatch.setattr(process._PROCMAP_QUERY, "supported", False)
        assert asked == process.executable_mappings(program.pid)
    finally:
        program.stop()
    paths = [path for *_, path in asked]
    assert f"{binary} (deleted)" in paths and "[vdso]" in paths and "" in paths  # the JIT's
    assert any(start == program.jit for start, *_ in asked)
    with pytest.raises(OSError):
        process.executable_mappings(program.pid)  # reaped


def test_vdso_frames(running: Running) -> None:
    symbolizer = Symbolizer()
    names = {
        frame.name
        for frame in symbolizer.symbolize_user(
            running.pid, [running.vdso + offset for offset in range(0, 0x2000, 8)]
        )
    }
    assert any("clock_gettime" in name for name in names), names


def test_unknown_processes_and_addresses() -> None:
    symbolizer = Symbolizer()
    assert symbolizer.symbolize_user(os.getpid(), []) == []
    # A kernel thread has no user mappings; a pid that never existed has nothing at all.
    assert symbolizer.symbolize_user(2, [0x1000]) == [Frame("[unknown]", "", "unknown")]
    assert symbolizer.symbolize_user(4_000_000, [1, 2]) == [Frame("[unknown]", "", "unknown")] * 2
    assert symbolizer.stats["unknown"] == 3


# --- perf maps ---------------------------------------------------------------------------


def test_perf_map_parse_skips_and_counts_bad_lines() -> None:
    text = (
        "1000 40 LFoo;::bar\n"
        "0x1040 0x40 void java.lang.Object.<init>()\n"  # jcmd's style: 0x, spaces in names
        "not a line\n"
        "\n"
        "zz 10 garbage\n"
        "2000 0 empty\n"
        "3000 10\n"  # truncated before the name
        "1000 20 LFoo;::recompiled\n"  # same start later: overrides
        "4000 10 last line without newline"
    )
    perf_map = PerfMap.parse(text)
    assert perf_map.bad_lines == 4
    assert len(perf_map) == 3
    assert perf_map.resolve(0x1000) == "LFoo;::recompiled"
    assert perf_map.resolve(0x101F) == "LFoo;::recompiled"
    assert perf_map.resolve(0x1020) is None  # the old, longer entry is gone
    assert perf_map.resolve(0x1041) == "void java.lang.Object.<init>()"
    assert perf_map.resolve(0x4005) == "last line without newline"
    assert perf_map.resolve(0xFFF) is None
    assert perf_map.resolve(0x4010) is None

    appended = perf_map.updated("4010 10 Lnew;::method\nbad\n")
    assert appended.resolve(0x4010) == "Lnew;::method"
    assert appended.resolve(0x1000) == "LFoo;::recompiled"
    assert appended.bad_lines == 5


def test_jit_frames_from_the_perf_map(running: Running) -> None:
    jit, pid = running.jit, running.pid
    path = Path(f"/tmp/perf-{pid}.map")
    path.write_text(
        f"{jit:x} 40 LFoo;::bar\n"
        f"{jit + 0x40:x} 40 Interpreter\n"
        "garbage\n"
        f"{0x10000000:x} 100 LBeyond;::mappings\n"
        f"{jit + 0x80:x} 4"  # a line the JIT is still writing
    )
    try:
        perf_maps = PerfMapCache(recheck_interval=0)
        symbolizer = Symbolizer(perf_maps=perf_maps, resnapshot_interval=0)
        symbolizer.remember(pid)

        # Leaf first; the caller's return address jit+0x40 is the end of its call in LFoo.
        # A readable name; the entry as written is the module.
        assert symbolizer.symbolize_user(pid, [jit + 0x50, jit + 0x40]) == [
            Frame("Interpreter", "Interpreter", "interpreted"),
            Frame("Foo.bar", "LFoo;::bar", "jit"),
        ]
        assert symbolizer.symbolize_user(pid, [0x10000010]) == [
            Frame("Beyond.mappings", "LBeyond;::mappings", "jit")
        ]
        assert symbolizer.symbolize_user(pid, [jit + 0x1000]) == [
            Frame(f"[jit 0x{jit + 0x1000:x}]", "[anon]", "jit")
        ]
        assert symbolizer.stats["jit_unresolved"] == 1
        # Per process, what the agent's JVM support reads to refresh maps.
        assert symbolizer.take_jit_activity() == ({pid: 3}, {pid: 1})
        assert symbolizer.take_jit_activity() == ({}, {})
        perf_map = perf_maps.get(pid, pid)
        assert perf_map is not None and perf_map.bad_lines == 1

        # The JIT finishes its line and appends: only the new bytes are read.
        with path.open("a") as f:
            f.write(f"0 Lfinished;::line\n{jit:x} 40 LFoo;::recompiled\n")
        reads = perf_maps.reads
        assert symbolizer.symbolize_user(pid, [jit + 0x80, jit + 0x10]) == [
            Frame("finished.line", "Lfinished;::line", "jit"),
            Frame("Foo.recompiled", "LFoo;::recompiled", "jit"),
        ]
        assert perf_maps.reads == reads + 1

        # The last copy outlives the file, then the process.
        path.unlink()
        assert symbolizer.symbolize_user(pid, [jit + 0x41])[0].name == "Interpreter"
        running.stop()
        assert symbolizer.symbolize_user(pid, [jit + 0x41])[0].name == "Interpreter"
        symbolizer.forget(pid)
        assert symbolizer.symbolize_user(pid, [jit + 0x41])[0].name == "[unknown]"
    finally:
        path.unlink(missing_ok=True)


def test_perf_map_rewritten_in_place_is_read_again_whole() -> None:
    """jcmd Compiler.perfmap rewrites the whole file: that is no append."""
    pid = os.getpid()
    path = Path(f"/tmp/perf-{pid}.map")
    cache = PerfMapCache(recheck_interval=0)
    try:
        path.write_text("1000 10 Lold;::a\n2000 10 Lold;::b\n")
        assert cache.get(pid, pid) is not None
        with path.open("r+") as f:  # same inode, longer content
            f.write("1000 10 Lnew;::a\n3000 10 Lnew;::c\n4000 10 Lnew;::d\n")
        perf_map = cache.get(pid, pid)
        assert perf_map is not None and perf_map.bad_lines == 0
        assert [perf_map.resolve(a) for a in (0x1000, 0x2000, 0x3000, 0x4000)] == [
            "Lnew;::a",
            None,
            "Lnew;::c",
            "Lnew;::d",
        ]
    finally:
        path.unlink(missing_ok=True)


def test_perf_map_of_a_process_in_its_own_pid_and_mount_namespace() -> None:
    """Like a container: its own pid 1 and /tmp, so the map is /proc/PID/root/tmp/perf-1.map."""
    unshare = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c",
         "mount -t tmpfs tmpfs /tmp && exec sleep 30"],
    )  # fmt: skip
    pid = _child_running(unshare.pid, "sleep")
    try:
        if pid is None:
            pytest.skip("cannot create PID and mount namespaces here")
        snapshot = take_snapshot(pid, ElfCache())
        assert snapshot is not None and snapshot.nspid == 1 and snapshot.pid == pid

        Path(f"/proc/{pid}/root/tmp/perf-1.map").write_text("10000000 100 LContained;::run\n")
        assert not Path("/tmp/perf-1.map").exists()  # the namespace's /tmp is its own

        frames = Symbolizer().symbolize_user(pid, [0x10000004])
        assert frames == [Frame("Contained.run", "LContained;::run", "jit")]
    finally:
        # Its pid 1 first: unshare then reaps it and exits.
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        try:
            unshare.wait(timeout=5)
        except subprocess.TimeoutExpired:
            unshare.kill()
            unshare.wait()


def _child_running(parent: int, comm: str) -> int | None:
    """The pid of parent's child once it runs comm (after its exec)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                text = Path(stat).read_text()
            except OSError:
                continue
            fields = text[text.rfind(")") + 2 :].split()
            if int(fields[1]) == parent and text[text.find("(") + 1 : text.rfind(")")] == comm:
                return int(Path(stat).parent.name)
        time.sleep(0.02)
    return None


@pytest.mark.skipif(shutil.which("jcmd") is None, reason="needs a JDK")
def test_a_real_jvm_perf_map(tmp_path: Path) -> None:
    source = tmp_path / "Spin.java"
    source.write_text(
        "public class Spin {\n"
        "  static long work(long n) { long s = 0; for (long i = 0; i < n; i++) s += i ^ (s >>> 3);"
        " return s; }\n"
        "  public static void main(String[] a) {\n"
        '    System.out.println("ready"); long t = 0;\n'
        "    while (true) { t += work(100000); if (t == 42) System.out.println(t); }\n"
        "  }\n"
        "}\n"
    )
    java = subprocess.Popen(["java", source], stdout=subprocess.PIPE, text=True)
    path = Path(f"/tmp/perf-{java.pid}.map")
    try:
        assert java.stdout is not None and java.stdout.readline() == "ready\n"
        time.sleep(0.5)  # let the JIT compile Spin.work
        subprocess.run(["jcmd", str(java.pid), "Compiler.perfmap"], check=True, capture_output=True)
        lines = path.read_text().splitlines()
        start = next(int(line.split()[0], 16) for line in lines if "Spin.work" in line)

        perf_maps = PerfMapCache()
        frames = Symbolizer(perf_maps=perf_maps).symbolize_user(java.pid, [start + 4])

        assert frames == [Frame("Spin.work", "long Spin.work(long)", "jit")]
        perf_map = perf_maps.get(java.pid, java.pid)
        assert perf_map is not None and perf_map.bad_lines == 0
        assert len(perf_map) > 0.9 * len(lines)
    finally:
        java.kill()
        java.wait()
        path.unlink(missing_ok=True)


# --- kernel -------------------------------------------------------------------------------


def _kallsyms_text() -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for line in Path("/proc/kallsyms").read_text().splitlines():
        addr, kind, name = line.split()[:3]
        if kind in "tTwW":
            names.setdefault(int(addr, 16), []).append(name)
    return names


def test_kernel_addresses_resolve_to_kallsyms_names() -> None:
    text = _kallsyms_text()
    if set(text) == {0}:
        pytest.skip("kallsyms addresses are hidden (kptr_restrict)")
    unique = {names[0]: addr for addr, names in text.items() if len(names) == 1}
    started = time.perf_counter()
    kernel = KernelSymbols.load()
    print(f"\nkallsyms: {len(kernel)} text symbols loaded in {time.perf_counter() - started:.3f} s")

    for name in random.sample(sorted(unique), 200):
        assert kernel.resolve(unique[name]).name == name
    assert kernel.resolve(unique["schedule"]) == Frame("schedule", "vmlinux", "kernel")

    symbolizer = Symbolizer(kernel=kernel)
    after_schedule = unique["schedule"] + 1
    frames = symbolizer.symbolize_kernel([after_schedule, after_schedule])
    # Both in schedule, the second a return address looked up one byte back.
    assert [f.name for f in frames] == ["schedule", "schedule"]
    assert symbolizer.symbolize_kernel([0x1000]) == [Frame("[unknown]", "[kernel]", "unknown")]


def test_kallsyms_with_modules_and_hidden_addresses(tmp_path: Path) -> None:
    listing = tmp_path / "kallsyms"
    listing.write_text(
        "ffffffff81000000 T _stext\n"
        "ffffffff81000000 t _stext_local_alias\n"
        "ffffffff81000100 D some_data\n"
        "ffffffff81000200 T do_work\n"
        "ffffffffc0001000 t nft_do_chain\t[nf_tables]\n"
    )
    kernel = KernelSymbols.load(str(listing))
    assert len(kernel) == 3
    assert kernel.resolve(0xFFFFFFFF81000150) == Frame("_stext", "vmlinux", "kernel")
    assert kernel.resolve(0xFFFFFFFF81000200) == Frame("do_work", "vmlinux", "kernel")
    assert kernel.resolve(0xFFFFFFFFC0001010) == Frame("nft_do_chain", "nf_tables", "kernel")

    # What an unprivileged reader sees with kptr_restrict: every address zero.
    listing.write_text("0000000000000000 T _stext\n0000000000000000 T do_work\n")
    hidden = Symbolizer(kernel=KernelSymbols.load(str(listing)))
    assert (
        hidden.symbolize_kernel([0xFFFFFFFF81000000, 0xFFFFFFFF81000200])
        == [Frame("[unknown]", "[kernel]", "unknown")] * 2
    )


# --- ELF ----------------------------------------------------------------------------------


def _libjvm() -> Path:
    found = sorted(glob.glob("/usr/lib/jvm/*/lib/server/libjvm.so"))
    if not found:
        pytest.skip("no libjvm.so under /usr/lib/jvm")
    return Path(found[0])


def _readelf(*args: str) -> list[str]:
    if shutil.which("readelf") is None:
        pytest.skip("readelf not installed")
    return subprocess.run(
        ["readelf", "-W", *args], check=True, capture_output=True, text=True
    ).stdout.splitlines()


def test_libjvm_symbols_and_lookup_rate() -> None:
    libjvm = _libjvm()
    started = time.perf_counter()
    symbols = ElfSymbols.load(str(libjvm))
    print(f"\n{libjvm}: {len(symbols)} functions loaded in {time.perf_counter() - started:.3f} s")
    assert len(symbols) > 10_000

    # readelf is the oracle: the symbol's address, and the PT_LOAD that maps it to the file.
    vaddr = next(
        int(line.split()[1], 16)
        for line in _readelf("--dyn-syms", str(libjvm))
        if line.split()[-1:] == ["JNI_CreateJavaVM"] or "JNI_CreateJavaVM@" in line
    )
    loads = [line.split() for line in _readelf("-l", str(libjvm)) if line.split()[:1] == ["LOAD"]]
    offset = next(
        vaddr - int(v, 16) + int(o, 16)
        for _, o, v, _, filesz, *_ in loads
        if int(v, 16) <= vaddr < int(v, 16) + int(filesz, 16)
    )
    assert symbols.resolve_file_offset(offset) == "JNI_CreateJavaVM"
    assert symbols.resolve_file_offset(offset + 8) == "JNI_CreateJavaVM"

    text = next(load for load in loads if "E" in load[6:-1])
    start, size = int(text[1], 16), int(text[4], 16)
    offsets = [random.randrange(start, start + size) for _ in range(200_000)]
    started = time.perf_counter()
    resolved = sum(symbols.resolve_file_offset(o) is not None for o in offsets)
    elapsed = time.perf_counter() - started
    print(f"{len(offsets) / elapsed / 1e6:.2f} M lookups/s, {resolved / len(offsets):.0%} named")
    assert resolved > 0.9 * len(offsets)


def test_symbolize_user_rate(running: Running) -> None:
    symbolizer = Symbolizer()
    stack = [running.hot_beta + 4, running.hot_alpha + 8, running.nanosleep + 4, running.jit]
    symbolizer.symbolize_user(running.pid, stack)
    started = time.perf_counter()
    for _ in range(25_000):
        symbolizer.symbolize_user(running.pid, stack)
    elapsed = time.perf_counter() - started
    print(f"\nsymbolize_user: {100_000 / elapsed / 1e6:.2f} M frames/s")


def test_corrupt_elf_files_give_empty_tables(tmp_path: Path, binaries: dict[str, Path]) -> None:
    real = binaries["pie"].read_bytes()
    assert len(ElfSymbols.load(str(binaries["pie"]))) > 0
    header = bytearray(real[:64])
    header[0x28:0x30] = (2**63).to_bytes(8, "little")  # e_shoff far beyond the file
    huge = bytearray(real)
    huge[0x3C:0x3E] = (0xFFFF).to_bytes(2, "little")  # e_shnum
    candidates = {
        "random": random.Random(7).randbytes(100_000),
        "empty": b"",
        "magic-only": b"\x7fELF",
        "elf32": real[:4] + b"\x01" + real[5:],
        "big-endian": real[:5] + b"\x02" + real[6:],
        "header-only": real[:64],
        "truncated-half": real[: len(real) // 2],
        "shoff-beyond": bytes(header) + real[64:],
        "shnum-huge": bytes(huge),
    }
    for name, data in candidates.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert len(ElfSymbols.load(str(path))) == 0, name
        assert ElfSymbols.load(str(path)).resolve_file_offset(0x1000) is None
    for special in ("/dev/zero", str(tmp_path), str(tmp_path / "missing")):
        assert len(ElfSymbols.load(special)) == 0


def test_mutated_elf_never_raises(binaries: dict[str, Path]) -> None:
    original = binaries["no-pie"].read_bytes()
    rng = random.Random(1)
    for _ in range(300):
        image = bytearray(original)
        for _ in range(rng.randrange(1, 20)):
            # The headers at both ends of the file, where the parser looks.
            position = rng.choice([rng.randrange(128), -rng.randrange(1, 4096)])
            image[position] = rng.randrange(256)
        ElfSymbols.from_bytes(bytes(image)).resolve_file_offset(0x1100)


def test_elf_cache_rereads_a_replaced_binary(tmp_path: Path, binaries: dict[str, Path]) -> None:
    path = tmp_path / "tool"
    shutil.copy("/bin/true", path)
    cache = ElfCache()
    first = cache.get(str(path))
    assert first is not None and cache.get(str(path)) is first

    shutil.copy(binaries["pie"], path)
    replaced = cache.get(str(path))
    assert replaced is not first and replaced is not None
    assert "hot_alpha" in {replaced.resolve_file_offset(o) for o in range(0, 0x3000)}
    assert cache.get(str(tmp_path / "missing")) is None


def test_a_mapped_file_known_by_device_and_inode_is_stat_again_after_a_second(
    tmp_path: Path, binaries: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """New processes' common libraries are known by the (device, inode) of their maps, not
    stat'ed each time; a file rewritten in place (same inode) is read anew once that
    knowledge is older than MAPPED_RECHECK_S."""
    from fleetprof.node_agent.symbolize import elf

    path = tmp_path / "tool"
    shutil.copy("/bin/true", path)
    inode = path.stat().st_ino
    cache = ElfCache()
    first = cache.get_mapped("fd:01", inode, (str(path),), str(path))
    assert first is not None
    shutil.copy(binaries["pie"], path)  # in place: the same inode, new contents
    assert path.stat().st_ino == inode
    assert cache.get_mapped("fd:01", inode, (str(path),), str(path)) is first
    monkeypatch.setattr(elf, "MAPPED_RECHECK_S", 0.0)
    rewritten = cache.get_mapped("fd:01", inode, (str(path),), str(path))
    assert rewritten is not first and rewritten is not None
    assert "hot_alpha" in {rewritten.resolve_file_offset(o) for o in range(0, 0x3000)}
    assert cache.get_mapped("fd:01", inode + 1, (str(tmp_path / "missing"),), "") is None


def test_lru_cache_is_bounded_by_weight() -> None:
    cache: LruCache[str, list[int]] = LruCache(10, len)
    cache.put("a", [1] * 4)
    cache.put("b", [1] * 4)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", [1] * 4)
    assert cache.get("b") is None and cache.get("a") is not None and cache.weight == 8
    cache.put("huge", [1] * 50)  # kept alone: the newest entry always stays
    assert len(cache) == 1 and cache.get("huge") is not None
