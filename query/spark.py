"""Apache Spark SQL over the fleetprof lake, for lakes beyond one machine (extra `[spark]`).

The aggregators seal closed hours into the lake as Parquet (proto/lake.py); Spark reads the
same files wherever they are mounted (a local path, `s3a://`, `abfss://`, ...):

    from pyspark.sql import SparkSession
    from fleetprof.query import spark as fleetprof_spark

    spark = SparkSession.builder.appName("profiles").getOrCreate()
    fleetprof_spark.register_views(spark, "s3a://profiles/lake")
    spark.sql("SELECT job, sum(weight) FROM samples WHERE event = 'cpu' GROUP BY job").show()
    lines = fleetprof_spark.folded(spark, event="cpu", jobs=["etl-7"], since=..., until=...)
    open("etl-7.folded", "w").write("".join(lines))  # flamegraph.pl, speedscope, fleetprof import

`register_views` makes the temp views `samples`, `stacks` (one row per stack_id),
`processes`, `io_latency` and `frames`, with the columns of the aggregator's SQL views;
`folded` gives the lines `fleetprof flamegraph -o x.folded` writes for the same selection.
Samples files sealed before events were split (io/block, lock/wait) are read as they are,
until their aggregator rewrites them (docs/events.md "Older data").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleetprof.proto import lake as layout
from fleetprof.query.filters import SampleFilter
from fleetprof.query.render.folded import PROCESS_HEADER

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

# DuckDB's types of the lake's columns, as Spark SQL names them.
_SPARK_TYPES = {
    "TIMESTAMPTZ": "TIMESTAMP",
    "VARCHAR": "STRING",
    "INTEGER": "INT",
    "BIGINT": "BIGINT",
    "BOOLEAN": "BOOLEAN",
    "VARCHAR[]": "ARRAY<STRING>",
}
# As in the folded renderer (query/render/folded.py): ';' separates frames and a newline
# ends a line, so neither may stay in a name.
_SEPARATORS, _REPLACEMENTS = ";\n\r", ":  "

FRAMES_VIEW = """
CREATE OR REPLACE TEMP VIEW frames AS
SELECT stack_id, CAST(f.depth AS INT) AS depth, f.function,
       modules[f.depth] AS module, kinds[f.depth] AS kind
FROM stacks LATERAL VIEW posexplode(frames) f AS depth, function
"""


def spark_schema(table: str) -> str:
    """One lake table's columns as a Spark DDL schema string."""
    return ", ".join(
        f"{column} {_SPARK_TYPES[layout.COLUMN_TYPES[column]]}" for column in layout.COLUMNS[table]
    )


def register_views(spark: SparkSession, lake: str) -> None:
    """Temp views `samples`, `stacks`, `processes`, `io_latency`, `frames` over the lake."""
    from pyspark.sql.utils import AnalysisException

    for table in layout.TABLES:
        try:
            # basePath: the date=/hour= folders are partitions, not part of the data
            frame = (
                spark.read.option("basePath", f"{lake}/{table}")
                .parquet(layout.table_glob(lake, table))
                .select(*layout.COLUMNS[table])
            )
        except AnalysisException as exc:
            if "PATH_NOT_FOUND" not in str(exc) and "does not exist" not in str(exc):
                raise
            frame = spark.createDataFrame([], spark_schema(table))  # nothing sealed yet
        if table == "stacks":  # each aggregator seals the stacks its hours used
            frame = frame.dropDuplicates(["stack_id"])
        frame.createOrReplaceTempView(table)
    spark.sql(FRAMES_VIEW)


def selected_samples(spark: SparkSession, selection: SampleFilter) -> DataFrame:
    """The `samples` rows of a selection (event, time range, nodes, pids, processes, jobs,
    session), as `fleetprof flamegraph` selects them."""
    from pyspark.sql import functions as F

    rows = spark.table("samples").where(F.col("event") == selection.event)
    if selection.since is not None:
        rows = rows.where(F.col("ts") >= F.lit(selection.since))
    if selection.until is not None:
        rows = rows.where(F.col("ts") < F.lit(selection.until))
    if selection.session is not None:
        rows = rows.where(F.col("session_id") == selection.session)
    columns = (
        ("node", selection.nodes),
        ("pid", selection.pids),
        ("comm", selection.comms),
        ("job", selection.jobs),
    )
    for column, values in columns:
        if values:
            rows = rows.where(F.col(column).isin(list(values)))
    return rows


def folded(spark: SparkSession, **selection: Any) -> list[str]:
    """The flame graph of a selection as sorted folded lines (`comm;root;...;leaf weight\n`),
    exactly as `fleetprof flamegraph -o FILE.folded` writes them. `selection` takes the
    fields of fleetprof.query.filters.SampleFilter: event (default "cpu"), since, until
    (aware datetimes), nodes, pids, comms, jobs (sequences), session. Spark merges the
    samples per stack, then per path; only the sorted lines come back to the driver."""
    from pyspark.sql import functions as F

    per_stack = (
        selected_samples(spark, SampleFilter(**selection))
        .groupBy("comm", "stack_id")
        .agg(F.sum("weight").alias("weight"))
    )
    names = F.transform(
        F.concat(F.array("comm"), F.col("frames")),
        lambda name: F.translate(name, _SEPARATORS, _REPLACEMENTS),
    )
    paths = (
        per_stack.join(spark.table("stacks"), "stack_id")
        .groupBy(F.concat_ws(";", names).alias("path"))
        .agg(F.sum("weight").alias("weight"))
        .where(F.col("weight") > 0)
    )
    lines = sorted(f"{row.path} {row.weight}\n" for row in paths.toLocalIterator())
    return [f"{PROCESS_HEADER}\n", *lines] if lines else lines
