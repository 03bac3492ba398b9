"""Python frames read from real CPython interpreters by the BPF walker (python_stacks.bpf.h)
and named by the agent (symbolize/python.py): no flag or agent in the profiled process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fleetprof.node_agent.samplers.kernel_layout import kernel_offsets
from fleetprof.node_agent.samplers.python_stacks import TARGETS, PythonTargets
from fleetprof.node_agent.symbolize.frame import Frame
from fleetprof.node_agent.symbolize.python import (
    LAYOUTS,
    PythonProcesses,
    code_tag,
    layout_from_debug_offsets,
    line_of,
)
from fleetprof.proto.python_frames import module_name
from tests.conftest import require, require_ebpf

PYENV = Path("/root/.pyenv/versions")
DEBIAN_PYTHON = Path("/usr/bin/python3.11")


def pyenv(minor: int) -> Path:
    found = sorted(PYENV.glob(f"3.{minor}.*/bin/python3.{minor}"))
    require(bool(found), f"pyenv has no CPython 3.{minor}")
    return found[-1]


# One hot function under two callers; the program times its calls itself (CPU time: what the
# runtime says) and prints that split, and each thread's native id, as JSON.
HOT_FUNCTION = """
def hot(n):
    total = 0
    for i in range(n):
        total += i * i
    return total
"""
HOT = (
    """
import json, sys, threading, time
"""
    + HOT_FUNCTION
    + """
def caller_a(spent):
    start = time.thread_time()
    for _ in range(3):
        hot(20000)
    spent["a"] += time.thread_time() - start

def caller_b(spent):
    start = time.thread_time()
    hot(20000)
    spent["b"] += time.thread_time() - start

def spin_one(deadline):
    while time.time() < deadline:
        hot(5000)

def spin_two(deadline):
    while time.time() < deadline:
        hot(5000)

def thread_main(target, deadline, ids):
    ids[target.__name__] = threading.get_native_id()
    target(deadline)

print("ready", flush=True)
sys.stdin.readline()
seconds = float(sys.argv[1])
deadline = time.time() + seconds
if sys.argv[2] == "callers":
    spent = {"a": 0.0, "b": 0.0}
    while time.time() < deadline:
        caller_a(spent)
        caller_b(spent)
    print(json.dumps(spent), flush=True)
    sys.stdin.readline()  # alive until its samples are named
    sys.exit()
else:
    ids = {}
    threads = [threading.Thread(target=thread_main, args=(f, deadline, ids))
               for f in (spin_one, spin_two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(ids), flush=True)
sys.stdin.readline()  # alive until its samples are named
"""
)


@pytest.fixture(scope="module")
def sampler() -> Iterator[Any]:
    require_ebpf()
    from fleetprof.node_agent.samplers import SamplerOptions
    from fleetprof.node_agent.samplers.cpu import CpuSampler

    require(kernel_offsets() is not None, "the kernel has no BTF for task_struct")
    cpu = CpuSampler(SamplerOptions(frequency=99))
    yield cpu
    cpu.close()


def profile(
    sampler: Any, python: Path, tmp_path: Path, mode: str, seconds: float = 4.0
) -> tuple[list[tuple[int, list[Frame], int]], dict[str, Any], Any]:
    """Run the HOT program under `python`, sampled from its start signal to its end: its
    (tid, frames root first, weight) rows, what it printed, and the symbolizer."""
    from fleetprof.node_agent.batch import BatchBuilder
    from fleetprof.node_agent.samplers import Drain
    from fleetprof.node_agent.symbolize.symbolizer import Symbolizer

    script = tmp_path / "hot.py"
    script.write_text(HOT)
    program = subprocess.Popen(
        [str(python), str(script), str(seconds), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert program.stdout is not None and program.stdin is not None
        assert program.stdout.readline() == "ready\n"
        symbolizer = Symbolizer()
        symbolizer.remember(program.pid)  # the agent does this at exec and mmap
        sampler.drain()  # start empty
        program.stdin.write("go\n")
        program.stdin.flush()
        said = json.loads(program.stdout.readline())
        drained = sampler.drain()
        mine = [s for s in drained.samples if s.pid == program.pid]
        batch = BatchBuilder(symbolizer).build(sampler, datetime.now(UTC), Drain(mine))
    finally:
        program.kill()
        program.wait()
    rows = []
    for tid, stack_id, weight in zip(
        batch.samples["tid"].to_pylist(),
        batch.samples["stack_id"].to_pylist(),
        batch.samples["weight"].to_pylist(),
        strict=True,
    ):
        row = batch.stacks[stack_id]
        frames = [Frame(*f) for f in zip(row.frames, row.modules, row.kinds, strict=True)]
        rows.append((tid, frames, weight))
    return rows, said, symbolizer


def start_ready(python: Path, script: Path, source: str, *args: str) -> subprocess.Popen[str]:
    """Run `source` as `script` under `python`, once it said "ready" (stdin, stdout piped)."""
    script.write_text(source)
    program = subprocess.Popen(
        [str(python), str(script), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert program.stdout is not None and program.stdin is not None
    if program.stdout.readline() != "ready\n":
        program.kill()
        program.wait()
        raise AssertionError(f"{script} did not start")
    return program


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} in {timeout_s} s"
        time.sleep(0.05)


def two_drains(agent: Any) -> None:
    drains = agent.stats["drains"]
    wait_for(lambda: agent.stats["drains"] >= drains + 2, "two drains")


def python_leaf(frames: list[Frame]) -> Frame | None:
    """The innermost Python frame of a stack (root first)."""
    return next((f for f in reversed(frames) if f.kind == "python"), None)


VERSIONS = [
    pytest.param(lambda: pyenv(10), id="3.10"),
    pytest.param(lambda: pyenv(11), id="3.11"),
    pytest.param(lambda: DEBIAN_PYTHON, id="3.11-debian"),
    pytest.param(lambda: pyenv(12), id="3.12"),
    pytest.param(lambda: pyenv(13), id="3.13"),
    pytest.param(lambda: pyenv(9), id="3.9"),
]


@pytest.mark.parametrize("python", VERSIONS)
def test_hot_function_and_its_callers_in_the_runtimes_own_split(
    sampler: Any, python: Any, tmp_path: Path
) -> None:
    rows, spent, symbolizer = profile(sampler, python(), tmp_path, "callers", seconds=12.0)
    total = sum(weight for _, _, weight in rows)
    # 12 s at 99 Hz: 1200 on an idle core; the split's binomial spread is ~3.5 points at 150.
    assert total >= 150, rows
    hot = {"hot.hot"}
    named = sum(w for _, frames, w in rows if (leaf := python_leaf(frames)) and leaf.name in hot)
    assert named >= 0.85 * total, (named, total, Counter(str(python_leaf(f)) for _, f, _ in rows))
    # The hot frame is at a line of hot() (lines 4-8 of the program), mostly its loop.
    lines = Counter(
        python_leaf(frames).module.rsplit(":", 1)[1]  # type: ignore[union-attr]
        for _, frames, _ in rows
        if python_leaf(frames) is not None and python_leaf(frames).name in hot  # type: ignore[union-attr]
    )
    assert set(lines) <= {"4", "5", "6", "7", "8"} and lines.keys() & {"6", "7"}, lines
    by_caller = Counter()
    for _, frames, weight in rows:
        names = [f.name for f in frames if f.kind == "python"]
        if names[-2:] in (["hot.caller_a", "hot.hot"], ["hot.caller_b", "hot.hot"]):
            by_caller[names[-2]] += weight
            assert names[0] == "hot.<module>", names  # nothing between dropped
    measured = by_caller["hot.caller_a"] / (by_caller["hot.caller_a"] + by_caller["hot.caller_b"])
    said = spent["a"] / (spent["a"] + spent["b"])
    assert abs(measured - said) <= 0.06, (by_caller, spent)
    assert symbolizer.python.stats["code_unreadable"] == 0, symbolizer.python.stats


@pytest.mark.parametrize("python", [VERSIONS[0], VERSIONS[2], VERSIONS[4]])
def test_each_thread_has_its_own_frames(sampler: Any, python: Any, tmp_path: Path) -> None:
    rows, ids, _ = profile(sampler, python(), tmp_path, "threads", seconds=3.0)
    own = Counter()
    for tid, frames, weight in rows:
        names = {f.name for f in frames if f.kind == "python"}
        for function, thread_id in ids.items():
            other = next(name for name in ids if name != function)
            if tid == thread_id and names:
                assert f"hot.{other}" not in names, (function, names)
                # Samples of its start or end (threading's own frames alone) aside.
                if "hot.thread_main" in names:
                    assert f"hot.{function}" in names, names
                    own[function] += weight
    # Both threads ran (the GIL shares the CPU between them), each named as itself.
    assert min(own.values(), default=0) >= 10 and len(own) == 2, own


def test_unsupported_version_keeps_native_stacks(sampler: Any, tmp_path: Path) -> None:
    rows, _, symbolizer = profile(sampler, pyenv(8), tmp_path, "callers", seconds=1.5)
    assert symbolizer.python.stats["unsupported"] == 1
    assert sum(w for _, _, w in rows) >= 20  # 1.5 s at 99 Hz, on a loaded machine too
    assert all(f.kind != "python" for _, frames, _ in rows for f in frames)
    assert any(f.kind == "native" for _, frames, _ in rows for f in frames)


def test_forked_child_is_walked_with_its_parents_layout(sampler: Any, tmp_path: Path) -> None:
    """A child forked by a Python process (multiprocessing, PySpark's workers) that the
    agent never saw is walked from its first sample, and named from its parent when it
    exited before the agent looked at it."""
    from fleetprof.node_agent.batch import BatchBuilder
    from fleetprof.node_agent.samplers import Drain
    from fleetprof.node_agent.symbolize.symbolizer import Symbolizer

    script = tmp_path / "forks.py"
    script.write_text(
        HOT.split('print("ready"')[0]
        + "import os\nprint('ready', flush=True)\nsys.stdin.readline()\n"
        + "child = os.fork()\nif child == 0:\n    spin_one(time.time() + 2)\n    os._exit(0)\n"
        + "print(child, flush=True)\nos.waitpid(child, 0)\nsys.stdin.readline()\n"
    )
    program = subprocess.Popen(
        [str(DEBIAN_PYTHON), str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert program.stdout is not None and program.stdin is not None
        assert program.stdout.readline() == "ready\n"
        symbolizer = Symbolizer()
        symbolizer.remember(program.pid)
        sampler.drain()
        program.stdin.write("go\n")
        program.stdin.flush()
        child = int(program.stdout.readline())
        wait_for(lambda: not Path(f"/proc/{child}").exists(), "the child's exit", 60)
        drained = sampler.drain()
        samples = [s for s in drained.samples if s.pid == child]
        # Named while the parent lives: the child is gone, the agent never saw it.
        batch = BatchBuilder(symbolizer).build(sampler, datetime.now(UTC), Drain(samples))
    finally:
        program.kill()
        program.wait()
    total = sum(s.weight for s in samples)
    walked = sum(s.weight for s in samples if s.python_stack)
    assert total >= 20 and walked >= 0.9 * total, Drain(samples)
    named = sum(
        weight
        for stack_id, weight in zip(
            batch.samples["stack_id"].to_pylist(), batch.samples["weight"].to_pylist(), strict=True
        )
        if "forks.spin_one" in batch.stacks[stack_id].frames
    )
    stacks = [batch.stacks[i].frames for i in batch.samples["stack_id"].to_pylist()]
    assert named >= 0.9 * total, (named, total, stacks)
    assert symbolizer.python.stats["code_from_parent"] >= 2, symbolizer.python.stats


# A parent that forks workers (multiprocessing's 'fork' start method, as PySpark's daemon,
# gunicorn and celery's prefork pool do) burning CPU in a function of its own module.
FORKS = (
    """
import json, multiprocessing, os, sys, time
"""
    + HOT_FUNCTION
    + """
def work(seconds, queue, leave):
    made = compile("def made_here(): pass", "<child>", "exec")  # code only the child has
    queue.put(json.dumps({"pid": os.getpid(), "hot": id(hot.__code__), "made": id(made)}))
    deadline = time.time() + 10 * seconds  # CPU seconds, on a loaded machine too
    while time.process_time() < seconds and time.time() < deadline:
        hot(5000)
    queue.put("done")
    leave.wait()  # until the test has read its memory

if __name__ == "__main__":
    context = multiprocessing.get_context("fork")
    queues, leave = [context.Queue() for _ in range(2)], context.Event()
    workers = [context.Process(target=work, args=(float(sys.argv[1]), q, leave)) for q in queues]
    started = time.time()
    while time.time() < started + 0.3:  # sampled: the agent knows the parent before it forks
        hot(5000)
    print("ready", flush=True)
    sys.stdin.readline()
    for w in workers:
        w.start()
    print(json.dumps([json.loads(q.get()) for q in queues]), flush=True)
    for q in queues:
        assert q.get() == "done"
    sys.stdin.readline()
    leave.set()
    for w in workers:
        w.join()
    print("joined", flush=True)
    sys.stdin.readline()  # alive until its children's samples are named
"""
)


def test_code_objects_named_and_a_reused_address_never_misnamed() -> None:
    """This very interpreter (the venv's CPython) read through /proc/self/mem."""
    from fleetprof.node_agent.symbolize.elf import ElfCache
    from fleetprof.node_agent.symbolize.process import take_snapshot

    targets = PythonTargets()
    processes = PythonProcesses(targets)
    snapshot = take_snapshot(os.getpid(), ElfCache())
    assert snapshot is not None
    processes.observe(snapshot)
    if sys.version_info[:2] in ((3, 9), (3, 10), (3, 11), (3, 12), (3, 13)):
        assert os.getpid() in targets

    def sample_me() -> None:
        pass

    code = sample_me.__code__
    layout = LAYOUTS.get(sys.version_info[1])
    if layout is None:
        pytest.skip("the test's own interpreter has no table layout")
    with open(f"/proc/{os.getpid()}/mem", "rb", buffering=0) as mem:
        mem.seek(id(code))
        tag = code_tag(layout, mem.read(256))
    [(frame, entry)] = processes.frames(os.getpid(), [(id(code), 0x80000000, tag)])
    assert entry and frame.kind == "python"
    assert frame.name.startswith("test_python.test_code_objects_named_and_a_reused_address")
    assert frame.name.endswith(".<locals>.sample_me")
    assert frame.module == f"{__file__}:{code.co_firstlineno}"
    # Another code object at that address since the sample: its tag differs.
    [(other, _)] = processes.frames(os.getpid(), [(id(code), 0, tag ^ 1)])
    assert other.name == f"[python code 0x{id(code):x}]"
    # A pointer read from memory reused since can be anything, past what pread takes.
    wild = 0xFFFF_8000_0000_0000
    [(unread, _)] = processes.frames(os.getpid(), [(wild, 0, tag)])
    assert unread.name == f"[python code 0x{wild:x}]"
    processes.forget(os.getpid())
    assert os.getpid() not in targets


def test_exited_fork_has_its_code_named_from_its_parent(tmp_path: Path) -> None:
    """A forked worker's code read once it exited (its last samples drain after its
    exit): code from before the fork is read from its parent, code it made itself is not
    misnamed."""
    from fleetprof.node_agent.symbolize.elf import ElfCache
    from fleetprof.node_agent.symbolize.process import take_snapshot

    script = tmp_path / "forks.py"
    program = start_ready(DEBIAN_PYTHON, script, FORKS, "0")
    assert program.stdout is not None and program.stdin is not None
    processes = PythonProcesses(PythonTargets())
    try:
        program.stdin.write("go\n")
        program.stdin.flush()
        workers = json.loads(program.stdout.readline())
        layout = LAYOUTS[11]
        tags = {}
        for worker in workers:
            snapshot = take_snapshot(worker["pid"], ElfCache())
            assert snapshot is not None and snapshot.ppid == program.pid
            processes.observe(snapshot)
            with open(f"/proc/{worker['pid']}/mem", "rb", buffering=0) as mem:
                for code in ("hot", "made"):
                    mem.seek(worker[code])
                    tags[worker["pid"], code] = code_tag(layout, mem.read(256))
        program.stdin.write("exit\n")
        program.stdin.flush()
        assert program.stdout.readline() == "joined\n"
        for worker in workers:
            pid = worker["pid"]
            [(hot, _)] = processes.frames(pid, [(worker["hot"], 0, tags[pid, "hot"])])
            assert hot.name == "forks.hot" and hot.module == f"{script}:4", hot
            [(made, _)] = processes.frames(pid, [(worker["made"], 0, tags[pid, "made"])])
            assert made.name == f"[python code 0x{worker['made']:x}]", made
        assert processes.stats["code_from_parent"] == 2, processes.stats
    finally:
        program.kill()
        program.wait()


def test_merge_replaces_eval_frames_in_order_and_keeps_c_frames() -> None:
    processes = PythonProcesses(PythonTargets())

    def native(name: str) -> Frame:
        return Frame(name, "libpython3.11.so", "native")

    def py(name: str) -> Frame:
        return Frame(name, "app.py:1", "python")

    # 3.11+: one eval call runs several Python frames, up to its entry frame.
    python = [(py("app.leaf"), False), (py("app.mid"), True), (py("app.outer"), False),
              (py("app.main"), True)]  # fmt: skip
    full = [native("PyLong_FromLong"), native("_PyEval_EvalFrameDefault"),
            native("cfunc_call"), native("sorted_impl"), native("_PyEval_EvalFrameDefault"),
            native("Py_RunMain"), native("main")]  # fmt: skip
    assert [f.name for f in processes.merge(full, python)] == [
        "PyLong_FromLong", "app.leaf", "app.mid", "cfunc_call", "sorted_impl", "app.outer",
        "app.main", "Py_RunMain", "main",
    ]  # fmt: skip
    # Cut native stacks: the Python frames are all kept, below what native part exists.
    cut = [native("PyLong_FromLong"), native("_PyEval_EvalFrameDefault.cold"), native("main")]
    assert [f.name for f in processes.merge(cut, python)] == [
        "PyLong_FromLong", "app.leaf", "app.mid", "app.outer", "app.main", "main",
    ]  # fmt: skip
    assert [f.name for f in processes.merge([native("PyLong_FromLong")], python)] == [
        "PyLong_FromLong", "app.leaf", "app.mid", "app.outer", "app.main",
    ]  # fmt: skip
    assert processes.stats["merged"] == 1 and processes.stats["cut_native"] == 2


def test_line_tables_of_every_version() -> None:
    """Each supported version's line table format, decoded as the runtime decodes it."""
    from fleetprof.node_agent.symbolize.python import CodeInfo

    probe = (
        "import dis, json, sys\n"
        "def f(x):\n    y = x + 1\n    if y:\n        z = [y * 2 for _ in x]\n    return z\n"
        "c = f.__code__\n"
        "table = getattr(c, 'co_linetable', None) or c.co_lnotab\n"
        "if sys.version_info >= (3, 10):\n"
        "    lines = [(o, l) for s, e, l in c.co_lines() for o in range(s, e, 2)]\n"
        "else:\n"
        "    lines = list(dis.findlinestarts(c))\n"
        "print(json.dumps({'first': c.co_firstlineno, 'table': table.hex(), 'lines': lines}))\n"
    )
    for minor in (9, 10, 11, 12, 13):
        run = subprocess.run([pyenv(minor), "-c", probe], capture_output=True, text=True)
        out = json.loads(run.stdout)
        code = CodeInfo("f", "<string>", out["first"], bytes.fromhex(out["table"]))
        checked = 0
        for offset, line in out["lines"]:
            if line is not None:
                instr = offset if minor <= 9 else offset // 2  # bytes, then code units
                assert line_of(minor, code, instr) == line, (minor, offset, line)
                checked += 1
        assert checked >= 4, (minor, out)


def test_module_names() -> None:
    assert module_name("/usr/lib/python3.11/json/decoder.py") == "json.decoder"
    worker = "/app/venv/lib/python3.12/site-packages/pyspark/worker.py"
    assert module_name(worker) == "pyspark.worker"
    assert module_name("/srv/app/jobs/__init__.py") == "jobs"
    assert module_name("<frozen importlib._bootstrap>") == "importlib._bootstrap"
    assert module_name("/tmp/x/hot.py") == "hot"
    # PySpark's workers import pyspark from the zip archive Spark puts on their path.
    zipped = "/venv/lib/python3.11/site-packages/pyspark/python/lib/pyspark.zip/pyspark/worker.py"
    assert module_name(zipped) == "pyspark.worker"
    assert module_name("/opt/app.pyz/service/__init__.py") == "service"


def test_debug_offsets_of_313_are_read_from_the_binary() -> None:
    from fleetprof.node_agent.symbolize.python import _read_image

    library = pyenv(13).parents[1] / "lib" / "libpython3.13.so.1.0"
    require(library.exists(), "pyenv's 3.13 is not a shared build")
    image = _read_image(str(library))
    assert image is not None and b"_PyRuntime" in image.symbols
    layout = layout_from_debug_offsets(image.runtime_head)
    assert layout is not None and layout.minor == 13
    assert layout_from_debug_offsets(b"\0" * 600) is None


def test_agent_ships_python_frames_to_sql_and_every_format(
    aggregator: Any, running_agent: Any, tmp_path: Path
) -> None:
    """The whole path: the agent finds the interpreter when it starts (no flag), BPF walks
    it, the stacks reach DuckDB with kind python and every flame graph format names them."""
    import gzip

    from fleetprof.cli import main
    from fleetprof.proto.pprof import profile_pb2
    from fleetprof.query.source import AggregatorSource

    agent = running_agent(frequency=99, interval_s=1.0)
    script = tmp_path / "hot.py"
    program = start_ready(DEBIAN_PYTHON, script, HOT, "6", "callers")  # 6 s: 50 samples at load 15
    assert program.stdout is not None and program.stdin is not None
    try:
        # The agent found it at its exec (on a loaded machine its event loop may lag).
        wait_for(lambda: program.pid in TARGETS, "the agent to find the interpreter")
        program.stdin.write("go\n")
        program.stdin.flush()
        assert json.loads(program.stdout.readline())
        two_drains(agent)  # alive until they named its code
    finally:
        program.kill()
        program.wait()
    agent.stop()
    pid_sql = (
        "SELECT pid FROM samples JOIN stacks USING (stack_id) "
        "WHERE list_contains(frames, 'hot.caller_b') GROUP BY pid"
    )
    source = AggregatorSource(aggregator.address)
    try:
        with source.stream(pid_sql) as reader:
            pids = reader.read_all().column("pid").to_pylist()
        if len(pids) != 1:
            seen = (
                "SELECT pid, comm, frames, kinds, sum(weight) AS w FROM samples JOIN stacks "
                "USING (stack_id) WHERE comm = 'python3.11' GROUP BY ALL ORDER BY w DESC LIMIT 8"
            )
            with source.stream(seen) as reader:
                pytest.fail(f"no one process named hot.caller_b: {reader.read_all().to_pylist()}")
        [pid] = pids
        shares_sql = f"""
            SELECT sum(weight)::BIGINT AS total,
                   sum(weight) FILTER (WHERE list_contains(kinds, 'python'))::BIGINT AS python,
                   sum(weight) FILTER (WHERE frames[-1] = 'hot.hot'
                       OR list_contains(frames, 'hot.hot'))::BIGINT AS hot
            FROM samples JOIN stacks USING (stack_id) WHERE pid = {pid}"""
        with source.stream(shares_sql) as reader:
            shares = reader.read_all().to_pylist()[0]
    finally:
        source.close()
    assert shares["total"] >= 50 and shares["hot"] >= 0.85 * shares["total"], shares
    for suffix in ("html", "svg", "folded", "speedscope.json", "pb.gz"):
        out = tmp_path / f"cpu.{suffix}"
        argv = ["flamegraph", "--aggregator", aggregator.address, "--pid", str(pid), "-o", str(out)]
        assert main(argv) == 0
        if suffix != "pb.gz":
            assert "hot.caller_a" in out.read_text(), suffix
            continue
        profile = profile_pb2.Profile.FromString(gzip.decompress(out.read_bytes()))
        functions = {
            profile.string_table[f.name]: profile.string_table[f.filename] for f in profile.function
        }
        assert functions["hot.hot"] == str(script)
        lines = {
            line.line
            for location in profile.location
            for line in location.line
            if profile.string_table[profile.function[line.function_id - 1].name] == "hot.hot"
        }
        assert lines & {5, 6}, lines


def test_forked_workers_show_their_frames_through_the_agent(
    aggregator: Any, running_agent: Any, tmp_path: Path
) -> None:
    """multiprocessing's 'fork' workers (no exec, as PySpark's, gunicorn's and celery's):
    each worker's samples reach DuckDB with its own function named, under its caller, as
    kind python: walked from their first sample with their parent's layout, named from
    their own memory, and from their parent's once they exited."""
    from fleetprof.query.source import AggregatorSource

    agent = running_agent(frequency=99, interval_s=1.0)
    program = start_ready(DEBIAN_PYTHON, tmp_path / "forks.py", FORKS, "2")
    assert program.stdout is not None and program.stdin is not None
    try:
        # Known to the agent before it forks (on a loaded machine its event loop may lag).
        wait_for(lambda: program.pid in TARGETS, "the agent to find the parent")
        program.stdin.write("go\n")
        program.stdin.flush()
        workers = [worker["pid"] for worker in json.loads(program.stdout.readline())]
        # The agent saw each worker alive (one it never saw has no native frames).
        wait_for(lambda: all(pid in TARGETS for pid in workers), "the agent to find the workers")
        program.stdin.write("leave when done\n")
        program.stdin.flush()
        assert program.stdout.readline() == "joined\n"
        two_drains(agent)  # the parent alive until they named its workers' code
    finally:
        program.kill()
        program.wait()
    agent.stop()
    sql = f"""
        SELECT pid, sum(weight)::BIGINT AS total,
               coalesce(sum(weight) FILTER (WHERE list_contains(frames, 'forks.hot')
                   AND kinds[list_position(frames, 'forks.hot')] = 'python'), 0)::BIGINT AS hot,
               coalesce(sum(weight) FILTER (WHERE list_position(frames, 'forks.work')
                   < list_position(frames, 'forks.hot')), 0)::BIGINT AS under_work,
               coalesce(sum(weight) FILTER (WHERE len(list_filter(frames,
                   lambda f: f LIKE '[python code 0x%')) > 0), 0)::BIGINT AS unnamed
        FROM samples JOIN stacks USING (stack_id)
        WHERE pid IN ({", ".join(map(str, workers))}) GROUP BY pid"""
    stacks_sql = f"""
        SELECT pid, frames, kinds, sum(weight)::BIGINT AS w FROM samples JOIN stacks
        USING (stack_id) WHERE pid IN ({", ".join(map(str, workers))})
        GROUP BY ALL ORDER BY w DESC LIMIT 6"""
    source = AggregatorSource(aggregator.address)
    try:
        with source.stream(sql) as reader:
            rows = {row["pid"]: row for row in reader.read_all().to_pylist()}
        with source.stream(stacks_sql) as reader:
            # What a failure shows.
            stacks = "\n".join(
                f"{row['pid']} {row['w']}: {';'.join(row['frames'])}"
                for row in reader.read_all().to_pylist()
            )
    finally:
        source.close()
    assert rows.keys() == set(workers), (rows, workers)
    for row in rows.values():
        # 2 CPU seconds at 99 Hz: about 200 (or fewer if it ran out of time).
        assert row["total"] >= 100, (row, stacks)
        assert row["hot"] >= 0.85 * row["total"], (row, stacks)
        assert row["under_work"] == row["hot"], (row, stacks)
        assert row["unnamed"] <= 0.05 * row["total"], (row, stacks)
    stats = agent.symbolizer.python.stats
    assert stats["processes"] >= len(workers), stats
    # What the agent's stop line says of BPF's walks.
    assert agent.python_walks["walked"] >= sum(row["hot"] for row in rows.values())
