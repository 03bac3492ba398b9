"""The bundled workloads with known hot functions, used by the demo, tests and benchmarks."""

from __future__ import annotations

import subprocess
from importlib import resources
from pathlib import Path

NATIVE_SOURCE = "hotspots.c"
JAVA_SOURCE = "Hotspots.java"
JAVA_MAIN = "demo.Hotspots"
# Hot functions and the share of the workload's CPU each should get.
NATIVE_SHARES = {"compute_alpha": 0.75, "compute_beta": 0.25}
JAVA_SHARES = {"ledgerReconcile": 2 / 3, "ledgerAudit": 1 / 3}


def _source(name: str) -> str:
    return resources.files("fleetprof").joinpath("demo", name).read_text()


def build_native(workdir: Path) -> Path:
    """Compile hotspots.c with frame pointers; returns the binary."""
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / NATIVE_SOURCE
    source.write_text(_source(NATIVE_SOURCE))
    binary = workdir / "hotspots"
    subprocess.run(
        ["gcc", "-O1", "-fno-omit-frame-pointer", "-o", str(binary), str(source), "-lpthread"],
        check=True,
    )
    return binary


def build_java(workdir: Path) -> Path:
    """Compile Hotspots.java; returns the class path."""
    classes = workdir / "classes"
    classes.mkdir(parents=True, exist_ok=True)
    source = workdir / JAVA_SOURCE
    source.write_text(_source(JAVA_SOURCE))
    subprocess.run(["javac", "-d", str(classes), str(source)], check=True)
    return classes


def start_native(
    binary: Path, seconds: float, threads: int = 1, rounds: int = 0
) -> subprocess.Popen[bytes]:
    """Run for `seconds`, or, with rounds > 0, a fixed amount of work per thread."""
    return subprocess.Popen([str(binary), str(seconds), str(threads), str(rounds)])


def start_java(classes: Path, seconds: float, threads: int = 2) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "java",
            "-XX:+PreserveFramePointer",
            "-cp",
            str(classes),
            JAVA_MAIN,
            str(seconds),
            str(threads),
        ]
    )


def write_perf_map(pid: int) -> bool:
    """Ask a JVM (JDK 17+) to write /tmp/perf-PID.map; False if it could not."""
    result = subprocess.run(
        ["jcmd", str(pid), "Compiler.perfmap"], capture_output=True, timeout=30, check=False
    )
    return result.returncode == 0
