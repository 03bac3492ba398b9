"""Who may write what: agent ids bound to their node, sequences to an agent incarnation.

A credential (proto/security.py NodeGrant) says which nodes a caller may write. An agent id
belongs to the node its first stored batch named: a batch of it for another node is refused,
whoever sends it. Sequences count within an incarnation (a random value each agent process
picks), so batches someone else sends under an agent's id, in an incarnation of its own,
never make the real agent's batches "duplicates"; and a sequence far past the last stored
one of its incarnation is refused, so even a sender that knows the incarnation cannot claim
the agent's future. docs/security.md has the threat model.
"""

from __future__ import annotations

import functools

import grpc

from fleetprof.aggregator.storage import ProfileStore
from fleetprof.proto.security import IngestDenied, NodeGrant

# How far past the last stored sequence of its incarnation a batch may be: ~28 h of an
# agent's batches at the default 10 s interval, spooled while the aggregator was away.
# Past it the agent starts a new incarnation (node_agent/shipper.py).
MAX_SEQUENCE_JUMP = 10_000


@functools.lru_cache(maxsize=4096)
def _allows(grant: NodeGrant, node: str) -> bool:
    """grant.allows(node), an fnmatch per pattern, once per credential and node."""
    return grant.allows(node)


class IngestGuard:
    """Checks every batch's sender against the history of its agent id (ProfileStore's
    agent_history, in memory); thread-safe."""

    def __init__(self, store: ProfileStore) -> None:
        self._store = store

    def admit(
        self, grant: NodeGrant, agent_id: str, node: str, incarnation: str, sequence: int
    ) -> None:
        """Raise IngestDenied unless `grant` may write this batch."""
        if not _allows(grant, node):
            raise IngestDenied(
                grpc.StatusCode.PERMISSION_DENIED, f"{grant.name} may not write node {node!r}"
            )
        bound, last = self._store.agent_history(agent_id, incarnation)
        if bound is not None and bound != node:
            raise IngestDenied(
                grpc.StatusCode.PERMISSION_DENIED,
                f"agent {agent_id!r} writes node {bound!r}, not {node!r}",
            )
        if sequence > last + MAX_SEQUENCE_JUMP:
            raise IngestDenied(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"sequence {sequence} is more than {MAX_SEQUENCE_JUMP} past the last stored "
                f"({last}) of this agent incarnation: start a new incarnation",
            )
