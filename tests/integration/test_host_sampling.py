"""Probabilistic host sampling: skipped intervals ship nothing, shipped ones are scaled by 1/p
with integral weights, and totals stay unbiased; sessions are never skipped."""

from __future__ import annotations

import random
import statistics
import threading
import time
from pathlib import Path

import pytest

from fleetprof import workloads
from fleetprof.aggregator.server import Aggregator
from fleetprof.cli import main
from fleetprof.node_agent.host_sampling import HostSampling
from fleetprof.node_agent.samplers import Drain, LatencyBucket
from fleetprof.node_agent.samplers.stack_maps import StackSample
from tests.conftest import require_ebpf


@pytest.mark.parametrize("probability", [0.3, 0.5, 0.77])
def test_scaled_weight_is_unbiased_and_integral(probability: float) -> None:
    sampling = HostSampling(probability, random.Random(11))
    for weight in (1, 7, 1_000_003):
        scaled = [sampling.scale(weight) for _ in range(40_000)]
        exact = weight / probability
        # Only the two integers around w/p, mixed so that the mean is w/p.
        assert set(scaled) <= {int(exact), int(exact) + 1}
        assert statistics.fmean(scaled) == pytest.approx(exact, rel=2e-3, abs=0.01)


def test_fleet_totals_are_unbiased() -> None:
    """Many hosts' intervals of uneven weights: the shipped sum estimates the true sum."""
    rng = random.Random(5)
    weights = [rng.randint(1, 500) for _ in range(200)]
    sampling = HostSampling(0.25, random.Random(6))
    estimates = [
        sum(sampling.scale(w) for w in weights if sampling.profile_this_interval())
        for _ in range(2_000)
    ]
    # Standard error of the mean of 2000 estimates: ~0.4 % of the total here.
    assert statistics.fmean(estimates) == pytest.approx(sum(weights), rel=0.015)


def test_every_weight_and_latency_count_is_scaled() -> None:
    drain = Drain(
        [StackSample(1, 1, "a", (), (), 3), StackSample(2, 2, "b", (), (), 5)],
        [LatencyBucket(1, "a", "vda", "read", 4096, 9)],
    )
    scaled = HostSampling(0.5).scale_drain(drain)
    assert [s.weight for s in scaled.samples] == [6, 10]
    assert [b.count for b in scaled.io_latency] == [18]
    assert HostSampling(1.0).scale_drain(drain) is drain


@pytest.mark.parametrize("probability", [0.0, -0.5, 1.5])
def test_probability_out_of_range_is_refused(probability: float, capsys) -> None:
    with pytest.raises(ValueError, match="host sampling probability"):
        HostSampling(probability)
    status = main(["agent", "--host-sampling", str(probability)])
    assert status == 2
    assert "--host-sampling must be in [0.001, 1]" in capsys.readouterr().err


def test_agent_ships_the_seeded_intervals_scaled_by_two(
    aggregator: Aggregator, native_binary: Path, tmp_path: Path
) -> None:
    require_ebpf()
    from fleetprof.node_agent.agent import Agent, AgentConfig
    from fleetprof.node_agent.samplers import SamplerOptions

    seed = 1234
    agent = Agent(
        AgentConfig(
            aggregator.address,
            "sampled-node",
            0.25,
            spool_dir=str(tmp_path / "spool"),
            sampling=SamplerOptions(frequency=99),
            host_sampling=0.5,
            host_sampling_seed=seed,
        )
    )
    # What the kernel counted each interval, seen as the agent drains it (the real drain).
    (sampler,) = agent._samplers
    counted: list[int] = []
    drain = sampler.drain

    def counting_drain() -> Drain:
        drained = drain()
        counted.append(sum(sample.weight for sample in drained.samples))
        return drained

    sampler.drain = counting_drain
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,))
    workload = workloads.start_native(native_binary, seconds=30)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while agent.stats["drains"] < 40 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
        workload.kill()
    # At p = 1/2 scaling draws nothing, so the seed replays the agent's interval choices.
    replay = random.Random(seed)
    shipped = [replay.random() < 0.5 for _ in counted]
    assert agent.stats["skipped"] == shipped.count(False) > 0
    rows = (
        aggregator.store.reader()
        .execute(
            "SELECT ts, sum(weight) FROM samples WHERE node = 'sampled-node' AND event = 'cpu' "
            "GROUP BY ts ORDER BY ts"
        )
        .fetchall()
    )
    # Each shipped interval weighs twice what was counted; skipped ones are not there.
    assert [weight for _, weight in rows] == [
        2 * weight for weight, ship in zip(counted, shipped, strict=True) if ship and weight
    ]
    assert sum(weight for _, weight in rows) == agent.stats["samples"]
    assert sum(counted) == agent.stats["drained"]
