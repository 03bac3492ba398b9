"""Profile the bundled workloads end to end on this machine (needs root).

Starts an aggregator on an embedded DuckDB file and a node agent, runs a native program
and a multi-threaded Java program with known hot functions, then writes a flame graph and
prints the top functions by SQL.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HELP = "run the end-to-end demo on this machine"
# Seconds the workloads may run past the profile (they are stopped once the agent's last
# drain has symbolized them: a busy machine may take long), and the JVM's JIT gets before
# its map is read.
TAIL_S = 120.0
JIT_WARM_UP_S = 2.0

TOP_FUNCTIONS_SQL = """
WITH demo(pid, program) AS (VALUES {programs})
SELECT program, frames[-1] AS function, sum(weight) AS samples,
       round(100 * sum(weight) / sum(sum(weight)) OVER (), 1) AS percent
FROM samples JOIN stacks USING (stack_id) JOIN demo USING (pid)
WHERE event = 'cpu'
GROUP BY ALL ORDER BY samples DESC LIMIT 12
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="fleetprof-demo", metavar="DIR", help="output folder")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to profile")
    parser.add_argument(
        "--frequency", type=int, default=99, metavar="HZ", help="cpu samples/s per CPU"
    )


def run(args: argparse.Namespace) -> int:
    # The demo runs every part: imported only when it runs.
    from fleetprof import workloads
    from fleetprof.aggregator.server import Aggregator
    from fleetprof.node_agent.agent import Agent, AgentConfig
    from fleetprof.node_agent.samplers import SamplerOptions
    from fleetprof.query.filters import SampleFilter
    from fleetprof.query.flame import load_flame
    from fleetprof.query.render import RenderOptions, renderer_for
    from fleetprof.query.result_formats import write_table_text
    from fleetprof.query.source import AggregatorSource

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    db = out / "demo.duckdb"
    db.unlink(missing_ok=True)  # each run starts from an empty database
    native = workloads.build_native(out / "build")
    java_classes = workloads.build_java(out / "build")

    aggregator = Aggregator(db, "127.0.0.1:0")
    aggregator.start()
    sampling = SamplerOptions(frequency=args.frequency)
    config = AgentConfig(
        aggregator.address, "demo-node", 5.0, spool_dir=str(out / "spool"), sampling=sampling
    )
    agent = Agent(config)
    stop_agent = threading.Event()
    agent_thread = threading.Thread(target=agent.run, args=(stop_agent,), name="agent")
    agent_thread.start()

    print(f"profiling the workloads for {args.seconds:g} s ...", flush=True)
    started = time.monotonic()
    # They run on past the profile, so the last drain symbolizes them while they live.
    processes = [
        workloads.start_native(native, args.seconds + TAIL_S),
        workloads.start_java(java_classes, args.seconds + TAIL_S),
    ]
    perf_map = None
    try:
        # The agent asks each JVM for its perf map once it sees it in a drain's samples:
        # the first drain's JIT frames would have no map yet. Written now, once the JIT
        # has compiled the hot methods, it is there for the first drain (and read again
        # by the agent's own refreshes after).
        time.sleep(min(JIT_WARM_UP_S, args.seconds))
        perf_map = _write_perf_map(processes[1].pid)
        time.sleep(max(0.0, args.seconds - 1 - (time.monotonic() - started)))
        _write_perf_map(processes[1].pid)  # and anew for the last drain's samples
        time.sleep(max(0.0, args.seconds - (time.monotonic() - started)))
    finally:
        stop_agent.set()
        agent_thread.join()
        for process in processes:
            process.terminate()
            process.wait()
        if perf_map is not None:
            perf_map.unlink(missing_ok=True)  # ours: the JVM would leave it in /tmp

    source = AggregatorSource(aggregator.address)
    try:
        tree = load_flame(source, SampleFilter(pids=tuple(p.pid for p in processes)))
        html = out / "flamegraph.html"
        folded = out / "flamegraph.folded"
        for path in (html, folded):
            options = RenderOptions(title="fleetprof demo: on-CPU", event="cpu", unit="samples")
            with open(path, "wb") as fh:
                renderer_for(path).render(tree, options, fh)
        print("\nTop functions (SQL over the samples and stacks views):")
        # the agent samples the whole machine: the demo's own processes only, by program
        # (a sample's comm is its thread's name: ledger-worker-0, C2 CompilerThre...)
        native_pid, java_pid = (p.pid for p in processes)
        programs = f"({native_pid}, 'hotspots'), ({java_pid}, 'java')"
        with source.stream(TOP_FUNCTIONS_SQL.format(programs=programs)) as reader:
            write_table_text(reader, sys.stdout.buffer)
        sys.stdout.flush()
    finally:
        source.close()
        aggregator.stop()
    print(f"\nflame graph: {html}\nfolded stacks: {folded}\ndatabase: {db}")
    # The venv's command, which is what a reader can type (a clone's is not on the PATH).
    command = Path(sys.executable).with_name("fleetprof")
    command_text = str(command) if command.exists() else "fleetprof"
    print(f'query it: {command_text} query --db {db} "SELECT count(*) FROM samples"')
    return 0


def _write_perf_map(pid: int) -> Path | None:
    """Have the JVM write /tmp/perf-PID.map (JDK 17+'s `jcmd PID Compiler.perfmap`)."""
    jcmd = shutil.which("jcmd")
    if jcmd is None:
        return None
    done = subprocess.run(
        [jcmd, str(pid), "Compiler.perfmap"], capture_output=True, timeout=30, check=False
    )
    return Path(f"/tmp/perf-{pid}.map") if done.returncode == 0 else None
