"""The aggregator and the query commands never load BCC: it maps LLVM (tens of MB of RSS),
and on a node running the agent, pages of LLVM another process maps stay resident in the
agent after it drops them (bpf_sampler.release_compiler_memory)."""

from __future__ import annotations

import subprocess
import sys


def test_the_aggregator_and_queries_do_not_import_bcc() -> None:
    modules = (
        "fleetprof.commands.aggregator",
        "fleetprof.aggregator.server",
        "fleetprof.commands.query",
        "fleetprof.commands.flamegraph",
        "fleetprof.query.flame",
    )
    script = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('bcc' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
