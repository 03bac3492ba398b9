"""Sends batches to the aggregator over one bidirectional Ingest stream, in order.

Each batch has a per-agent sequence number and stays pending until the aggregator acks it
(after its commit); an unreachable aggregator leaves batches pending, to be retried in
order. A batch the aggregator refuses as invalid is dropped and counted: resending it
cannot succeed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

import grpc

from fleetprof.node_agent.batch import Batch, StackRow, stacks_table
from fleetprof.proto import schema
from fleetprof.proto.ingest.v1 import ingest_pb2, ingest_pb2_grpc

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 30.0
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


@dataclass
class _Pending:
    sequence: int
    samples: bytes
    stacks: dict[int, StackRow]


class _Stream:
    """One open Ingest call: requests go in through a queue, acks come out in order."""

    def __init__(self, stub: ingest_pb2_grpc.IngestServiceStub) -> None:
        self._requests: queue.Queue[ingest_pb2.IngestBatch | None] = queue.Queue()
        self._acks = stub.Ingest(iter(self._requests.get, None))
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
    def __init__(self, address: str, agent_id: str, node: str, max_pending: int = 360) -> None:
        self.address = address
        self.agent_id = agent_id
        self.node = node
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = ingest_pb2_grpc.IngestServiceStub(self._channel)
        self._stream: _Stream | None = None
        self._pending: deque[_Pending] = deque()
        self._max_pending = max_pending
        self._next_sequence = 1
        self.stats = {"acked": 0, "duplicates": 0, "rejected": 0, "dropped_pending": 0}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def ship(self, batch: Batch) -> None:
        """Queue a batch and send everything pending, oldest first."""
        if batch.samples.num_rows:
            if len(self._pending) == self._max_pending:
                self._pending.popleft()
                self.stats["dropped_pending"] += 1
                log.warning("send queue full (%d batches): dropped the oldest", self._max_pending)
            self._pending.append(
                _Pending(self._next_sequence, schema.encode(batch.samples), batch.stacks)
            )
            self._next_sequence += 1
        self.flush()

    def flush(self) -> bool:
        """Send pending batches until done or the aggregator fails; True when all acked."""
        while self._pending:
            pending = self._pending[0]
            try:
                ack = self._send(pending)
            except grpc.RpcError as exc:
                self._drop_stream()
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    self._pending.popleft()
                    self.stats["rejected"] += 1
                    log.error("aggregator refused batch %d: %s", pending.sequence, exc.details())
                    continue
                log.warning(
                    "aggregator %s unavailable (%s); %d batches pending",
                    self.address,
                    exc.code().name,
                    len(self._pending),
                )
                return False
            self._pending.popleft()
            self.stats["duplicates" if ack.duplicate else "acked"] += 1
        return True

    def _send(self, pending: _Pending) -> ingest_pb2.IngestAck:
        if self._stream is None:
            self._stream = _Stream(self._stub)
        stream = self._stream
        new_stacks = {k: v for k, v in pending.stacks.items() if k not in stream.sent_stacks}
        ack = stream.exchange(
            ingest_pb2.IngestBatch(
                agent_id=self.agent_id,
                sequence=pending.sequence,
                schema_version=schema.SCHEMA_VERSION,
                node=self.node,
                samples=pending.samples,
                stacks=schema.encode(stacks_table(new_stacks)),
            )
        )
        stream.sent_stacks.update(new_stacks)
        return ack

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def drain_pending(self, timeout_s: float) -> bool:
        """Keep trying to deliver what is pending (used at shutdown)."""
        deadline = time.monotonic() + timeout_s
        while not self.flush():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)
        return True

    def close(self) -> None:
        self._drop_stream()
        self._channel.close()
