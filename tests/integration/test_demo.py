"""`make demo` (fleetprof demo): what a newcomer sees first, run for real (BPF, a JVM)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from fleetprof.cli import main
from fleetprof.workloads import JAVA_SHARES, NATIVE_SHARES
from tests.conftest import require, require_ebpf


def test_demo_names_every_top_function(tmp_path: Path, capsys) -> None:
    require_ebpf()
    require(shutil.which("javac") is not None and shutil.which("gcc") is not None, "no JDK/gcc")
    assert main(["demo", "--out", str(tmp_path), "--seconds", "8"]) == 0
    out = capsys.readouterr().out
    table = out.split("Top functions", 1)[1].split("\n(", 1)[0]
    rows = [line.split() for line in table.splitlines()[3:]]
    assert rows, out
    # only the demo's own processes, each of its hot functions named ...
    assert {row[0] for row in rows} <= {"hotspots", "java"}
    functions = {row[1] for row in rows}
    for name in NATIVE_SHARES:
        assert name in functions, out
    for name in JAVA_SHARES:
        assert f"demo.Hotspots.{name}" in functions, out
    # ... and no JIT code left without its name
    assert not re.search(r"\[jit 0x", out), out
    assert (tmp_path / "flamegraph.html").stat().st_size > 0
