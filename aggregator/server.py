"""The aggregator process: one DuckDB store behind the gRPC ingest and query services."""

from __future__ import annotations

import logging
from concurrent import futures
from pathlib import Path

import grpc

from fleetprof.aggregator.control_service import ControlService
from fleetprof.aggregator.ingest_service import IngestService
from fleetprof.aggregator.otlp_receiver import OtlpReceiver
from fleetprof.aggregator.partitions import LakePolicy, Partitions
from fleetprof.aggregator.query_service import QueryService
from fleetprof.aggregator.storage import ProfileStore
from fleetprof.aggregator.web import WebServer
from fleetprof.proto import schema
from fleetprof.proto.control.v1 import control_pb2_grpc
from fleetprof.proto.ingest.v1 import ingest_pb2_grpc
from fleetprof.proto.security import ServerSecurity
from fleetprof.query.sandbox import lock_down

log = logging.getLogger(__name__)

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", schema.MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", schema.MAX_MESSAGE_BYTES),
    # A second aggregator on the same port must fail, not silently share the traffic.
    ("grpc.so_reuseport", 0),
]
# The synchronous gRPC server holds a worker thread for as long as a call lasts, and every
# agent keeps two streams open (ingest, control): the pool bounds the fleet one aggregator
# serves, and calls beyond it wait (16 threads: 8 agents' streams and one watcher left an
# ingest stream waiting past the agents' 10 s ack timeout). Threads start only when needed.
DEFAULT_WORKERS = 4096


class Aggregator:
    """Owns the store, the gRPC server and, given `http_listen`, the web UI (`web`);
    `port` is the bound gRPC port (useful with :0)."""

    def __init__(
        self,
        db_path: str | Path,
        listen: str,
        workers: int = DEFAULT_WORKERS,
        security: ServerSecurity | None = None,
        http_listen: str | None = None,
        memory_limit: str | None = None,
        lake_dir: str | Path | None = None,
        name: str | None = None,
        lake_policy: LakePolicy | None = None,
        otlp_listen: str | None = None,
    ) -> None:
        """`lake_policy` runs partition maintenance (sealing to the lake, retention) in a
        thread of its own; without it, nothing is sealed. `otlp_listen`: serve OTLP
        profiles there too (`otlp`, aggregator/otlp_receiver.py)."""
        security = security or ServerSecurity()
        self.store = ProfileStore(db_path, lake_dir, name)
        # Queries run on the same database instance: lock it down before serving anything
        # (the views read the lake). The memory limit is the instance's: ingest and all
        # queries share it.
        lock_down(self.store.reader(), memory_limit, self.store.lake_roots())
        self.partitions = Partitions(self.store, lake_policy) if lake_policy else None
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            options=GRPC_OPTIONS,
            interceptors=security.interceptors(),
        )
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(IngestService(self.store), self._server)
        ingest_pb2_grpc.add_QueryServiceServicer_to_server(
            QueryService(self.store, security), self._server
        )
        self.control = ControlService(self.store, security)
        control_pb2_grpc.add_ControlServiceServicer_to_server(self.control, self._server)
        self.port = security.add_port(self._server, listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")
        host = listen.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"
        self.web = WebServer(self.store, http_listen, security) if http_listen else None
        self.otlp = (
            OtlpReceiver(self.store, otlp_listen, security, GRPC_OPTIONS) if otlp_listen else None
        )

    def start(self) -> None:
        self._server.start()
        # debug: `fleetprof aggregator` prints these on stdout, for people and scripts
        log.debug("aggregator listening on %s, database %s", self.address, self.store.path)
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
        self._server.stop(grace_s).wait()
        if self.partitions:
            self.partitions.stop()
        self.store.close()
