"""Probabilistic host sampling, as in Google-Wide Profiling: each interval this host ships its
continuous-mode samples with probability p, their weights scaled by 1/p, so that sums over
hosts and over time stay unbiased while a fleet pays the symbolizing and shipping of only a
fraction p of its intervals. On-demand sessions are never subject to it.

Weights are integers (the `weight` BIGINT column): w/p is rounded stochastically, to
floor(w/p) + 1 with probability frac(w/p), else floor(w/p), whose expectation is exactly w/p.
"""

from __future__ import annotations

import random

from fleetprof.node_agent.samplers import Drain


class HostSampling:
    def __init__(self, probability: float = 1.0, rng: random.Random | None = None) -> None:
        if not 0 < probability <= 1:
            raise ValueError(f"host sampling probability must be in (0, 1], not {probability:g}")
        self.probability = probability
        self._rng = rng or random.Random()

    def profile_this_interval(self) -> bool:
        """Decide, once per interval, whether this host ships it."""
        return self.probability == 1 or self._rng.random() < self.probability

    def scale(self, weight: int) -> int:
        """weight / p as an integer whose expectation is weight / p."""
        whole, fraction = divmod(weight / self.probability, 1)
        # No draw for an exact quotient (any weight at p = 1 or 1/2): the interval decisions
        # are then the only draws, so a seeded generator replays them.
        return int(whole) + bool(fraction and self._rng.random() < fraction)

    def scale_drain(self, drain: Drain) -> Drain:
        """Every sample's weight and every latency bucket's count scaled by 1/p."""
        if self.probability == 1:
            return drain
        return Drain(
            [sample._replace(weight=self.scale(sample.weight)) for sample in drain.samples],
            [bucket._replace(count=self.scale(bucket.count)) for bucket in drain.io_latency],
        )
