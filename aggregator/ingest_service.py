"""gRPC IngestService: authenticate the stream, validate each batch, commit it, then
acknowledge it."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from fleetprof.aggregator.ingest_guard import IngestGuard
from fleetprof.aggregator.storage import ProfileStore, StorageUnavailable
from fleetprof.aggregator.validate import StreamStacks, ValidBatch, validate_batch
from fleetprof.proto import schema
from fleetprof.proto.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from fleetprof.proto.security import IngestDenied, ServerSecurity

log = logging.getLogger(__name__)


def store_batch(store: ProfileStore, batch: ingest_pb2.IngestBatch) -> ingest_pb2.IngestAck:
    """Validate one batch and commit it: the one write path, for gRPC ingest and for
    `fleetprof import --db`. Raises schema.SchemaError for a bad batch and
    StorageUnavailable when nothing of it could be written."""
    return store_valid(store, validate_batch(batch))


def store_valid(store: ProfileStore, valid: ValidBatch) -> ingest_pb2.IngestAck:
    """Commit a batch validate_batch accepted (OTLP checks all of a request's first)."""
    result = store.append(
        valid.agent_id,
        valid.sequence,
        valid.node,
        valid.samples,
        valid.stacks,
        valid.processes,
        valid.io_latency,
        valid.incarnation,
        valid.grouped,
    )
    return ingest_pb2.IngestAck(
        sequence=valid.sequence, duplicate=result.duplicate, rows_stored=result.rows_stored
    )


class IngestService(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, store: ProfileStore, security: ServerSecurity, guard: IngestGuard) -> None:
        self._store = store
        self._security = security
        self._guard = guard

    def Ingest(
        self, request_iterator: Iterator[ingest_pb2.IngestBatch], context: grpc.ServicerContext
    ) -> Iterator[ingest_pb2.IngestAck]:
        try:
            grant = self._security.ingest_grant(
                context.invocation_metadata(), context.auth_context()
            )
        except IngestDenied as exc:
            log.warning("refused ingest stream from %s: %s", context.peer(), exc)
            context.abort(exc.code, str(exc))
        stacks = StreamStacks()
        for batch in request_iterator:
            try:
                valid = validate_batch(batch)
                self._guard.admit(
                    grant, valid.agent_id, valid.node, valid.incarnation, valid.sequence
                )
                stacks.check(valid.samples, valid.stacks)
                ack = store_valid(self._store, valid)
            except IngestDenied as exc:
                log.warning(
                    "refused batch %r/%d from %s (%s): %s",
                    batch.agent_id[:64],
                    batch.sequence,
                    context.peer(),
                    grant.name,
                    exc,
                )
                context.abort(exc.code, str(exc))
            except schema.SchemaError as exc:
                log.warning("rejected batch %r/%d: %s", batch.agent_id[:64], batch.sequence, exc)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except StorageUnavailable as exc:
                # Typically a full disk: nothing of this batch was committed; the agent retries.
                log.error("cannot store batch %s/%d: %s", batch.agent_id, batch.sequence, exc)
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"storage unavailable: {exc}")
            yield ack
