"""Bounded concurrency of the gRPC server: streams per peer and in total.

The synchronous gRPC server holds a worker thread for as long as a call lasts, and every
agent keeps two streams open (ingest, control): without a cap, one client opening thousands
of idle streams takes thousands of threads, and queries then wait for one. Streams past a
cap are refused with RESOURCE_EXHAUSTED at once; queries keep threads of their own.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any

import grpc

from fleetprof.proto.security import HandlerInterceptor, same_shape

log = logging.getLogger(__name__)

# Two per agent (ingest, control) and a few watchers.
DEFAULT_MAX_STREAMS = 2048
# One host runs one agent; a few more for `fleetprof profile` watchers and imports.
DEFAULT_MAX_STREAMS_PER_PEER = 64
# Worker threads kept for calls that are not streams (queries, session starts).
QUERY_THREADS = 32


def peer_host(peer: str) -> str:
    """The address of a gRPC peer string without its port (`ipv4:10.0.0.7:5123`)."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return address.rsplit(":", 1)[0]
    return peer


class StreamLimits(HandlerInterceptor):
    """Counts calls that stream requests (Ingest, Connect) by peer host; refuses those past
    `per_peer` for the host or `total` in all."""

    def __init__(
        self, total: int = DEFAULT_MAX_STREAMS, per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER
    ) -> None:
        self.total = total
        self.per_peer = per_peer
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()
        self._total = 0
        self._refused = 0

    def intercept(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if handler.stream_stream is None:
            return handler
        behavior = handler.stream_stream

        def limited(requests: Any, context: grpc.ServicerContext) -> Any:
            host = peer_host(context.peer())
            problem = self._acquire(host)
            if problem:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, problem)
            if not context.add_callback(lambda: self._release(host)):
                self._release(host)  # the call had already ended
            return behavior(requests, context)

        return same_shape(handler, limited)

    def _acquire(self, host: str) -> str | None:
        with self._lock:
            if self._open[host] >= self.per_peer:
                problem = f"{host} has {self.per_peer} streams open already"
            elif self._total >= self.total:
                problem = f"the aggregator has {self.total} streams open already"
            else:
                self._open[host] += 1
                self._total += 1
                return None
            self._refused += 1
            refused = self._refused
        # One line per power of two: a flood of refusals must not flood the log.
        if refused & (refused - 1) == 0:
            log.warning("refused stream (%d so far): %s", refused, problem)
        return problem

    def _release(self, host: str) -> None:
        with self._lock:
            self._open[host] -= 1
            self._total -= 1
            if not self._open[host]:
                del self._open[host]
