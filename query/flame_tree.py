"""The merged call tree behind every flame-graph renderer.

SQL has already merged identical stacks, so `build_tree` sees one row per distinct
stack and never a row per sample.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import compress, count
from operator import ne

ROOT_NAME = "all"

StackRow = tuple[Sequence[str], Sequence[str], int]


@dataclass(slots=True)
class FlameNode:
    """One frame of the merged tree; `total` includes `self_weight` and all descendants.

    `kind` is one of "kernel", "native", "jit", "interpreted", "python", "lost", "unknown"
    (renderers draw anything else like "unknown"); the root is "all" of kind "unknown".

    `children` is keyed by frame name alone, like flamegraph.pl: the kind is a colour hint
    and symbolization gives a name one kind, so keying by name keeps the folded output
    (which has no kinds) at one line per path. The first stack that creates a node sets its
    kind.
    """

    name: str
    kind: str
    total: int = 0
    self_weight: int = 0
    children: dict[str, FlameNode] = field(default_factory=dict)

    def walk(self) -> Iterator[tuple[int, int, FlameNode]]:
        """Yield `(depth, offset, node)` in pre-order, children in name order.

        `offset` is the weight left of the node in flame-graph layout (children start at
        their parent's left edge, self weight is the gap on the right). Children with zero
        weight are skipped with their subtrees; the offsets of the others don't move.
        """
        stack = [(0, 0, self)]
        while stack:
            depth, offset, node = stack.pop()
            yield depth, offset, node
            children = node.children
            if len(children) == 1:
                # most nodes of deep trees: no sort, no list (a third of the walk's time)
                (child,) = children.values()
                if child.total > 0:
                    stack.append((depth + 1, offset, child))
                continue
            shown = []
            for name in sorted(children):
                child = children[name]
                if child.total > 0:
                    shown.append((depth + 1, offset, child))
                offset += child.total
            # reversed so they pop in name order
            stack.extend(reversed(shown))


def build_tree(rows: Iterable[StackRow]) -> FlameNode:
    """Merge `(frames root→leaf, kinds parallel to frames, weight)` rows into a tree whose
    root is "all".

    Each row should be one distinct stack with its summed weight (repeats still merge
    correctly). Any row order works, but rows ordered by frames (`ORDER BY frames` in SQL)
    build two to three times faster, since each row then only walks the frames that differ
    from the previous row. Zero weights are ignored; negative weights raise `ValueError`.
    """
    with gc_paused():
        return _build(rows)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Without the cyclic GC. A tree has no reference cycles, so the GC can only waste time
    while one is built or walked, and it does: repeated full collections over ~1M young
    nodes doubled the build time, and tripled the web UI's walk to a JSON payload."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if gc_was_enabled:
            gc.enable()


def _build(rows: Iterable[StackRow]) -> FlameNode:
    root = FlameNode(ROOT_NAME, "unknown", 0, 0, {})
    # path[d] is the depth-d node of the previous stack; pending[d] is the weight added
    # under path[d] that is not yet in its total. Totals are flushed when a node leaves the
    # path, so a frame shared with the previous stack costs one string comparison instead
    # of a dict lookup plus a total update.
    path = [root]
    pending = [0]
    prev: Sequence[str] = ()
    for frames, kinds, weight in rows:
        if weight <= 0:
            if weight < 0:
                raise ValueError(f"negative stack weight {weight} for {list(frames)!r}")
            continue
        # length of the common prefix with the previous stack, compared in C
        same = next(compress(count(), map(ne, frames, prev)), min(len(frames), len(prev)))
        _flush(path, pending, same)
        node = path[same]
        for i in range(same, len(frames)):
            name = frames[i]
            child = node.children.get(name)
            if child is None:
                child = node.children[name] = FlameNode(name, kinds[i], 0, 0, {})
            path.append(child)
            pending.append(0)
            node = child
        node.self_weight += weight
        pending[-1] += weight
        prev = tuple(frames)  # a copy: a row source may reuse one list for every row
    _flush(path, pending, 0)
    root.total += pending[0]
    return root


def _flush(path: list[FlameNode], pending: list[int], keep: int) -> None:
    """Pop the path down to depth `keep`, moving each popped node's pending weight into its
    total and on to its parent's pending weight."""
    for depth in range(len(path) - 1, keep, -1):
        weight = pending[depth]
        path[depth].total += weight
        pending[depth - 1] += weight
    del path[keep + 1 :]
    del pending[keep + 1 :]


@dataclass(frozen=True)
class FlatTree:
    """A merged tree as columns in `FlameNode.walk()` order (pre-order, children in name
    order): what the graph renderers draw. `frames` lists each distinct (name, kind) once
    and `frame[i]` is node i's index in it; node 0 is the root.

    A pruned tree (query/flame_index.py) leaves out the nodes too narrow to draw: every
    node kept has its exact total and self weight, and its total exceeds its self weight
    plus its kept children's totals by the weight of the children left out.
    """

    frames: list[tuple[str, str]]
    frame: list[int]
    depth: list[int]
    total: list[int]
    self_weight: list[int]

    @classmethod
    def of(cls, root: FlameNode) -> FlatTree:
        frame_ids: dict[tuple[str, str], int] = {}
        frame, depths, totals, selfs = [], [], [], []
        with gc_paused():
            for depth, _, node in root.walk():
                frame.append(frame_ids.setdefault((node.name, node.kind), len(frame_ids)))
                depths.append(depth)
                totals.append(node.total)
                selfs.append(node.self_weight)
        return cls(list(frame_ids), frame, depths, totals, selfs)

    def __len__(self) -> int:
        return len(self.frame)

    def offsets(self) -> list[int]:
        """Per node, the weight left of it in flame-graph layout (children from their
        parent's left edge, in order; self and left-out weight is the gap on the right)."""
        offsets = []
        cursor: list[int] = []  # cursor[d]: where the next child of the open depth-d node starts
        for depth, total in zip(self.depth, self.total, strict=True):
            del cursor[depth:]
            offset = cursor[depth - 1] if depth else 0
            if depth:
                cursor[depth - 1] += total
            cursor.append(offset)
            offsets.append(offset)
        return offsets

    def to_nodes(self) -> FlameNode:
        """The same tree as linked `FlameNode`s."""
        path: list[FlameNode] = []
        with gc_paused():
            for frame, depth, total, self_weight in zip(
                self.frame, self.depth, self.total, self.self_weight, strict=True
            ):
                name, kind = self.frames[frame]
                node = FlameNode(name, kind, total, self_weight, {})
                del path[depth:]
                if path:
                    path[-1].children[name] = node
                path.append(node)
        return path[0] if path else FlameNode(ROOT_NAME, "unknown", 0, 0, {})
