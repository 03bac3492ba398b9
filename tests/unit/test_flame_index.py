"""Pruned flame trees (query/flame_index.py) against brute force, on a real DuckDB store."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from fleetprof.aggregator.storage import ProfileStore
from fleetprof.proto import lake, schema
from fleetprof.proto.stacks import StackRow, stack_id, stacks_table
from fleetprof.query.filters import SampleFilter
from fleetprof.query.flame import load_flame, load_flat
from fleetprof.query.flame_index import FocusNotFound
from fleetprof.query.flame_tree import FlatTree
from fleetprof.query.source import ConnectionSource

FramePath = tuple[str, ...]
NAMES = [f"f{i}" for i in range(30)]


def random_stacks(rng: random.Random, count: int) -> list[StackRow]:
    """Stacks sharing prefixes, as real call trees do, some of them narrow and deep."""
    grown: list[tuple[str, ...]] = [("main",)]
    while len(grown) < count:
        parent = rng.choice(grown)
        grown.append(parent[: rng.randint(1, len(parent))] + tuple(rng.choices(NAMES, k=3)))
    unique = sorted(set(grown))
    return [StackRow(s, ("app",) * len(s), ("native",) * len(s)) for s in unique]


class Store:
    """A real store the test appends to, read the way the aggregator's web UI reads it."""

    def __init__(self, path: Path) -> None:
        self.store = ProfileStore(path)
        self.sequence = 0
        self.samples: list[tuple[str, StackRow, int]] = []

    def add(self, rows: list[tuple[str, StackRow, int]]) -> None:
        self.sequence += 1
        samples = schema.samples_table(
            {
                "ts": [datetime.now(UTC)] * len(rows),
                "pid": [1] * len(rows),
                "tid": [1] * len(rows),
                "comm": [comm for comm, _, _ in rows],
                "event": ["cpu"] * len(rows),
                "stack_id": [stack_id(stack) for _, stack, _ in rows],
                "weight": [weight for _, _, weight in rows],
            }
        )
        stacks = stacks_table({stack_id(stack): stack for _, stack, _ in rows})
        self.store.append("agent", self.sequence, "node", samples, stacks)
        self.samples += rows

    def source(self) -> ConnectionSource:
        return ConnectionSource(self.store.reader(), identity=self.store.path)

    def brute_force(self) -> tuple[Counter[FramePath], Counter[FramePath]]:
        """Total and self weight per path of names below the root "all"."""
        totals: Counter[FramePath] = Counter({(): 0})
        selfs: Counter[FramePath] = Counter()
        for comm, stack, weight in self.samples:
            path = (comm, *stack.frames)
            for depth in range(len(path) + 1):
                totals[path[:depth]] += weight
            selfs[path] += weight
        return totals, selfs


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "profiles.duckdb")
    yield store
    store.store.close()


def paths(tree: FlatTree) -> dict[FramePath, tuple[int, int]]:
    """(total, self) per path of names below the root, checking the walk order."""
    found: dict[FramePath, tuple[int, int]] = {}
    path: list[str] = []
    for frame, depth, total, own in zip(
        tree.frame, tree.depth, tree.total, tree.self_weight, strict=True
    ):
        del path[depth:]
        path.append(tree.frames[frame][0])
        found[tuple(path[1:])] = (total, own)
    return found


def fill(store: Store, rng: random.Random, count: int) -> None:
    stacks = random_stacks(rng, count)
    store.add(
        [(rng.choice(("java", "python")), stack, rng.choice((1, 1, 2, 50))) for stack in stacks]
    )


def test_pruned_tree_keeps_exact_totals_of_every_wide_node(store: Store) -> None:
    rng = random.Random(1)
    fill(store, rng, 3_000)
    totals, selfs = store.brute_force()
    source = store.source()
    for fraction in (0.0, 1e-4, 1e-3, 0.05):
        tree = load_flat(source, SampleFilter(), fraction)
        shown = paths(tree)
        wide = {p for p, t in totals.items() if t > 0 and t >= fraction * totals[()]}
        assert set(shown) == wide, fraction
        assert shown == {p: (totals[p], selfs[p]) for p in wide}
        # the walk order is FlameNode.walk()'s, so the renderers draw what they drew
        exact = FlatTree.of(load_flame(source, SampleFilter()))
        kept = [i for i, t in enumerate(exact.total) if t >= fraction * totals[()]]
        assert [exact.frames[exact.frame[i]] for i in kept] == [
            tree.frames[frame] for frame in tree.frame
        ]


def test_focus_reaches_any_narrow_node_with_its_ancestors(store: Store) -> None:
    rng = random.Random(2)
    fill(store, rng, 2_000)
    totals, selfs = store.brute_force()
    source = store.source()
    fraction = 0.01
    whole = paths(load_flat(source, SampleFilter(), fraction))
    narrow = [p for p in totals if p not in whole and len(p) > 2]
    assert narrow
    for focus in rng.sample(narrow, 20):
        shown = paths(load_flat(source, SampleFilter(), fraction, focus))
        ancestors = {focus[:depth] for depth in range(len(focus))}
        below = {
            p
            for p, t in totals.items()
            if p[: len(focus)] == focus and t >= fraction * totals[focus]
        }
        assert set(shown) == ancestors | below
        assert shown == {p: (totals[p], selfs[p]) for p in shown}
    with pytest.raises(FocusNotFound):
        load_flat(source, SampleFilter(), fraction, ("java", "no such frame"))


def test_stacks_stored_later_join_the_cached_paths(store: Store) -> None:
    rng = random.Random(3)
    fill(store, rng, 500)
    load_flat(store.source(), SampleFilter(), 1e-3)  # caches the first stacks' paths
    fill(store, rng, 800)  # new stacks, and more weight on old ones
    fill(store, rng, 500)
    totals, selfs = store.brute_force()
    tree = load_flat(store.source(), SampleFilter(), 0.0)
    assert paths(tree) == {p: (t, selfs[p]) for p, t in totals.items()}
    java = paths(load_flat(store.source(), SampleFilter(comms=("java",)), 0.0))
    assert java[()][0] == totals[("java",)] and ("python",) not in java


# The sample_rows columns of earlier releases, which stored each row's labels in it.
WIDE_V1 = "ts, node, agent_id, pid, tid, comm, event, stack_id, weight"
WIDE_V2 = f"{WIDE_V1}, job, session_id, namespace, pod, container, flame_key"


@pytest.mark.parametrize("wide", [WIDE_V1, WIDE_V2], ids=["schema-1", "schema-2-flame-keys"])
def test_database_of_an_earlier_release_is_converted(store: Store, wide: str) -> None:
    """A database of an earlier release kept labels in every sample row (and before that,
    no flame_key): opening it moves them to label sets without losing a row or a label,
    and the same stacks stored after join the old ones in one tree."""
    rng = random.Random(4)
    fill(store, rng, 400)
    everything = "SELECT * EXCLUDE (flame_key) FROM samples ORDER BY ALL"
    before = store.store.reader().execute(everything).fetchall()
    store.store.close()
    conn = duckdb.connect(store.store.path)  # as the earlier release left it
    conn.execute(f"CREATE TABLE wide AS SELECT {wide} FROM live_samples")
    conn.execute("DROP TABLE sample_rows; DROP TABLE label_sets")
    conn.execute("ALTER TABLE wide RENAME TO sample_rows")
    conn.close()
    store.store = ProfileStore(store.store.path)
    reader = store.store.reader()
    assert reader.execute(everything).fetchall() == before
    stored = store.samples[:]
    store.add(stored)  # the same (process, stack) pairs again, with keys made at ingest
    totals, selfs = store.brute_force()
    assert paths(load_flat(store.source(), SampleFilter(), 0.0)) == {
        p: (t, selfs[p]) for p, t in totals.items()
    }
    keys = reader.execute(
        "SELECT count(*) FILTER (flame_key IS NULL), count(DISTINCT flame_key) FROM samples"
    )
    assert keys.fetchall() == [(0, len({(comm, stack) for comm, stack, _ in stored}))]
    # Keys made at ingest (numpy) and at conversion (SQL) are those lake files derive.
    derived = lake.DERIVED["samples"]["flame_key"]
    mismatched = f"SELECT count(*) FROM samples f WHERE f.flame_key <> {derived}"
    assert reader.execute(mismatched).fetchall() == [(0,)]
    label_sets = reader.execute("SELECT count(*) FROM label_sets").fetchall()
    assert label_sets == [(len({comm for comm, _, _ in stored}),)]
