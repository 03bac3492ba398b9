"""gRPC ControlService: agents keep a Connect stream open; users start and watch sessions.

An on-demand session ("profile job X on every node it runs on for 60 s at 199 Hz") is sent
to every connected agent, and to agents that connect before its deadline (a restarted agent
rejoins). Agents stop by themselves at the deadline; the session is done when every node
that joined reported FINISHED, or a grace period after the deadline has passed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from fleetprof.aggregator.storage import ProfileStore
from fleetprof.proto.control.v1 import control_pb2, control_pb2_grpc
from fleetprof.proto.schema import EVENT_UNITS
from fleetprof.proto.security import IngestDenied, ServerSecurity, bearer_token

log = logging.getLogger(__name__)

State = control_pb2.SessionState
# After the deadline, nodes get this long to ship their last batch before the session closes.
FINISH_GRACE_S = 15.0
WATCH_PERIOD_S = 0.25
MAX_DURATION_S = 24 * 3600


@dataclass
class Session:
    order: control_pb2.SessionOrder
    # Nodes the order went to; each is waited for (until the grace period ends).
    expected: set[str] = field(default_factory=set)
    nodes: dict[str, control_pb2.NodeProgress] = field(default_factory=dict)

    @property
    def deadline(self) -> float:
        return self.order.deadline_unix_ms / 1000

    def done(self, now: float) -> bool:
        if now < self.deadline:
            return False
        ended = {
            node
            for node, progress in self.nodes.items()
            if progress.state in (State.SESSION_STATE_FINISHED, State.SESSION_STATE_FAILED)
        }
        return self.expected <= ended or now > self.deadline + FINISH_GRACE_S


class ControlService(control_pb2_grpc.ControlServiceServicer):
    def __init__(self, store: ProfileStore, security: ServerSecurity) -> None:
        self._store = store
        self._security = security
        self._lock = threading.Lock()
        # agent id -> (node, its order queue)
        self._agents: dict[str, tuple[str, queue.Queue[control_pb2.AgentOrder | None]]] = {}
        self._sessions: dict[str, Session] = {}
        self._changed = threading.Condition(self._lock)

    # --- agents -----------------------------------------------------------------------

    def Connect(
        self, request_iterator: Iterator[control_pb2.AgentReport], context: grpc.ServicerContext
    ) -> Iterator[control_pb2.AgentOrder]:
        first = next(request_iterator, None)
        if first is None or not first.HasField("hello") or not first.hello.node:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first report must be a hello")
        node, agent_id = first.hello.node, first.hello.agent_id
        try:
            grant = self._security.ingest_grant(
                context.invocation_metadata(), context.auth_context()
            )
            if not grant.allows(node):
                raise IngestDenied(
                    grpc.StatusCode.PERMISSION_DENIED, f"{grant.name} may not act as node {node!r}"
                )
        except IngestDenied as exc:
            log.warning("refused control stream from %s: %s", context.peer(), exc)
            context.abort(exc.code, str(exc))
        outbox: queue.Queue[control_pb2.AgentOrder | None] = queue.Queue()
        with self._lock:
            self._agents[agent_id] = (node, outbox)
            now = time.time()
            for session in self._sessions.values():
                if session.deadline > now:  # a (re)joining agent takes part in what is left
                    session.expected.add(node)
                    outbox.put(control_pb2.AgentOrder(start_session=session.order))
        log.info("agent %s (%s) connected", agent_id, node)
        reader = threading.Thread(
            target=self._read_reports, args=(request_iterator, node, outbox), daemon=True
        )
        reader.start()
        context.add_callback(lambda: outbox.put(None))
        try:
            while (order := outbox.get()) is not None:
                yield order
        finally:
            with self._lock:
                self._agents.pop(agent_id, None)
            log.info("agent %s (%s) disconnected", agent_id, node)

    def _read_reports(
        self,
        reports: Iterator[control_pb2.AgentReport],
        node: str,
        outbox: queue.Queue[control_pb2.AgentOrder | None],
    ) -> None:
        try:
            for report in reports:
                if report.HasField("session"):
                    self._record(node, report.session)
        except grpc.RpcError:
            pass  # the agent went away; Connect's finally unregisters it
        finally:
            outbox.put(None)

    def _record(self, node: str, report: control_pb2.SessionReport) -> None:
        with self._changed:
            session = self._sessions.get(report.session_id)
            if session is None:
                return
            session.nodes[node] = control_pb2.NodeProgress(
                node=node, state=report.state, samples=report.samples, processes=report.processes
            )
            self._changed.notify_all()

    # --- users --------------------------------------------------------------------------

    def _check_access(self, job: str, context: grpc.ServicerContext) -> None:
        """A token limited to some jobs profiles and watches only those."""
        scope = self._security.scope(bearer_token(context.invocation_metadata()))
        if scope is not None and not scope.allows_job(job):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"this token may not profile {job!r}")

    def StartSession(
        self, request: control_pb2.StartSessionRequest, context: grpc.ServicerContext
    ) -> control_pb2.SessionInfo:
        problem = _check(request)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        self._check_access(request.job, context)
        order = control_pb2.SessionOrder(
            session_id=uuid.uuid4().hex[:16],
            job=request.job,
            events=list(request.events) or ["cpu"],
            frequency=request.frequency or 199,
            deadline_unix_ms=int((time.time() + request.duration_s) * 1000),
        )
        with self._lock:
            agents = list(self._agents.values())
            self._sessions[order.session_id] = Session(order, {node for node, _ in agents})
        for _, outbox in agents:
            outbox.put(control_pb2.AgentOrder(start_session=order))
        self._store.record_session(order, state="running")
        log.info("session %s: job %s on %d agents", order.session_id, order.job, len(agents))
        return control_pb2.SessionInfo(
            session_id=order.session_id, deadline_unix_ms=order.deadline_unix_ms, agents=len(agents)
        )

    def WatchSession(
        self, request: control_pb2.WatchSessionRequest, context: grpc.ServicerContext
    ) -> Iterator[control_pb2.SessionProgress]:
        with self._lock:
            session = self._sessions.get(request.session_id)
        if session is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no session {request.session_id!r}")
        self._check_access(session.order.job, context)
        first = True
        while context.is_active():
            with self._changed:
                # The state so far at once, then at each change (or tick: the deadline passes).
                if not first:
                    self._changed.wait(WATCH_PERIOD_S)
                first = False
                done = session.done(time.time())
                progress = control_pb2.SessionProgress(
                    nodes=sorted(session.nodes.values(), key=lambda n: n.node),
                    deadline_unix_ms=session.order.deadline_unix_ms,
                    done=done,
                )
            yield progress
            if done:
                self._store.record_session(session.order, state="done")
                return


def _check(request: control_pb2.StartSessionRequest) -> str | None:
    if not request.job:
        return "a session needs a job"
    if not 1 <= request.duration_s <= MAX_DURATION_S:
        return f"duration must be 1 to {MAX_DURATION_S} s"
    if request.frequency and not 1 <= request.frequency <= 10_000:
        return "frequency must be 1 to 10000 Hz"
    unknown = set(request.events) - EVENT_UNITS.keys()
    if unknown:
        return f"unknown event {sorted(unknown)[0]!r}"
    return None
