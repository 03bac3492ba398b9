"""Where profiles are read from: a live aggregator over gRPC, or a DuckDB file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

import duckdb
import grpc
import pyarrow as pa
import pyarrow.ipc as ipc

from fleetprof.proto.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from fleetprof.proto.security import AccessScope, ClientSecurity
from fleetprof.query.access import limited_to
from fleetprof.query.sandbox import DEFAULT_TIMEOUT_S, QueryError, open_read_only, run_query


class ProfileSource(Protocol):
    def stream(self, sql: str) -> AbstractContextManager[pa.RecordBatchReader]:
        """Run read-only SQL and stream the result."""
        ...

    def close(self) -> None: ...


class ConnectionSource:
    """An open, locked-down DuckDB connection: the aggregator's own database, in process;
    with a scope, queries see only that scope's rows. `identity` names the database for
    caches of its immutable rows (query/flame.py keeps stack paths per database)."""

    def __init__(
        self,
        conn: duckdb.DuckDBPyConnection,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        scope: AccessScope | None = None,
        identity: str | None = None,
    ) -> None:
        self.identity = identity
        self._conn = conn
        self._timeout_s = timeout_s
        self._prepare = limited_to(scope)

    @contextmanager
    def stream(self, sql: str) -> Iterator[pa.RecordBatchReader]:
        with run_query(self._conn, sql, self._timeout_s, prepare=self._prepare) as reader:
            yield reader

    def close(self) -> None:
        self._conn.close()


class DatabaseSource(ConnectionSource):
    """A profile database file opened read-only (no aggregator may be writing it)."""

    def __init__(
        self,
        path: str | Path,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        memory_limit: str | None = None,
    ) -> None:
        found = Path(path).resolve()
        conn = open_read_only(path, memory_limit)
        status = found.stat()  # with the inode: a file made anew at the path is another
        super().__init__(conn, timeout_s, identity=f"{found}:{status.st_dev}:{status.st_ino}")


class AggregatorSource:
    """SQL sent to an aggregator's QueryService; the answer arrives as Arrow IPC chunks."""

    def __init__(
        self,
        address: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        security: ClientSecurity | None = None,
    ) -> None:
        security = security or ClientSecurity()
        self._address = address
        self._channel = security.channel(address)
        self._metadata = security.metadata()
        self._stub = ingest_pb2_grpc.QueryServiceStub(self._channel)
        self._timeout_s = timeout_s

    @contextmanager
    def stream(self, sql: str) -> Iterator[pa.RecordBatchReader]:
        request = ingest_pb2.SqlRequest(sql=sql, timeout_ms=int(self._timeout_s * 1000))
        chunks = self._stub.Sql(request, timeout=self._timeout_s + 5, metadata=self._metadata)
        try:
            yield ipc.open_stream(_ChunkReader(chunk.ipc for chunk in chunks))
        except grpc.RpcError as exc:
            raise rpc_error(exc, self._address) from exc
        except pa.ArrowInvalid as exc:
            if not chunks.done():
                raise  # the caller's own error (a writer refusing a type): the call runs on
            # The stream ended early: the server aborted with a status after the first byte.
            status = chunks.exception()
            raise (rpc_error(status, self._address) if status else QueryError(str(exc))) from exc
        finally:
            chunks.cancel()  # a caller that stopped reading early frees the server's query

    def close(self) -> None:
        self._channel.close()


def rpc_error(exc: grpc.RpcError, address: str) -> QueryError:
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return QueryError(
            f"aggregator {address} is unreachable (is `fleetprof aggregator` running there?)"
        )
    return QueryError(exc.details() or exc.code().name)


class _ChunkReader:
    """A read-only file over an iterator of byte chunks (for pyarrow's IPC reader)."""

    closed = False

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        if size < 0:
            size = len(self._buffer)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def open_source(
    aggregator: str | None,
    db: str | None,
    security: ClientSecurity | None = None,
    memory_limit: str | None = None,
) -> ProfileSource:
    if (aggregator is None) == (db is None):
        raise QueryError("give exactly one of --aggregator HOST:PORT or --db PATH")
    if aggregator:
        return AggregatorSource(aggregator, security=security)
    return DatabaseSource(db, memory_limit=memory_limit)
