"""gRPC QueryService: read-only SQL streamed back as Arrow IPC."""

from __future__ import annotations

import io
from collections.abc import Iterator

import grpc
import pyarrow as pa
import pyarrow.ipc as ipc

from fleetprof.aggregator.storage import ProfileStore
from fleetprof.proto.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from fleetprof.proto.security import ServerSecurity, bearer_token
from fleetprof.query.access import limited_to
from fleetprof.query.sandbox import QueryError, run_query

CHUNK_BYTES = 1 << 20


class QueryService(ingest_pb2_grpc.QueryServiceServicer):
    def __init__(self, store: ProfileStore, security: ServerSecurity, max_query_s: float) -> None:
        self._store = store
        self._security = security
        self._max_query_s = max_query_s

    def Sql(
        self, request: ingest_pb2.SqlRequest, context: grpc.ServicerContext
    ) -> Iterator[ingest_pb2.ArrowChunk]:
        # The server's maximum bounds every query: a client may only ask for less.
        timeout_s = min(request.timeout_ms / 1000 or self._max_query_s, self._max_query_s)
        scope = self._security.scope(bearer_token(context.invocation_metadata()))
        try:
            with run_query(
                self._store.reader(),
                request.sql,
                timeout_s,
                prepare=limited_to(scope),
                on_end=context.add_callback,
            ) as reader:
                for data in ipc_chunks(reader):
                    # an IPC stream may be cut anywhere, and must be: one record batch can
                    # outgrow the 4 MiB a gRPC client accepts in a message by default
                    for start in range(0, len(data), CHUNK_BYTES):
                        yield ingest_pb2.ArrowChunk(ipc=data[start : start + CHUNK_BYTES])
        except QueryError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def ipc_chunks(reader: pa.RecordBatchReader) -> Iterator[bytes]:
    """An Arrow IPC stream in pieces, one per record batch; the first also carries the
    schema (the HTTP API streams the same pieces)."""
    sink = io.BytesIO()
    writer = ipc.new_stream(sink, reader.schema)
    for batch in reader:
        writer.write_batch(batch)
        yield _take(sink)
    writer.close()
    yield _take(sink)


def _take(sink: io.BytesIO) -> bytes:
    """Bytes written since the last call; the IPC stream goes on in the emptied buffer."""
    data = sink.getvalue()
    sink.seek(0)
    sink.truncate()
    return data
