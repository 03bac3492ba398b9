"""OTLP profiles ingest through the receiver, next to the Arrow path, on one synthetic fleet.

The fleet and its batches are benchmarks/fleet_ingest.py's (Zipf-drawn JVM-like stacks,
one batch of `--batch-rows` rows per node and interval). In each run the same batches go
to a real aggregator process (its own DuckDB file) two ways, each to a fresh database:
- Arrow: IngestBatch streams as the agent's Shipper sends them (fleet_ingest.ingest), on
  a fresh stream (each stack sent once per stream, as OTLP sends every stack a request
  uses), then again from streams past their first batches (no stacks: sustained ingest);
- OTLP: one ExportProfilesServiceRequest per batch, written by the `.otlp.pb` renderer
  (query/render/otlp.py: its own dictionary with every stack it uses, as OTLP has no
  state between requests), sent as unary ProfilesService/Export calls to --otlp-listen,
  one in flight per stream.
Printed per run and as median (min-max) over `--runs`, with the load average: input rows/s
of each path, OTLP's share of the Arrow rates, and rows per CPU second of the aggregator
process (utime + stime from /proc): on a shared machine the CPU the aggregator got bounds
the wall-clock rates, the rows per CPU second much less so. Every request is built before the clock
starts.

Run: .venv/bin/python benchmarks/otlp_ingest.py [--runs 3] [--batch-rows 5000]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import pyarrow as pa

from fleetprof.aggregator.server import Aggregator
from fleetprof.proto import otlp, schema
from fleetprof.query.render import RenderOptions
from fleetprof.query.render.otlp import OtlpRenderer

sys.path.insert(0, str(Path(__file__).parent))
from fleet_ingest import CHANNEL_OPTIONS, Fleet, ingest, make_batches

OPTIONS = RenderOptions(title="fleet", event="cpu", unit="samples")


def otlp_request(conn: duckdb.DuckDBPyConnection, node: str, samples: pa.Table) -> bytes:
    """The batch's rows as the exporter writes them (one OTLP sample per row)."""
    conn.register("batch", samples)
    rows = conn.sql(
        """
        SELECT $node AS node, job, namespace, pod, container, pid, tid, comm,
               frames, modules, kinds, weight, epoch_ns(ts) AS first, epoch_ns(ts) AS last
        FROM batch JOIN fleet_stacks USING (stack_id)
        """,
        params={"node": node},
    ).to_arrow_table()
    conn.unregister("batch")
    out = io.BytesIO()
    OtlpRenderer().render_rows(rows.to_reader(), OPTIONS, out)
    return out.getvalue()


def run_aggregator(db: str, addresses: mp.Queue, stop: mp.Event) -> None:
    aggregator = Aggregator(db, "127.0.0.1:0", otlp_listen="127.0.0.1:0")
    aggregator.start()
    addresses.put((aggregator.address, aggregator.otlp.address))
    stop.wait()
    aggregator.stop(grace_s=0)


def run_otlp_client(
    address: str, streams: list[list[tuple[int, bytes]]], ready: mp.Barrier, results: mp.Queue
) -> None:
    """Send each stream's requests, one in flight per stream; put (rows, end time)."""
    import grpc

    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    export = channel.unary_unary(otlp.EXPORT_METHOD)  # raw bytes both ways
    sent = [0]
    lock = threading.Lock()

    def one_stream(requests: list[tuple[int, bytes]]) -> None:
        for rows, request in requests:
            export(request, timeout=300)
            with lock:
                sent[0] += rows

    threads = [threading.Thread(target=one_stream, args=(stream,)) for stream in streams]
    ready.wait()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    channel.close()
    results.put((sent[0], time.time()))


def otlp_ingest(address: str, per_client: list[list[list[tuple[int, bytes]]]]) -> tuple[int, float]:
    ctx = mp.get_context("spawn")
    ready = ctx.Barrier(len(per_client) + 1)
    results = ctx.Queue()
    clients = [
        ctx.Process(target=run_otlp_client, args=(address, streams, ready, results))
        for streams in per_client
    ]
    for client in clients:
        client.start()
    ready.wait()
    started = time.time()
    outcomes = [results.get() for _ in clients]
    for client in clients:
        client.join()
    return sum(rows for rows, _ in outcomes), max(end for _, end in outcomes) - started


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stored_rows(db: Path) -> int:
    with duckdb.connect(str(db), read_only=True) as conn:
        return conn.execute("SELECT sum(sample_rows) FROM ingested_batches").fetchone()[0]


def one_run(args: argparse.Namespace, work: Path, run: int) -> dict[str, float]:
    fleet = Fleet.make(args.stacks)
    conn = fleet.connect()
    conn.register("fleet_stacks", fleet.stacks)
    arrow_clients, otlp_clients = [], []
    for c in range(args.clients):
        arrow_streams, otlp_streams = [], []
        for s in range(args.streams):
            seed = run * 1000 + c * 100 + s
            batches = make_batches(
                fleet, args.nodes, args.jobs, args.batches, args.batch_rows, seed=seed
            )
            arrow_streams.append([(node, schema.encode(table)) for node, table in batches])
            otlp_streams.append(
                [(table.num_rows, otlp_request(conn, node, table)) for node, table in batches]
            )
        arrow_clients.append(arrow_streams)
        otlp_clients.append(otlp_streams)
    otlp_bytes = sum(len(r) for client in otlp_clients for stream in client for _, r in stream)
    encoded_stacks = schema.encode(fleet.stacks)
    print(f"  run {run + 1}: {otlp_bytes / 1e6:.0f} MB of OTLP requests", flush=True)
    rates = {}
    for path in ("arrow", "otlp"):
        db = work / f"{path}-{run}.duckdb"
        ctx = mp.get_context("spawn")
        addresses, stop = ctx.Queue(), ctx.Event()
        server = ctx.Process(target=run_aggregator, args=(str(db), addresses, stop))
        server.start()
        address, otlp_address = addresses.get()
        for name in ("arrow", "arrow sustained") if path == "arrow" else ("otlp",):
            cpu = cpu_seconds(server.pid)
            if name == "otlp":
                rows, took = otlp_ingest(otlp_address, otlp_clients)
            else:  # the first pass sends each stack once per stream, the second none
                warm = name == "arrow sustained"
                rows, took, _ = ingest(address, arrow_clients, encoded_stacks, warm, 1)
            cpu = cpu_seconds(server.pid) - cpu
            rates[name], rates[f"{name} per CPU s"] = rows / took, rows / cpu
            print(
                f"  run {run + 1} {name}: {rows:,} rows in {took:.2f} s, "
                f"aggregator CPU {cpu:.2f} s",
                flush=True,
            )
        stop.set()
        server.join()
        print(f"    {stored_rows(db):,} rows stored", flush=True)
        for leftover in work.glob(f"{db.name}*"):
            leftover.unlink()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--streams", type=int, default=2, help="streams per client")
    parser.add_argument("--nodes", type=int, default=1_000)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--stacks", type=int, default=20_000)
    parser.add_argument("--batch-rows", type=int, default=5_000)
    parser.add_argument("--batches", type=int, default=8, help="batches per stream")
    args = parser.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(
        f"fleet: {args.stacks:,} stacks, {args.nodes:,} nodes, {args.jobs} jobs; "
        f"{args.clients} clients x {args.streams} streams x {args.batches} batches of "
        f"{args.batch_rows:,} rows; {os.cpu_count()} CPUs"
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="fleetprof-otlp-") as tmp:
        for run in range(args.runs):
            runs.append(one_run(args, Path(tmp), run))
            print("  " + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())

    def spread(values: list[float]) -> str:
        return (
            f"{statistics.median(values) / 1e3:,.0f}k rows/s "
            f"({min(values) / 1e3:,.0f}k-{max(values) / 1e3:,.0f}k)"
        )

    def ratio(path: str) -> str:
        ratios = [rates["otlp"] / rates[path] for rates in runs]
        return f"{statistics.median(ratios):.0%} ({min(ratios):.0%}-{max(ratios):.0%})"

    print(f"over {args.runs} runs, input rows/s, median (min-max):")
    for path in ("arrow", "arrow sustained", "otlp"):
        print(f"  {path}: {spread([rates[path] for rates in runs])}")
    print(
        f"  OTLP / Arrow with stacks {ratio('arrow')}; / Arrow sustained {ratio('arrow sustained')}"
    )
    print("rows per aggregator CPU second, median (min-max):")
    for path in ("arrow", "arrow sustained", "otlp"):
        print(f"  {path}: {spread([rates[f'{path} per CPU s'] for rates in runs])}")


if __name__ == "__main__":
    main()
