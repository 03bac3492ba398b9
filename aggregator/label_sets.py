"""Sample labels stored once per distinct set (table label_sets), rows referring to it by
number: appending nine strings per sample row cost DuckDB five times what the rest of the
row does. A batch has a few label sets (about one per process), found by Arrow's hash
grouping before the write lock; numbering them is a dictionary lookup per set under it.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fleetprof.proto import lake

# The columns of `samples` kept in label_sets: the batch's origin, then the row's own.
ORIGIN = ("node", "agent_id")
ROW_LABELS = ("comm", "event", "job", "session_id", "namespace", "pod", "container")
LABELS = ORIGIN + ROW_LABELS
# Values of LABELS, in order.
LabelSet = tuple[str | None, ...]
# Process names whose COMM_KEY is remembered (a few hundred in a real fleet).
MAX_COMM_KEYS = 100_000


@dataclass(frozen=True, eq=False)
class RowLabels:
    """A batch's SAMPLES rows grouped by their ROW_LABELS: the validator looks at the
    distinct values (validate.check_text), the store numbers them (LabelSets.label)."""

    values: dict[str, list[str | None]]  # per label, its value in each group
    rows: list[int]  # rows per group
    group_of_row: np.ndarray  # per row, the index of its group


def group_labels(samples: pa.Table) -> RowLabels:
    """Group SAMPLES rows by their ROW_LABELS (Arrow's hash grouping). Raises
    UnicodeDecodeError for a label that is not UTF-8."""
    count = samples.num_rows
    grouped = (
        samples.select(ROW_LABELS)
        .append_column("row", pa.array(np.arange(count, dtype=np.int64)))
        .group_by(list(ROW_LABELS), use_threads=False)
        .aggregate([("row", "list")])
    )
    members = grouped["row_list"].combine_chunks()
    rows = pc.list_value_length(members).to_numpy()
    group_of_row = np.empty(count, np.int64)
    group_of_row[members.flatten().to_numpy()] = np.repeat(np.arange(grouped.num_rows), rows)
    values = {name: grouped[name].to_pylist() for name in ROW_LABELS}
    return RowLabels(values, rows.tolist(), group_of_row)


@dataclass(frozen=True, eq=False)
class LabelledRows:
    """A batch's sample rows as stored, but for the number of their label set."""

    rows: pa.Table  # sample_rows columns but label_set
    sets: list[LabelSet]  # the distinct label sets of the rows
    set_of_row: np.ndarray  # per row, the index of its set in `sets`


class LabelSets:
    """The numbers of the label sets stored, as committed; one per ProfileStore."""

    def __init__(self, cur: duckdb.DuckDBPyConnection) -> None:
        self._numbers: dict[LabelSet, int] = {}
        self._comm_keys: dict[str, int] = {}
        self._comm_keys_lock = threading.Lock()
        self.reload(cur)

    def reload(self, cur: duckdb.DuckDBPyConnection) -> None:
        """Read the stored sets (at open, and after some were deleted)."""
        stored = cur.execute(f"SELECT label_set, {', '.join(LABELS)} FROM label_sets").fetchall()
        self._numbers = {_interned(labels): number for number, *labels in stored}
        self._next = max(self._numbers.values(), default=0) + 1

    def label(
        self,
        cur: duckdb.DuckDBPyConnection,
        samples: pa.Table,
        node: str,
        agent_id: str,
        grouped: RowLabels | None = None,
    ) -> LabelledRows:
        """Split a batch's SAMPLES rows into rows and label sets, with each row's flame_key
        (proto/lake.py DERIVED) made from its set's COMM_KEY; `grouped`: the rows'
        group_labels, when the validator made them. Needs no lock."""
        if grouped is None:
            grouped = group_labels(samples)
        own = zip(*(grouped.values[name] for name in ROW_LABELS), strict=True)
        sets = [_interned((node, agent_id, *values)) for values in own]
        comm_keys = self._comm_key_array(cur, [labels[LABELS.index("comm")] for labels in sets])
        set_of_row = grouped.group_of_row
        flame_keys = np.bitwise_xor(samples["stack_id"].to_numpy(), comm_keys[set_of_row])
        rows = samples.select(["ts", "pid", "tid", "stack_id", "weight"]).append_column(
            "flame_key", pa.array(flame_keys, pa.int64())
        )
        return LabelledRows(rows, sets, set_of_row)

    def number(
        self, cur: duckdb.DuckDBPyConnection, batches: Iterable[LabelledRows]
    ) -> tuple[pa.Table, dict[LabelSet, int]]:
        """The rows of `batches` with their label_set, storing the sets new to the database
        in the caller's transaction (under the write lock); the new sets, for `committed`."""
        new: dict[LabelSet, int] = {}
        tables, numbers = [], []
        for batch in batches:
            ids = np.empty(len(batch.sets), np.int32)
            for i, labels in enumerate(batch.sets):
                found = self._numbers.get(labels, new.get(labels))
                if found is None:
                    found = new[labels] = self._next + len(new)
                ids[i] = found
            tables.append(batch.rows)
            numbers.append(ids[batch.set_of_row])
        if new:
            columns = list(zip(*new, strict=True))
            cur.register(
                "new_label_sets",
                pa.table(
                    {
                        "label_set": pa.array(list(new.values()), pa.int32()),
                        **{
                            name: pa.array(values, pa.string())
                            for name, values in zip(LABELS, columns, strict=True)
                        },
                    }
                ),
            )
            cur.execute("INSERT INTO label_sets BY NAME SELECT * FROM new_label_sets")
            cur.unregister("new_label_sets")
        rows = pa.concat_tables(tables).append_column(
            "label_set", pa.array(np.concatenate(numbers), pa.int32())
        )
        return rows, new

    def committed(self, new: dict[LabelSet, int]) -> None:
        """The transaction that stored `new` committed: later batches use their numbers."""
        self._numbers.update(new)
        self._next += len(new)

    def _comm_key_array(self, cur: duckdb.DuckDBPyConnection, comms: list[str]) -> np.ndarray:
        """lake.COMM_KEY of each process name, as DuckDB computes it for lake files."""
        with self._comm_keys_lock:
            known = {comm: self._comm_keys.get(comm) for comm in comms}
        unknown = sorted(comm for comm, key in known.items() if key is None)
        if unknown:
            found = dict(
                cur.execute(
                    f"SELECT f.comm, {lake.COMM_KEY} FROM unnest($comms::VARCHAR[]) f(comm)",
                    {"comms": unknown},
                ).fetchall()
            )
            known.update(found)
            with self._comm_keys_lock:
                if len(self._comm_keys) + len(found) > MAX_COMM_KEYS:
                    self._comm_keys.clear()
                self._comm_keys.update(found)
        return np.array([known[comm] for comm in comms], np.int64)


def _interned(labels: Iterable[str | None]) -> LabelSet:
    """The labels with each string shared by every set holding it: a fleet's sets repeat
    nodes, jobs and namespaces (300k sets took 79 MB so, 197 MB with a copy each)."""
    return tuple(None if label is None else sys.intern(label) for label in labels)


def convert_wide_rows(cur: duckdb.DuckDBPyConnection, table: str) -> None:
    """Store the rows of `table`, sample rows of an earlier release with their labels in
    their own columns, in sample_rows and label_sets (empty before)."""
    labels = ", ".join(LABELS)
    cur.execute(
        f"INSERT INTO label_sets SELECT row_number() OVER (), * "
        f"FROM (SELECT DISTINCT {labels} FROM {table})"
    )
    same = " AND ".join(f"f.{name} IS NOT DISTINCT FROM l.{name}" for name in LABELS)
    cur.execute(
        f"""
        INSERT INTO sample_rows
        SELECT f.ts, f.pid, f.tid, f.stack_id, f.weight, {lake.DERIVED["samples"]["flame_key"]},
               l.label_set
        FROM {table} f JOIN label_sets l ON {same}
        """
    )
