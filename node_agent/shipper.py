"""Sends batches to the aggregator over one bidirectional Ingest stream, in order.

Each batch has a sequence number within the agent's incarnation (a random value per
Shipper: batches someone else sends under the same agent id never collide with this one's)
and counts as delivered only once the aggregator acks it (after its commit). A batch that
cannot be delivered goes to the on-disk spool; spooled batches are retried oldest first,
with jittered exponential backoff, before any newer one, so the aggregator sees every
agent's batches in order. A batch the aggregator refuses as invalid is dropped and counted:
resending it cannot succeed.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import uuid

import grpc
import pyarrow as pa
import pyarrow.compute as pc

from fleetprof.node_agent.batch import Batch
from fleetprof.node_agent.spool import Spool
from fleetprof.proto import schema
from fleetprof.proto.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from fleetprof.proto.security import ClientSecurity
from fleetprof.proto.stacks import stacks_table

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 10.0
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", schema.MAX_MESSAGE_BYTES),
    # Notice a vanished aggregator within seconds, not at the next TCP timeout.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Reconnect within seconds of the aggregator coming back (gRPC's default grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]
RETRY_BASE_S = 0.5
RETRY_MAX_S = 10.0


class _Stream:
    """One open Ingest call: requests go in through a queue, acks come out in order."""

    def __init__(
        self, stub: ingest_pb2_grpc.IngestServiceStub, metadata: list[tuple[str, str]]
    ) -> None:
        self._requests: queue.Queue[ingest_pb2.IngestBatch | None] = queue.Queue()
        self._acks = stub.Ingest(iter(self._requests.get, None), metadata=metadata)
        self.sent_stacks: set[int] = set()

    def exchange(self, batch: ingest_pb2.IngestBatch) -> ingest_pb2.IngestAck:
        self._requests.put(batch)
        # A hung aggregator must not hang the agent: cancel the call if no ack comes.
        watchdog = threading.Timer(ACK_TIMEOUT_S, self._acks.cancel)
        watchdog.start()
        try:
            return next(self._acks)
        finally:
            watchdog.cancel()

    def close(self) -> None:
        self._requests.put(None)
        self._acks.cancel()


class Shipper:
    def __init__(
        self,
        address: str,
        agent_id: str,
        node: str,
        spool: Spool,
        security: ClientSecurity | None = None,
    ) -> None:
        self.address = address
        self.agent_id = agent_id
        self.node = node
        security = security or ClientSecurity()
        self._channel = security.channel(address, CHANNEL_OPTIONS)
        self._metadata = security.metadata()
        self._stub = ingest_pb2_grpc.IngestServiceStub(self._channel)
        self._stream: _Stream | None = None
        self._spool = spool
        self._new_incarnation()
        self._failures = 0
        self._retry_at = 0.0
        self.stats = {"acked": 0, "duplicates": 0, "rejected": 0}

    def _new_incarnation(self) -> None:
        self._incarnation = uuid.uuid4().hex
        self._next_sequence = 1

    @property
    def pending(self) -> int:
        """Batches waiting in the spool."""
        return len(self._spool)

    @property
    def retry_due(self) -> bool:
        return bool(self._spool) and time.monotonic() >= self._retry_at

    def ship(self, batch: Batch) -> None:
        """Deliver a batch now if nothing older waits, else spool it behind the others."""
        if not batch.samples.num_rows and batch.processes is None and batch.io_latency is None:
            return
        message = ingest_pb2.IngestBatch(
            agent_id=self.agent_id,
            sequence=self._next_sequence,
            incarnation=self._incarnation,
            schema_version=schema.SCHEMA_VERSION,
            node=self.node,
            samples=schema.encode(batch.samples),
            # Every stack the batch uses: a spooled batch must stand on its own.
            stacks=schema.encode(stacks_table(batch.stacks)),
            processes=schema.encode(batch.processes) if batch.processes is not None else b"",
            io_latency=schema.encode(batch.io_latency) if batch.io_latency is not None else b"",
        )
        self._next_sequence += 1
        if not self._spool and time.monotonic() >= self._retry_at and self._deliver(message):
            return
        self._spool.append(message)
        self.flush()

    def flush(self) -> bool:
        """Deliver spooled batches, oldest first, unless backing off; True when none is left."""
        if time.monotonic() < self._retry_at:
            return not self._spool
        while (message := self._spool.oldest()) is not None:
            if not self._deliver(message):
                return False
            self._spool.remove_oldest()
        return True

    def _deliver(self, message: ingest_pb2.IngestBatch) -> bool:
        """True when acked or refused for good; False (and back off) when it must wait."""
        try:
            ack = self._send(message)
        except grpc.RpcError as exc:
            self._drop_stream()
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                # Its sequence is too far past the last stored (the spool dropped many
                # batches): this and every later batch go in a new incarnation.
                log.warning("aggregator: %s", exc.details())
                self._new_incarnation()
                message.incarnation = self._incarnation
                message.sequence = self._next_sequence
                self._next_sequence += 1
                return self._deliver(message)
            if exc.code() in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
            ):
                # A credential problem an operator fixes: keep the batch, say it loudly.
                log.error("aggregator %s refused this agent: %s", self.address, exc.details())
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                self.stats["rejected"] += 1
                log.error("aggregator refused batch %d: %s", message.sequence, exc.details())
                return True
            self._failures += 1
            # Full jitter: agents of a whole fleet must not come back in lockstep.
            delay = random.uniform(0, min(RETRY_MAX_S, RETRY_BASE_S * 2**self._failures))
            self._retry_at = time.monotonic() + delay
            log.warning(
                "aggregator %s unavailable (%s): %d batches spooled, retry in %.1f s",
                self.address,
                exc.code().name,
                len(self._spool) + 1,
                delay,
            )
            return False
        self._failures = 0
        self.stats["duplicates" if ack.duplicate else "acked"] += 1
        return True

    def _send(self, message: ingest_pb2.IngestBatch) -> ingest_pb2.IngestAck:
        if self._stream is None:
            self._stream = _Stream(self._stub, self._metadata)
        stream = self._stream
        stacks = schema.decode(message.stacks, schema.STACKS)
        sent = pa.array(list(stream.sent_stacks), pa.int64())
        new = pc.invert(pc.is_in(stacks["stack_id"], value_set=sent))
        request = ingest_pb2.IngestBatch()
        request.CopyFrom(message)
        request.stacks = schema.encode(stacks.filter(new))  # stacks go once per stream
        ack = stream.exchange(request)
        stream.sent_stacks.update(stacks["stack_id"].to_pylist())
        return ack

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def drain_pending(self, timeout_s: float) -> bool:
        """Keep trying to deliver what is spooled (used at shutdown)."""
        deadline = time.monotonic() + timeout_s
        while not self.flush():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        return True

    def close(self) -> None:
        self._drop_stream()
        self._channel.close()
