"""Which aggregator a node ships to, when several share a fleet.

Rendezvous (highest random weight) hashing: every node scores every aggregator with a hash
of (node, aggregator) and takes the highest. Each node decides alone, with nothing shared
but the list, and the result is stable: removing an aggregator moves only the nodes it had
(each to its own next best), adding one takes over about 1/n of the nodes from the others.
A Kubernetes Service address is a single entry: the Service balances behind it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def parse_aggregators(text: str) -> list[str]:
    """The addresses of a comma-separated list (`a:7470,b:7470`), in order, without repeats."""
    addresses = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not addresses:
        raise ValueError("--aggregator needs at least one HOST:PORT")
    for address in addresses:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(
                f"bad aggregator address {address!r}: use HOST:PORT, a port from 1 to 65535"
            )
    return addresses


def _score(node: str, aggregator: str) -> int:
    digest = hashlib.blake2b(f"{node}\x1f{aggregator}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign(node: str, aggregators: Sequence[str]) -> str:
    """The aggregator of `node` among `aggregators` (the same answer on every machine)."""
    if not aggregators:
        raise ValueError("no aggregator to assign")
    # Ties are astronomically unlikely; the address breaks them so the order never matters.
    return max(aggregators, key=lambda address: (_score(node, address), address))


def assigned_aggregator(aggregator_list: str, node: str) -> str:
    """`--aggregator` as given (one address or a comma-separated list) → this node's one."""
    return assign(node, parse_aggregators(aggregator_list))
