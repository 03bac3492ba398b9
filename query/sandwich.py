"""The sandwich view of one function: who calls it and what it calls, in one graph."""

from __future__ import annotations

from fleetprof.query.flame_tree import FlameNode, StackRow, build_tree

CALLERS = "[callers]"
CALLEES = "[callees]"
_MARKER_KIND = "process"


def sandwich(tree: FlameNode, function: str) -> FlameNode:
    """A tree whose root has two halves of equal weight, `function`'s total:

    - "[callers]" → function → its callers, inverted: the direct caller first, the
      outermost frame (the process) last;
    - "[callees]" → function → everything it calls, merged over all its call sites, as in
      a flame graph.

    Only the outermost call of the function in a stack counts (its recursive calls are
    among its callees), so recursion is never counted twice. A tree without the function
    gives an empty tree.
    """
    rows: list[StackRow] = []
    ancestors: list[FlameNode] = []
    pending = [(0, tree)]
    while pending:
        depth, node = pending.pop()
        del ancestors[depth:]
        if depth > 0 and node.name == function:
            callers = ancestors[:0:-1]  # leaf-side first, without the root "all"
            rows.append(
                (
                    [CALLERS, function, *(n.name for n in callers)],
                    [_MARKER_KIND, node.kind, *(n.kind for n in callers)],
                    node.total,
                )
            )
            rows.extend(_paths(node, [CALLEES, function], [_MARKER_KIND, node.kind]))
            continue
        ancestors.append(node)
        pending.extend((depth + 1, child) for child in node.children.values())
    return build_tree(rows)


def _paths(top: FlameNode, names: list[str], kinds: list[str]) -> list[StackRow]:
    """A row per node of `top`'s subtree with self weight: the path from `top`, prefixed."""
    rows: list[StackRow] = []
    pending = [(top, names, kinds)]
    while pending:
        node, path, path_kinds = pending.pop()
        if node.self_weight > 0:
            rows.append((path, path_kinds, node.self_weight))
        pending.extend(
            (child, [*path, child.name], [*path_kinds, child.kind])
            for child in node.children.values()
        )
    return rows
