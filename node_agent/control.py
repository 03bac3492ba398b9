"""The agent's end of the control plane: one outbound Connect stream, kept open.

Nothing dials into nodes: the agent dials the aggregator, says hello, receives session
orders and reports progress. A lost stream is re-established with jittered backoff; on
reconnect the aggregator re-sends the sessions still running, so a restarted agent rejoins.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Iterator

import grpc

from fleetprof.proto.control.v1 import control_pb2, control_pb2_grpc
from fleetprof.proto.security import ClientSecurity

log = logging.getLogger(__name__)

RETRY_BASE_S = 0.5
RETRY_MAX_S = 10.0


class ControlClient:
    def __init__(self, address: str, security: ClientSecurity, node: str, agent_id: str) -> None:
        self.orders: queue.Queue[control_pb2.SessionOrder] = queue.Queue()
        self._hello = control_pb2.AgentReport(
            hello=control_pb2.AgentHello(node=node, agent_id=agent_id)
        )
        self._address = address
        self._channel = security.channel(address)
        self._metadata = security.metadata()
        self._stub = control_pb2_grpc.ControlServiceStub(self._channel)
        self._reports: queue.Queue[control_pb2.AgentReport | None] = queue.Queue()
        self._closed = threading.Event()
        self._call: grpc.Future | None = None
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self._thread.start()

    def report(
        self, session_id: str, state: int, samples: int, processes: int, message: str = ""
    ) -> None:
        self._reports.put(
            control_pb2.AgentReport(
                session=control_pb2.SessionReport(
                    session_id=session_id,
                    state=state,
                    samples=samples,
                    processes=processes,
                    message=message,
                )
            )
        )

    def _outgoing(
        self, reports: queue.Queue[control_pb2.AgentReport | None]
    ) -> Iterator[control_pb2.AgentReport]:
        yield self._hello
        while (report := reports.get()) is not None:
            yield report

    def _run(self) -> None:
        failures = 0
        while not self._closed.is_set():
            # Each stream has its own report queue, so a dead stream cannot swallow reports.
            reports: queue.Queue[control_pb2.AgentReport | None] = queue.Queue()
            self._reports = reports
            try:
                self._call = self._stub.Connect(self._outgoing(reports), metadata=self._metadata)
                for order in self._call:
                    failures = 0
                    self.orders.put(order.start_session)
            except grpc.RpcError as exc:
                if self._closed.is_set():
                    return
                log.debug("control stream to %s ended: %s", self._address, exc.code().name)
            reports.put(None)  # end this stream's request iterator
            failures += 1
            self._closed.wait(random.uniform(0, min(RETRY_MAX_S, RETRY_BASE_S * 2**failures)))

    def close(self) -> None:
        self._closed.set()
        if self._call is not None:
            self._call.cancel()
        self._reports.put(None)
        self._thread.join(timeout=5)
        self._channel.close()
