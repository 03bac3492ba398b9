"""A prefix tree of every (process name, stack) the flame graphs of a database have read.

A flame graph used to build its whole merged tree in Python (1.4M nodes for 100k JVM
stacks), thirty times the cost of DuckDB's GROUP BY. Here each (process, stack) is walked
into a prefix tree once (numpy, one level at a time for all new stacks) and its leaf node
is kept. A graph then places its grouped weights at their leaves in the tree's pre-order,
so that each node's total is the difference of two cumulative sums, and descends from the
root only into the nodes wide enough to keep. A database stores each stack id once and
never changes it, so a cached leaf never goes stale.
"""

from __future__ import annotations

import itertools
import threading
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fleetprof.query.flame_tree import ROOT_NAME, FlatTree, gc_paused
from fleetprof.query.source import ProfileSource

# Past this many nodes (a few hundred MB) the tree starts over rather than grow forever.
MAX_NODES = 8_000_000
# Missing stacks are fetched by id up to this many (a SQL IN list), else by re-selecting.
MAX_LISTED_IDS = 5_000
PROCESS_KIND = "process"
_ROOT_KIND = "unknown"


class FocusNotFound(KeyError):
    """The focused path has no weight in the selection."""


@dataclass(frozen=True)
class Selected:
    """The grouped rows of one selection: one per (process name, stack id), by its
    `flame_key` (proto/lake.py)."""

    flame_keys: np.ndarray
    weights: np.ndarray
    # the selection's WHERE clause over samples, to fetch the stacks of many rows at once
    where: str
    # (flame_key, stack_id, comm) rows of the given keys (None: of every key selected)
    pairs: Callable[[Sequence[int] | None], pa.Table]


@dataclass(frozen=True)
class _Layout:
    """Where each node is in a depth-first walk of the whole tree (children by name),
    how many nodes its subtree holds, its children (children[child_start[i] :
    child_end[i]]) and its (name, kind) as an index of `frames`."""

    preorder: np.ndarray
    size: np.ndarray
    children: np.ndarray
    child_start: np.ndarray
    child_end: np.ndarray
    frame: np.ndarray
    frames: list[tuple[str, str]]

    @classmethod
    def of(
        cls,
        parent: np.ndarray,
        depth: np.ndarray,
        name_rank: np.ndarray,
        frame_keys: np.ndarray,
        frame_of_key: Callable[[int], tuple[str, str]],
    ) -> _Layout:
        """`name_rank`: per node, its name's place in sorted order (siblings go by it);
        `frame_keys`: per node, an integer for its (name, kind), which `frame_of_key` gives."""
        parent = parent.astype(np.int64)
        count = len(parent)
        children = np.argsort(parent, kind="stable")[1:]  # by parent, ids ascending; no root
        child_end = np.cumsum(np.bincount(parent[1:], minlength=count))
        child_start = child_end - np.bincount(parent[1:], minlength=count)
        # vectorized per depth: sizes from the deepest level up, positions from the top down
        by_depth = np.argsort(depth, kind="stable")
        bounds = np.searchsorted(depth[by_depth], np.arange(int(depth.max()) + 2))
        levels = [by_depth[bounds[d] : bounds[d + 1]] for d in range(1, len(bounds) - 1)]
        size = np.ones(count, np.int64)
        for level in reversed(levels):
            np.add.at(size, parent[level], size[level])
        preorder = np.zeros(count, np.int64)
        for level in levels:
            # siblings one after another in name order, as FlameNode.walk() has them: each
            # starts where the previous one's subtree ends
            level = level[np.lexsort((name_rank[level], parent[level]))]
            parents, sizes = parent[level], size[level]
            before = np.cumsum(sizes) - sizes
            heads = np.flatnonzero(np.diff(parents, prepend=-1))
            before -= np.repeat(before[heads], np.diff(heads, append=len(level)))
            preorder[level] = preorder[parents] + 1 + before
        keys, frame = np.unique(frame_keys, return_inverse=True)
        frames = [frame_of_key(key) for key in keys.tolist()]
        return cls(preorder, size, children, child_start, child_end, frame, frames)


class PathIndex:
    """Node 0 is the root "all", its children the process names, theirs the frames; a
    node's id is always above its parent's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        self._names: list[str] = [ROOT_NAME]
        self._name_ids: dict[str, int] = {ROOT_NAME: 0}
        self._kinds: list[str] = [_ROOT_KIND]
        self._kind_ids: dict[str, int] = {_ROOT_KIND: 0}
        self._parent = array("i", [-1])
        self._name = array("i", [0])
        self._kind = array("i", [0])
        self._depth = array("i", [0])
        self._layout_cache: _Layout | None = None
        # children: node ids by their key, parent << 32 | name id; keys sorted
        self._child_keys = np.zeros(0, np.int64)
        self._child_ids = np.zeros(0, np.int64)
        # flame_key -> the node of its stack's leaf frame, under its process name
        self._leaves: dict[int, int] = {}
        self._known: tuple[pa.Array, np.ndarray] | None = None  # _leaves as arrays

    def merged(
        self,
        source: ProfileSource,
        selected: Selected,
        min_fraction: float = 0.0,
        focus: Sequence[str] = (),
    ) -> FlatTree:
        """The merged tree of `selected`.

        `min_fraction` 0 keeps every node: the exact tree. Above 0, only the nodes of at
        least `min_fraction` of the focused node's total are kept. `focus` is the path of
        names from the root to that node (the root itself when empty); with one, the tree
        holds the focused node's subtree and its ancestors only. Every node kept has its
        exact total and self weight, so the weight of its elided children is
        `total - self_weight - sum(kept children's totals)`.
        """
        with self._lock, gc_paused():
            if len(self._parent) > MAX_NODES:
                self._clear()
            leaves = self._leaf_nodes(source, selected)
            found = leaves >= 0  # a stack id without a stack row is dropped, as a JOIN does
            return self._tree(leaves[found], selected.weights[found], min_fraction, focus)

    def _leaf_nodes(self, source: ProfileSource, selected: Selected) -> np.ndarray:
        """Per selected row, the node of its stack's leaf frame (-1 if it has no stack),
        walking the stacks the index lacks into the tree first."""
        leaves = self._lookup(selected.flame_keys)
        lacking = leaves < 0
        if lacking.any():
            self._add(source, selected, selected.flame_keys[lacking])
            leaves[lacking] = self._lookup(selected.flame_keys[lacking])
        return leaves

    def _lookup(self, keys: np.ndarray) -> np.ndarray:
        """The leaf nodes of flame keys; -1 for those not walked yet."""
        if self._known is None:
            self._known = (
                pa.array(np.fromiter(self._leaves, np.int64, len(self._leaves))),
                np.fromiter(self._leaves.values(), np.int64, len(self._leaves)),
            )
        known, leaves = self._known
        found = pc.index_in(pa.array(keys), value_set=known).fill_null(-1).to_numpy()
        return np.where(found >= 0, leaves[np.maximum(found, 0)] if len(leaves) else -1, -1)

    def _add(self, source: ProfileSource, selected: Selected, missing: np.ndarray) -> None:
        """Fetch the process names and stacks of flame keys and walk them into the tree."""
        listed = len(missing) <= MAX_LISTED_IDS
        pairs = selected.pairs(missing.tolist() if listed else None)
        # one row per key (from a fleet, each part names its keys)
        pairs = pairs.take(np.unique(pairs["flame_key"].to_numpy(), return_index=True)[1])
        if not listed:
            pairs = pairs.filter(pc.is_in(pairs["flame_key"], value_set=pa.array(missing)))
        wanted = pc.unique(pairs["stack_id"])
        if len(wanted) <= MAX_LISTED_IDS:
            chosen = ", ".join(map(str, wanted.to_pylist())) or "NULL"
        else:
            chosen = f"SELECT DISTINCT stack_id FROM samples WHERE {selected.where}"
        sql = f"SELECT stack_id, frames, kinds FROM stacks WHERE stack_id IN ({chosen})"
        with source.stream(sql) as reader:
            table = reader.read_all()
        if not table.num_rows:
            return
        frames = pa.concat_arrays(table["frames"].chunks)
        names = _encoded(frames, self._names, self._name_ids)
        kinds = _encoded(pa.concat_arrays(table["kinds"].chunks), self._kinds, self._kind_ids)
        offsets = frames.offsets.to_numpy() - frames.offsets[0].as_py()
        fetched = table["stack_id"].to_numpy()
        by_id = np.argsort(fetched)
        ids = pairs["stack_id"].to_numpy()
        at = np.minimum(np.searchsorted(fetched, ids, sorter=by_id), len(fetched) - 1)
        found = fetched[by_id[at]] == ids  # stacks without a stack row are left out
        rows = by_id[at[found]]
        comm = pairs["comm"].combine_chunks().filter(pa.array(found))
        leaves = self._walk(
            _encoded(comm, self._names, self._name_ids),
            offsets[rows],
            offsets[rows + 1] - offsets[rows],
            names,
            kinds,
        )
        keys = pairs["flame_key"].to_numpy()[found]
        self._leaves.update(zip(keys.tolist(), leaves.tolist(), strict=True))
        self._known = None

    def _walk(
        self,
        comm_names: np.ndarray,
        starts: np.ndarray,
        lengths: np.ndarray,
        names: np.ndarray,
        kinds: np.ndarray,
    ) -> np.ndarray:
        """Walk the paths of new rows into the tree, one level at a time for all of them,
        making the nodes it lacks: the process name `comm_names[r]` at depth 1, then the
        frames `names[starts[r] : starts[r] + lengths[r]]` (`kinds` parallel). Returns
        each row's last node, its leaf."""
        path_lengths = lengths + 1
        process = _id(PROCESS_KIND, self._kinds, self._kind_ids)
        nodes = np.zeros(len(starts), np.int64)  # each row's node at the level above
        alive = np.arange(len(starts))
        # A key made at one level (its parent a level up) is never looked up at another,
        # so the sorted keys take the new ones once, at the end.
        added_keys, added_ids = [self._child_keys], [self._child_ids]
        for depth in itertools.count(1):
            alive = alive[path_lengths[alive] >= depth]
            if not len(alive):
                break
            if depth == 1:
                level_names, level_kinds = comm_names, np.full(len(alive), process)
            else:
                at = starts[alive] + depth - 2
                level_names, level_kinds = names[at], kinds[at]
            keys = nodes[alive] << 32 | level_names
            distinct, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
            ids = self._children(distinct)
            new = ids < 0
            ids[new] = np.arange(len(self._parent), len(self._parent) + int(new.sum()))
            added_keys.append(distinct[new])
            added_ids.append(ids[new])
            self._parent.frombytes((distinct[new] >> 32).astype(np.int32).tobytes())
            self._name.frombytes((distinct[new] & 0xFFFFFFFF).astype(np.int32).tobytes())
            self._kind.frombytes(level_kinds[first[new]].astype(np.int32).tobytes())
            self._depth.frombytes(np.full(int(new.sum()), depth, np.int32).tobytes())
            nodes[alive] = ids[inverse]
        keys, ids = np.concatenate(added_keys), np.concatenate(added_ids)
        order = np.argsort(keys, kind="stable")
        self._child_keys, self._child_ids = keys[order], ids[order]
        return nodes

    def _tree(
        self, leaves: np.ndarray, weights: np.ndarray, min_fraction: float, focus: Sequence[str]
    ) -> FlatTree:
        layout = self._layout()
        # Weights by the pre-order position of the rows' leaves, summed up to each
        # position: a node's subtree is a range of positions, so its total is the
        # difference of two cumulative weights.
        cumulative = np.zeros(len(layout.size) + 1, np.int64)
        np.add.at(cumulative, layout.preorder[leaves] + 1, weights)
        np.cumsum(cumulative, out=cumulative)

        def weight_in(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
            """The weight of the rows whose leaf is at a position in [lo, hi)."""
            return cumulative[hi] - cumulative[lo]

        total = int(cumulative[-1])
        kept_ids, kept_totals = [np.zeros(1, np.int64)], [np.array([total], np.int64)]
        focus_ids = self._focus_ids(focus)
        threshold = max(1.0, min_fraction * total)
        frontier = kept_ids[0] if total else kept_ids[0][:0]
        # Level by level: the children of the nodes kept at the level above, kept when
        # wide enough (on the focused path: only the focused path's node).
        for depth in itertools.count(1):
            if not len(frontier):
                break
            counts = layout.child_end[frontier] - layout.child_start[frontier]
            firsts = np.repeat(layout.child_start[frontier] - np.cumsum(counts) + counts, counts)
            children = layout.children[firsts + np.arange(len(firsts))]
            first = layout.preorder[children]
            sums = weight_in(first, first + layout.size[children])
            if depth <= len(focus_ids):
                keep = (children == focus_ids[depth - 1]) & (sums > 0)
                if depth == len(focus_ids) and keep.any():
                    threshold = max(1.0, min_fraction * int(sums[keep][0]))
            else:
                keep = sums >= threshold
            frontier = children[keep]
            kept_ids.append(frontier)
            kept_totals.append(sums[keep])
        if focus_ids and (len(kept_ids) <= len(focus_ids) or not len(kept_ids[len(focus_ids)])):
            raise FocusNotFound(list(focus))
        ids = np.concatenate(kept_ids)
        first = layout.preorder[ids]
        walk = np.argsort(first)  # pre-order, children by name: FlameNode.walk()'s order
        ids, first, totals = ids[walk], first[walk], np.concatenate(kept_totals)[walk]
        # self weight: the weight of the rows whose path ends at the node
        selfs = weight_in(first, first + 1)
        # the frames the kept nodes show, numbered anew in the tree's order of frames
        frame = layout.frame[ids]
        shown = np.zeros(len(layout.frames), bool)
        shown[frame] = True
        number = np.cumsum(shown) - 1
        return FlatTree(
            [layout.frames[i] for i in np.flatnonzero(shown).tolist()],
            number[frame].tolist(),
            np.frombuffer(self._depth, np.int32)[ids].tolist(),
            totals.tolist(),
            selfs.tolist(),
        )

    def _layout(self) -> _Layout:
        """The tree's pre-order and children arrays, recomputed after nodes were added."""
        if self._layout_cache is None or len(self._layout_cache.size) != len(self._parent):
            rank = np.empty(len(self._names), np.int64)
            rank[sorted(range(len(self._names)), key=self._names.__getitem__)] = np.arange(
                len(self._names)
            )
            names = np.frombuffer(self._name, np.int32)
            self._layout_cache = _Layout.of(
                np.frombuffer(self._parent, np.int32),
                np.frombuffer(self._depth, np.int32),
                rank[names],
                names.astype(np.int64) << 32 | np.frombuffer(self._kind, np.int32),
                lambda key: (self._names[key >> 32], self._kinds[key & 0xFFFFFFFF]),
            )
        return self._layout_cache

    def _children(self, keys: np.ndarray) -> np.ndarray:
        """The node ids of `keys` (parent << 32 | name id), -1 where there is none."""
        if not len(self._child_keys):
            return np.full(len(keys), -1, np.int64)
        at = np.minimum(np.searchsorted(self._child_keys, keys), len(self._child_keys) - 1)
        return np.where(self._child_keys[at] == keys, self._child_ids[at], -1)

    def _focus_ids(self, focus: Sequence[str]) -> list[int]:
        ids, node = [], 0
        for name in focus:
            name_id = self._name_ids.get(name)
            key = np.array([node << 32 | (name_id or 0)], np.int64)
            child = -1 if name_id is None else int(self._children(key)[0])
            if child < 0:
                raise FocusNotFound(list(focus))
            ids.append(node := child)
        return ids


def _id(value: str, values: list[str], ids: dict[str, int]) -> int:
    found = ids.get(value)
    if found is None:
        found = ids[value] = len(values)
        values.append(value)
    return found


def _encoded(strings: pa.Array, values: list[str], ids: dict[str, int]) -> np.ndarray:
    """Strings (of a list<string> array: flattened) as ids of `values` (each distinct
    string looked up once: a stack's frames are mostly names thousands of others share)."""
    if isinstance(strings, pa.ListArray):
        strings = strings.flatten()
    encoded = pc.dictionary_encode(strings)
    mapping = np.array(
        [_id(value, values, ids) for value in encoded.dictionary.to_pylist()], np.int64
    )
    return mapping[encoded.indices.to_numpy(zero_copy_only=False)]
