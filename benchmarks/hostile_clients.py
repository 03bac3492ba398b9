"""Aggregator RSS, threads and query latency under idle streams and half-open HTTP (issue 18).

An aggregator (`fleetprof aggregator`, its own process, loopback only) is flooded by one
client with `--streams` idle Ingest streams (default 5000, opened at once; the per-peer cap
refuses all but 64), then again with the per-peer cap raised past the flood so that only the
total cap (2048) holds; and with `--half-open` HTTP connections (default 1000) that send half
a request and wait. Printed for each: the aggregator's RSS and threads before and during,
streams refused, whether `fleetprof query 'SELECT 42'` answers meanwhile and in how long (its
process start included), how long a web UI user from another address (127.0.0.2) waits
during the HTTP flood; with the load average. Bounded: every phase ends within two minutes.

Run: .venv/bin/python benchmarks/hostile_clients.py [--streams 5000] [--half-open 1000]
"""

from __future__ import annotations

import argparse
import http.client
import queue
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from fleetprof.proto.ingest.v1 import ingest_pb2_grpc


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def status(pid: int) -> tuple[float, int]:
    """(RSS in MB, threads) of a process."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def query_seconds(address: str) -> float:
    """How long `fleetprof query --aggregator ADDRESS 'SELECT 42'` takes, process start
    included; raises if it does not answer 42."""
    command = [sys.executable, "-m", "fleetprof", "query", "--aggregator", address]
    started = time.perf_counter()
    done = subprocess.run(
        [*command, "SELECT 42 AS answer", "--format", "csv"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or done.stdout.split() != ['"answer"', "42"]:
        raise RuntimeError(f"fleetprof query failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed


def web_seconds(listen: str, limit_s: float = 60.0) -> str:
    """How long a user's GET /api/meta waits, from another address than the attacker's
    (127.0.0.2), retried until `limit_s` (connections past the queue are closed at once)."""
    host, port = listen.rsplit(":", 1)
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < limit_s:
        user = http.client.HTTPConnection(
            host, int(port), timeout=limit_s, source_address=("127.0.0.2", 0)
        )
        try:
            user.request("GET", "/api/meta", headers={"Host": host})
            if user.getresponse().status == 200:
                return f"answered in {time.perf_counter() - started:.1f} s"
        except (http.client.HTTPException, OSError):  # closed at once: the queue was full
            time.sleep(0.2)
        finally:
            user.close()
    return f"no answer within {elapsed:.0f} s"


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def start(db: Path, http: str, *args: str) -> tuple[subprocess.Popen, str]:
    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "fleetprof", "aggregator", "--db", str(db)]
    process = subprocess.Popen(
        [*command, "--listen", address, "--http", http, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
    return process, address


def idle_streams(db: Path, count: int, per_peer: int | None) -> None:
    args = ("--max-streams-per-peer", str(per_peer)) if per_peer else ()
    process, address = start(db, f"127.0.0.1:{free_port()}", *args)
    try:
        rss, threads = status(process.pid)
        before_query = query_seconds(address)
        with grpc.insecure_channel(address) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            requests: list[queue.Queue] = []
            calls = []
            started = time.perf_counter()
            for _ in range(count):
                requests.append(queue.Queue())
                calls.append(stub.Ingest(iter(requests[-1].get, None)))
            opened_s = time.perf_counter() - started
            deadline = time.monotonic() + 60
            settled = -1
            while time.monotonic() < deadline:  # until refusals stop arriving
                time.sleep(1.0)
                done = sum(call.done() for call in calls)
                if done == settled:
                    break
                settled = done
            during_rss, during_threads = status(process.pid)
            during_query = query_seconds(address)
            for call, waiting in zip(calls, requests, strict=True):
                call.cancel()
                waiting.put(None)  # ends the thread that feeds the call its requests
        cap = f"per-peer cap {per_peer}" if per_peer else "default caps (64 per peer, 2048 in all)"
        print(
            f"{count} idle Ingest streams from one client, {cap}: opened in {opened_s:.1f} s, "
            f"{settled} refused; aggregator RSS {rss:.0f} -> {during_rss:.0f} MB, threads "
            f"{threads} -> {during_threads}; `fleetprof query 'SELECT 42'` answered in "
            f"{before_query:.1f} s before, {during_query:.1f} s during | {load()}"
        )
    finally:
        process.terminate()
        process.wait(timeout=30)


def half_open(db: Path, count: int) -> None:
    http = f"127.0.0.1:{free_port()}"
    process, address = start(db, http)
    host, port = http.rsplit(":", 1)
    sockets = []
    try:
        rss, threads = status(process.pid)
        before_query = query_seconds(address)
        started = time.perf_counter()
        for _ in range(count):
            connection = socket.create_connection((host, int(port)), timeout=10)
            connection.sendall(b"GET /api/meta HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            sockets.append(connection)
        opened_s = time.perf_counter() - started
        time.sleep(2.0)
        during_rss, during_threads = status(process.pid)
        during_query = query_seconds(address)
        web = web_seconds(http)
        for connection in sockets:
            connection.close()
        sockets.clear()
        print(
            f"{count} half-open HTTP connections (opened in {opened_s:.1f} s): aggregator RSS "
            f"{rss:.0f} -> {during_rss:.0f} MB, threads {threads} -> {during_threads}; "
            f"`fleetprof query 'SELECT 42'` answered in {before_query:.1f} s before, "
            f"{during_query:.1f} s during; the web UI's /api/meta during: {web} | {load()}"
        )
    finally:
        for connection in sockets:
            connection.close()
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--half-open", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    # 5000 streams and 1000 sockets: more descriptors than the default soft limit of 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(load(), f"(fd limit {soft} -> {hard})")
    with tempfile.TemporaryDirectory(prefix="fleetprof-hostile-") as tmp:
        for run in range(args.runs):
            db = Path(tmp) / f"p{run}.duckdb"
            idle_streams(db, args.streams, None)
            idle_streams(db, args.streams, args.streams + 1)
            half_open(db, args.half_open)


if __name__ == "__main__":
    main()
