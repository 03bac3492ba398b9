"""The aggregator process: one DuckDB store behind the gRPC ingest and query services."""

from __future__ import annotations

import logging
import shutil
import time
from concurrent import futures
from pathlib import Path

import duckdb
import grpc

from fleetprof.aggregator.admin_service import AdminService
from fleetprof.aggregator.control_service import ControlService
from fleetprof.aggregator.ingest_guard import IngestGuard
from fleetprof.aggregator.ingest_service import IngestService
from fleetprof.aggregator.limits import (
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_STREAMS_PER_PEER,
    QUERY_THREADS,
    StreamLimits,
)
from fleetprof.aggregator.otlp_receiver import OtlpReceiver
from fleetprof.aggregator.partitions import LakePolicy, Partitions
from fleetprof.aggregator.query_service import QueryService
from fleetprof.aggregator.storage import ProfileStore
from fleetprof.aggregator.web import WebServer
from fleetprof.proto import schema
from fleetprof.proto.control.v1 import control_pb2_grpc
from fleetprof.proto.ingest.v1 import ingest_pb2_grpc
from fleetprof.proto.security import ServerSecurity, is_loopback
from fleetprof.query.sandbox import DEFAULT_TIMEOUT_S, lock_down

log = logging.getLogger(__name__)

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", schema.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", schema.MAX_MESSAGE_BYTES),
    # A second aggregator on the same port must fail, not silently share the traffic.
    ("grpc.so_reuseport", 0),
    # A connection without calls (a client that opened one and went quiet) is closed.
    ("grpc.max_connection_idle_ms", 300_000),
    # A client host that vanished (crashed, cut off) does not answer pings: its connection
    # and streams are closed within 80 s (gRPC's default: 2 h), freeing them for the caps.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # gRPC 1.6x+ waits this long for a ping's answer (default: one minute).
    ("grpc.http2.ping_timeout_ms", 20_000),
]


# How long stop() waits for cancelled calls to let go of the database.
CLOSE_WAIT_S = 10.0


class Aggregator:
    """Owns the store, the gRPC server and, given `http_listen`, the web UI (`web`);
    `port` is the bound gRPC port (useful with :0)."""

    def __init__(
        self,
        db_path: str | Path,
        listen: str,
        security: ServerSecurity | None = None,
        http_listen: str | None = None,
        memory_limit: str | None = None,
        lake_dir: str | Path | None = None,
        name: str | None = None,
        lake_policy: LakePolicy | None = None,
        otlp_listen: str | None = None,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER,
        max_query_s: float = DEFAULT_TIMEOUT_S,
        max_spill_bytes: int | None = None,
    ) -> None:
        """`lake_policy` runs partition maintenance (sealing to the lake, retention) in a
        thread of its own; without it, nothing is sealed. `otlp_listen`: serve OTLP
        profiles there too (`otlp`, aggregator/otlp_receiver.py). Streams past
        `max_streams` (or `max_streams_per_peer` from one host) are refused
        (aggregator/limits.py); queries run at most `max_query_s`, whatever their client
        asks."""
        security = security or ServerSecurity()
        self._security = security
        self.store = ProfileStore(db_path, lake_dir, name)
        # Queries run on the same database instance: lock it down before serving anything
        # (the views read the lake). The memory limit is the instance's: ingest and all
        # queries share it. Spilling is capped so that a query cannot take the disk that
        # ingest writes to (DuckDB's default: 90% of the free space).
        if max_spill_bytes is None:
            max_spill_bytes = shutil.disk_usage(Path(self.store.path).resolve().parent).free // 4
        lock_down(self.store.reader(), memory_limit, self.store.lake_roots(), max_spill_bytes)
        self.partitions = Partitions(self.store, lake_policy) if lake_policy else None
        # Every call holds a worker thread while it lasts (synchronous gRPC): streams get at
        # most max_streams of them, queries the rest; calls past them all are refused.
        workers = max_streams + QUERY_THREADS
        self.limits = StreamLimits(max_streams, max_streams_per_peer)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            options=GRPC_OPTIONS,
            interceptors=[self.limits, *security.interceptors()],
            maximum_concurrent_rpcs=workers,
        )
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(
            IngestService(self.store, security, IngestGuard(self.store)), self._server
        )
        ingest_pb2_grpc.add_QueryServiceServicer_to_server(
            QueryService(self.store, security, max_query_s), self._server
        )
        ingest_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminService(self.store, security), self._server
        )
        self.control = ControlService(self.store, security)
        control_pb2_grpc.add_ControlServiceServicer_to_server(self.control, self._server)
        self.port = security.add_port(self._server, listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")
        host = listen.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"
        self.web = (
            WebServer(self.store, http_listen, security, max_query_s) if http_listen else None
        )
        self.otlp = (
            OtlpReceiver(self.store, otlp_listen, security, GRPC_OPTIONS) if otlp_listen else None
        )

    def start(self) -> None:
        self._server.start()
        # debug: `fleetprof aggregator` prints these on stdout, for people and scripts
        log.debug("aggregator listening on %s, database %s", self.address, self.store.path)
        if not (self._security.cert or is_loopback(self.address)):
            log.warning(
                "INSECURE: gRPC on %s is plaintext (--insecure): agent and query tokens and "
                "profiles cross the network readable; use --tls-cert/--tls-key",
                self.address,
            )
        if self.web:
            self.web.start()
            log.debug("web UI on %s", self.web.url)
        if self.otlp:
            self.otlp.start()
            log.debug("OTLP profiles on %s", self.otlp.address)
        if self.partitions:
            self.partitions.start()
            log.info("sealing closed hours into %s as %s", self.store.lake, self.store.name)

    def wait(self) -> None:
        self._server.wait_for_termination()

    def stop(self, grace_s: float = 2.0) -> None:
        if self.web:
            self.web.stop()
        if self.otlp:
            self.otlp.stop(grace_s)
        # Calls still running past the grace are cancelled; their queries are interrupted
        # (QueryService) and let go of the database within moments.
        self._server.stop(grace_s).wait()
        if self.partitions:
            self.partitions.stop()
        deadline = time.monotonic() + CLOSE_WAIT_S
        while True:
            try:
                self.store.close()
                return
            except duckdb.ResourceInUseException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
