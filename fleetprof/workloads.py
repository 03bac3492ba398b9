"""The bundled workloads with known hot functions, used by the demo, tests and benchmarks."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

NATIVE_SOURCE = "hotspots.c"
JAVA_SOURCE = "Hotspots.java"
JAVA_MAIN = "demo.Hotspots"
# Programs that wait (lock, io, offcpu): waits.c's header says how to run them.
WAITS_SOURCE = "waits.c"
CONTENTION_SOURCE = "Contention.java"
CONTENTION_MAIN = "demo.Contention"
# A deep recursion spinning at its leaf (deep user stacks): recursion.c's header.
RECURSION_SOURCE = "recursion.c"
# Hot functions and the share of the workload's CPU each should get.
NATIVE_SHARES = {"compute_alpha": 0.75, "compute_beta": 0.25}
JAVA_SHARES = {"ledgerReconcile": 2 / 3, "ledgerAudit": 1 / 3}


def _source(name: str) -> str:
    return resources.files("fleetprof").joinpath("demo", name).read_text()


def build_native(workdir: Path, name: str = NATIVE_SOURCE, frame_pointers: bool = True) -> Path:
    """Compile a bundled C program, with frame pointers (-O1) or as distributions build
    (-O2, none); returns the binary."""
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / name
    source.write_text(_source(name))
    binary = workdir / source.stem
    flags = ["-O1", "-fno-omit-frame-pointer"] if frame_pointers else ["-O2"]
    subprocess.run(["gcc", *flags, "-o", str(binary), str(source), "-lpthread"], check=True)
    return binary


def build_java(workdir: Path, name: str = JAVA_SOURCE) -> Path:
    """Compile a bundled Java program; returns the class path."""
    classes = workdir / "classes"
    classes.mkdir(parents=True, exist_ok=True)
    source = workdir / name
    source.write_text(_source(name))
    subprocess.run(["javac", "-d", str(classes), str(source)], check=True)
    return classes


def start_native(
    binary: Path, seconds: float, threads: int = 1, rounds: int = 0
) -> subprocess.Popen[bytes]:
    """Run for `seconds`, or, with rounds > 0, a fixed amount of work per thread."""
    return subprocess.Popen([str(binary), str(seconds), str(threads), str(rounds)])


def start_java(
    classes: Path,
    seconds: float,
    threads: int = 2,
    options: Sequence[str] = ("-XX:+PreserveFramePointer",),
    main: str = JAVA_MAIN,
    arguments: Sequence[str] = (),
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """Run Hotspots.java (or another `main` class taking SECONDS THREADS, then
    `arguments`) with these JVM options (frame pointers kept, by default)."""
    command = ["java", *options, "-cp", str(classes), main, str(seconds), str(threads)]
    command += arguments
    return subprocess.Popen(command, **popen)
