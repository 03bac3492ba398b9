"""Agents split over several aggregators by rendezvous hashing of their node names."""

from __future__ import annotations

from collections import Counter

import pytest

from fleetprof.node_agent.assignment import assign, assigned_aggregator, parse_aggregators

AGGREGATORS = [f"agg-{i}.fleet:7470" for i in range(5)]
NODES = [f"ip-10-0-{i // 256}-{i % 256}.ec2.internal" for i in range(10_000)]


def test_every_node_gets_the_same_aggregator_whatever_the_list_order() -> None:
    shuffled = AGGREGATORS[2:] + AGGREGATORS[:2]
    for node in NODES[:500]:
        assert assign(node, AGGREGATORS) == assign(node, shuffled)


def test_balance_over_five_aggregators() -> None:
    counts = Counter(assign(node, AGGREGATORS) for node in NODES)
    assert set(counts) == set(AGGREGATORS)
    # 2,000 expected each; a binomial's standard deviation here is 40: 10% is 5 sigma.
    assert all(1_800 <= n <= 2_200 for n in counts.values()), counts


def test_removing_an_aggregator_moves_only_its_own_nodes() -> None:
    before = {node: assign(node, AGGREGATORS) for node in NODES}
    gone = AGGREGATORS[3]
    remaining = [a for a in AGGREGATORS if a != gone]
    after = {node: assign(node, remaining) for node in NODES}
    moved = {node for node in NODES if before[node] != after[node]}
    assert moved == {node for node in NODES if before[node] == gone}
    # and its nodes spread over all the others, not onto one neighbour
    assert set(Counter(after[node] for node in moved)) == set(remaining)


def test_adding_an_aggregator_takes_nodes_only_for_itself() -> None:
    before = {node: assign(node, AGGREGATORS) for node in NODES}
    grown = [*AGGREGATORS, "agg-5.fleet:7470"]
    after = {node: assign(node, grown) for node in NODES}
    moved = [node for node in NODES if before[node] != after[node]]
    assert all(after[node] == "agg-5.fleet:7470" for node in moved)
    assert 1_400 <= len(moved) <= 1_950  # about a sixth of 10,000


def test_one_address_is_used_as_given() -> None:
    # a Kubernetes Service: one entry, balanced by the Service itself
    service = "fleetprof-aggregator.profiling.svc:7470"
    assert assigned_aggregator(service, "any-node") == service


def test_lists_are_parsed_and_bad_ones_refused() -> None:
    assert parse_aggregators(" a:1, b:2 ,a:1,[::1]:3") == ["a:1", "b:2", "[::1]:3"]
    for bad, message in ((",", "at least one"), ("a:1,b", "bad aggregator address 'b'")):
        with pytest.raises(ValueError, match=message):
            parse_aggregators(bad)
