"""What ingested_batches says of each agent, held in memory: the node an agent id's batches
were stored for, and the last sequence stored of each of its incarnations.

IngestGuard asks it for every batch. Read from the table, each agent's first batch after a
start cost a query (1.4 ms with a few hundred batches stored, more as the table grows), and
a fleet's agents all send a first batch when the aggregator starts. The table is read once
at open instead and every commit adds to it, so an agent not held has stored nothing: no
query. Past MAX_HELD incarnations the least recently used are dropped, and those not held
are read from the table again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import duckdb

# Agent incarnations held (~200 bytes each); a fleet of 10k agents restarting daily for a
# week of retention is 70k.
MAX_HELD = 100_000


class AgentHistory:
    """Thread-safe; incarnations are incarnation_key() values, as stored."""

    def __init__(self, db: duckdb.DuckDBPyConnection) -> None:
        self._db = db
        self._lock = threading.Lock()
        self._nodes: OrderedDict[str, str] = OrderedDict()
        self._last: OrderedDict[tuple[str, int], int] = OrderedDict()
        cur = db.cursor()
        try:
            stored = cur.execute(
                "SELECT agent_id, incarnation, any_value(node), max(sequence) "
                f"FROM ingested_batches GROUP BY agent_id, incarnation LIMIT {MAX_HELD + 1}"
            ).fetchall()
        finally:
            cur.close()
        # Whether every agent incarnation stored is held: one not held stored nothing then.
        self._complete = len(stored) <= MAX_HELD
        for agent_id, incarnation, node, last in stored[:MAX_HELD]:
            self.record(agent_id, node, incarnation, last)

    def lookup(self, agent_id: str, incarnation: int) -> tuple[str | None, int]:
        """The node the agent's batches were stored for (None: none stored), and the last
        sequence stored of the incarnation (0: none)."""
        with self._lock:
            node = self._nodes.get(agent_id)
            last = self._last.get((agent_id, incarnation))
            if node is not None and last is not None:
                self._nodes.move_to_end(agent_id)
                self._last.move_to_end((agent_id, incarnation))
                return node, last
            if self._complete:
                return node, last or 0
        node, last = self._read(agent_id, incarnation)
        if node is not None:
            self.record(agent_id, node, incarnation, last)
        return node, last

    def record(self, agent_id: str, node: str, incarnation: int, sequence: int) -> None:
        """A batch stored (committed) for `node` under this agent incarnation."""
        with self._lock:
            self._hold(self._nodes, agent_id, node)
            key = (agent_id, incarnation)
            self._hold(self._last, key, max(sequence, self._last.get(key, 0)))

    def _hold(self, held: OrderedDict, key: object, value: object) -> None:
        held[key] = value
        held.move_to_end(key)
        if len(held) > MAX_HELD:
            held.popitem(last=False)
            self._complete = False

    def _read(self, agent_id: str, incarnation: int) -> tuple[str | None, int]:
        cur = self._db.cursor()
        try:
            node, last = cur.execute(
                "SELECT any_value(node), coalesce(max(sequence) FILTER "
                "(WHERE incarnation = $incarnation), 0) FROM ingested_batches "
                "WHERE agent_id = $agent",
                {"agent": agent_id, "incarnation": incarnation},
            ).fetchone()
            return node, int(last)
        finally:
            cur.close()
