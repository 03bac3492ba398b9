"""The control plane over real gRPC: session orders reach every agent stream, including
agents that (re)connect mid-session; progress is merged per node; the session closes."""

from __future__ import annotations

import time

import grpc
import pytest

from fleetprof.aggregator.server import Aggregator
from fleetprof.node_agent.control import ControlClient
from fleetprof.proto.control.v1 import control_pb2, control_pb2_grpc
from fleetprof.proto.security import ClientSecurity

SAMPLING = control_pb2.SessionState.SESSION_STATE_SAMPLING
FINISHED = control_pb2.SessionState.SESSION_STATE_FINISHED


def client(aggregator: Aggregator, node: str) -> ControlClient:
    return ControlClient(aggregator.address, ClientSecurity(), node, f"{node}/test")


def stub(aggregator: Aggregator) -> tuple[grpc.Channel, control_pb2_grpc.ControlServiceStub]:
    channel = grpc.insecure_channel(aggregator.address)
    return channel, control_pb2_grpc.ControlServiceStub(channel)


def wait_connected(aggregator: Aggregator, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(aggregator.control._agents) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(aggregator.control._agents) == count


def test_session_reaches_every_agent_and_completes(aggregator: Aggregator) -> None:
    agents = [client(aggregator, f"node-{i}") for i in range(3)]
    channel, control = stub(aggregator)
    try:
        wait_connected(aggregator, 3)
        started = time.monotonic()
        info = control.StartSession(
            control_pb2.StartSessionRequest(job="etl-42", duration_s=2, frequency=199)
        )
        assert info.agents == 3
        orders = [agent.orders.get(timeout=5) for agent in agents]
        latency = time.monotonic() - started
        assert {o.session_id for o in orders} == {info.session_id}
        assert all(
            o.job == "etl-42" and o.frequency == 199 and list(o.events) == ["cpu"] for o in orders
        )
        assert latency < 2.0  # order to every agent (the target, on loopback)
        for i, agent in enumerate(agents):
            agent.report(info.session_id, SAMPLING, samples=10 * i, processes=1)
        for i, agent in enumerate(agents):
            agent.report(info.session_id, FINISHED, samples=100 * (i + 1), processes=1)
        progress = list(
            control.WatchSession(
                control_pb2.WatchSessionRequest(session_id=info.session_id), timeout=30
            )
        )
        final = progress[-1]
        assert final.done
        assert {(n.node, n.samples, n.state) for n in final.nodes} == {
            ("node-0", 100, FINISHED),
            ("node-1", 200, FINISHED),
            ("node-2", 300, FINISHED),
        }
        # All finished: the session closes at its deadline, not after the grace period.
        assert time.monotonic() - started < 2 + 3
        state = (
            aggregator.store.reader()
            .execute("SELECT job, state FROM sessions WHERE session_id = ?", [info.session_id])
            .fetchone()
        )
        assert state == ("etl-42", "done")
    finally:
        channel.close()
        for agent in agents:
            agent.close()


def test_agent_joining_mid_session_gets_the_order(aggregator: Aggregator) -> None:
    channel, control = stub(aggregator)
    first = client(aggregator, "node-a")
    try:
        wait_connected(aggregator, 1)
        info = control.StartSession(
            control_pb2.StartSessionRequest(job="j", duration_s=30, events=["cpu"])
        )
        assert first.orders.get(timeout=5).session_id == info.session_id
        first.close()  # the agent dies ...
        restarted = client(aggregator, "node-a")  # ... and comes back: it rejoins
        try:
            order = restarted.orders.get(timeout=5)
            assert order.session_id == info.session_id
            assert order.deadline_unix_ms == info.deadline_unix_ms  # only what is left
        finally:
            restarted.close()
    finally:
        channel.close()


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"duration_s": 10}, "needs a job"),
        ({"job": "j", "duration_s": 0}, "duration"),
        ({"job": "j", "duration_s": 10, "events": ["bogus"]}, "unknown event"),
        ({"job": "j", "duration_s": 10, "frequency": 50_000}, "frequency"),
    ],
)
def test_bad_session_requests_are_refused(aggregator, request_fields, message) -> None:
    channel, control = stub(aggregator)
    try:
        with pytest.raises(grpc.RpcError) as error:
            control.StartSession(control_pb2.StartSessionRequest(**request_fields))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in error.value.details()
    finally:
        channel.close()


def test_unknown_session_is_not_found(aggregator: Aggregator) -> None:
    channel, control = stub(aggregator)
    try:
        with pytest.raises(grpc.RpcError) as error:
            list(control.WatchSession(control_pb2.WatchSessionRequest(session_id="nope")))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        channel.close()
