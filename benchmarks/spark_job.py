"""A per-job profile of a real Spark job: PySpark in local mode on Java 17, no JVM agent.

Starts an aggregator and a node agent (99 Hz), runs a shuffle-heavy Spark SQL job (a
group-by over many keys, a shuffled join, a global sort) in a local[2] Spark whose driver
JVM runs with -XX:+PreserveFramePointer and nothing else, then writes the job's flame graph
(its JVM, its time) and prints what it shows: how much of the CPU is in Java frames, Spark's
own hottest frames, what stayed unresolved. The agent attaches to the JVM by itself. Each
round also maps an RDD through a Python function, which PySpark runs in its Python worker
processes: their Python frames (docs/python.md) are counted apart.

Needs pyspark (4.x) and Java 17 (JAVA_HOME, else /usr/lib/jvm/java-17-openjdk-amd64).
Run as root: .venv/bin/python benchmarks/spark_job.py [--seconds 30] [--rows N] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fleetprof.aggregator.server import Aggregator
from fleetprof.node_agent.agent import Agent, AgentConfig
from fleetprof.node_agent.samplers import SamplerOptions
from fleetprof.query.filters import SampleFilter
from fleetprof.query.flame import load_flame
from fleetprof.query.render import RenderOptions, renderer_for
from fleetprof.query.source import AggregatorSource

JAVA_17 = "/usr/lib/jvm/java-17-openjdk-amd64"
INTERVAL_S = 2.0

# Inclusive samples of Spark's own frames in the job's stacks (a frame counted once a stack).
SPARK_FRAMES_SQL = """
SELECT f AS frame, sum(weight)::BIGINT AS samples
FROM samples JOIN stacks USING (stack_id), unnest(list_distinct(frames)) AS t(f)
WHERE {where} AND f LIKE 'org.apache.spark.%'
GROUP BY f ORDER BY samples DESC, frame LIMIT {limit}
"""
# Samples by what the stack holds: Java frames at all; Spark's; a leaf left unresolved.
SHARES_SQL = """
SELECT sum(weight)::BIGINT AS samples,
       coalesce(sum(weight) FILTER (
           WHERE list_has_any(kinds, ['jit', 'inlined', 'interpreted'])
       ), 0)::BIGINT AS java,
       coalesce(sum(weight) FILTER (WHERE list_has_any(kinds, ['inlined'])), 0)::BIGINT AS inlined,
       coalesce(sum(weight) FILTER (
           WHERE len(list_filter(frames, lambda f: f LIKE 'org.apache.spark.%')) > 0
       ), 0)::BIGINT AS spark,
       coalesce(sum(weight) FILTER (WHERE frames[-1] LIKE '[jit 0x%'), 0)::BIGINT AS unresolved_leaf
FROM samples JOIN stacks USING (stack_id) WHERE {where}
"""


# Python frames of PySpark's worker processes in the job's time: pyspark's own and the
# job's Python function.
PYTHON_SQL = """
SELECT coalesce(sum(weight), 0)::BIGINT AS python_samples,
       coalesce(sum(weight) FILTER (
           WHERE list_contains(frames, 'spark_job.python_stage.<locals>.score')
       ), 0)::BIGINT AS score,
       count(DISTINCT pid)::BIGINT AS python_processes,
       list_distinct(flatten(list(list_filter(frames, lambda f: f LIKE 'pyspark.%'))))
           AS pyspark_frames
FROM samples JOIN stacks USING (stack_id)
WHERE {where} AND list_contains(kinds, 'python')
  AND len(list_filter(frames, lambda f: f LIKE 'pyspark.worker.%')) > 0
"""


def python_stage(spark: Any, rows: int) -> int:
    def score(value: int) -> int:
        """Python work for each RDD element, done in PySpark's Python workers (a nested
        function: pickled by value, as the workers cannot import this module)."""
        total = 0
        for i in range(200):
            total += (value * i) % 7
        return total

    return spark.sparkContext.parallelize(range(rows // 50), 4).map(score).sum()


def shuffle_job(spark: Any, rows: int) -> int:
    """Group 100k keys, join them to a dimension through a shuffle, sort globally."""
    from pyspark.sql import functions as F

    facts = spark.range(rows).select(
        (F.col("id") * 7919 % 100_003).alias("key"), (F.col("id") % 1000).alias("amount")
    )
    totals = facts.groupBy("key").agg(F.sum("amount").alias("total"), F.count("*").alias("n"))
    regions = spark.range(100_003).select(F.col("id").alias("key"), (F.col("id") % 17).alias("r"))
    joined = totals.join(regions, "key").orderBy(F.col("total").desc(), "key")
    return len(joined.limit(10).collect()) + joined.groupBy("r").count().count()


def _start_session(builder: Any) -> Any:
    """The session; its Java gateway started once more if it exited before giving its port
    (seen once in CI; 120 short JVMs attached to by the agent at 99 Hz all exited 0, so not
    the agent's signals: a start-up failure of spark-submit, whose stderr it printed)."""
    from pyspark.errors import PySparkRuntimeError

    try:
        return builder.getOrCreate()
    except PySparkRuntimeError as exc:
        if exc.getCondition() != "JAVA_GATEWAY_EXITED":
            raise
        print(f"spark_job: {exc}; starting the gateway again", file=sys.stderr)
        return builder.getOrCreate()


def run_job(out: Path, seconds: float, rows: int) -> dict[str, Any]:
    """Profile the job for about `seconds` of rounds; the summary, with the job's pid."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("JAVA_HOME", JAVA_17)
    out.mkdir(parents=True, exist_ok=True)
    aggregator = Aggregator(out / "spark.duckdb", "127.0.0.1:0")
    aggregator.start()
    agent = Agent(
        AgentConfig(
            aggregator.address,
            "spark-node",
            INTERVAL_S,
            spool_dir=str(out / "spool"),
            sampling=SamplerOptions(frequency=99),
        )
    )
    stop = threading.Event()
    agent_thread = threading.Thread(target=agent.run, args=(stop,), name="agent")
    agent_thread.start()
    try:
        spark = _start_session(
            SparkSession.builder.master("local[2]")
            .appName("fleetprof-shuffle")
            .config("spark.driver.extraJavaOptions", "-XX:+PreserveFramePointer")
            .config("spark.sql.shuffle.partitions", "8")
            .config("spark.sql.autoBroadcastJoinThreshold", "-1")  # a real shuffled join
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
        )
        pid = spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid()
        started = datetime.now(UTC)
        rounds, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            shuffle_job(spark, rows)
            python_stage(spark, rows)
            rounds += 1
        finished = datetime.now(UTC)
        # Python code objects are named from the live workers (docs/python.md): keep them
        # until two drains after the job (a drain can take long on a loaded machine).
        drains, waited = agent.stats["drains"], time.monotonic() + 300
        while agent.stats["drains"] < drains + 2 and time.monotonic() < waited:
            time.sleep(0.1)
        named = datetime.now(UTC)  # samples are stamped when drained
        spark.stop()
    finally:
        stop.set()
        agent_thread.join()
    # The job: its JVM, from its start to the end of the interval holding its last sample.
    job = SampleFilter(pids=(pid,), since=started, until=finished + timedelta(seconds=INTERVAL_S))
    window = SampleFilter(since=started, until=named + timedelta(seconds=INTERVAL_S))
    source = AggregatorSource(aggregator.address)
    try:
        tree = load_flame(source, job)
        for path in (out / "spark-job.html", out / "spark-job.folded"):
            options = RenderOptions(title="Spark shuffle job: on-CPU", event="cpu", unit="samples")
            with open(path, "wb") as fh:
                renderer_for(path).render(tree, options, fh)
        summary = {
            "pid": pid,
            "rounds": rounds,
            "seconds": (finished - started).total_seconds(),
            **_rows(source, SHARES_SQL.format(where=job.where()))[0],
            "spark_frames": _rows(source, SPARK_FRAMES_SQL.format(where=job.where(), limit=15)),
            "python": _rows(source, PYTHON_SQL.format(where=window.where()))[0],
            "process": _rows(source, f"SELECT * FROM processes WHERE pid = {pid} ORDER BY ts")[-1],
            "attaches": agent.jvms.stats["attaches"],
            # What the agent holds of the JVM's code cache (symbolize/hotspot.py).
            "code_cache_metadata": code_cache_metadata(agent, pid),
        }
    finally:
        source.close()
        aggregator.stop()
    return summary


def code_cache_metadata(agent: Agent, pid: int) -> dict[str, int]:
    """The nmethods and methods the agent read from the JVM's memory, and their bytes."""
    process = agent.symbolizer.hotspot.process_of(pid)
    if process is None:
        return {}
    return {**process.held(), "bytes": deep_size(process)}


def deep_size(root: object) -> int:
    """Bytes of root and every object it reaches (each counted once)."""
    seen: set[int] = set()
    stack, total = [root], 0
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, type):
            continue
        seen.add(id(item))
        total += sys.getsizeof(item)
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
        elif hasattr(item, "__dict__"):
            stack.append(vars(item))
        elif hasattr(item, "__slots__"):
            stack.extend(getattr(item, name, None) for name in item.__slots__)
    return total


def _rows(source: AggregatorSource, sql: str) -> list[dict[str, Any]]:
    with source.stream(sql) as reader:
        return reader.read_all().to_pylist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to run rounds")
    parser.add_argument("--rows", type=int, default=5_000_000, help="rows per round")
    parser.add_argument("--out", type=Path, default=Path("spark-profile"))
    args = parser.parse_args()
    s = run_job(args.out, args.seconds, args.rows)
    total = s["samples"]
    print(f"Spark driver JVM {s['pid']}: {s['rounds']} rounds in {s['seconds']:.0f} s")
    print(
        f"{total} samples: {s['java'] / total:.0%} with Java frames, {s['spark'] / total:.0%} "
        f"under Spark's own, {s['unresolved_leaf'] / total:.1%} with an unresolved JIT leaf"
    )
    process = s["process"]
    print(
        f"process: frame pointers {process['frame_pointers']}, attach {process['attach']!r}, "
        f"{process['perf_map_entries']} JIT symbols ({s['attaches']} attaches)"
    )
    metadata = s["code_cache_metadata"]
    print(
        f"{s['inlined'] / total:.0%} with inlined frames; code cache metadata held: "
        f"{metadata.get('nmethods', 0)} nmethods, {metadata.get('methods', 0)} methods, "
        f"{metadata.get('bytes', 0) / 1e6:.1f} MB (load average {os.getloadavg()[0]:.1f})"
    )
    python = s["python"]
    print(
        f"PySpark workers: {python['python_samples']} samples with Python frames in "
        f"{python['python_processes']} processes, {python['score']} in the job's score()"
    )
    print("Spark's hottest frames (inclusive samples):")
    for row in s["spark_frames"]:
        print(f"  {row['samples']:6d}  {row['frame']}")
    print(f"flame graph: {args.out / 'spark-job.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
