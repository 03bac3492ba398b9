"""Frame, what symbolization produces, and the bounded LRU every cache of this package uses."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, NamedTuple, TypeVar


class Frame(NamedTuple):
    """One symbolized stack frame.

    kind is one of proto.schema.FRAME_KINDS: "kernel", "native", "jit", "inlined",
    "interpreted", "python", "lost" or "unknown".
    """

    name: str
    module: str
    kind: str


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _one(_value: object) -> int:
    return 1


class LruCache(Generic[K, V]):
    """A mapping that evicts least recently used entries once their total weight exceeds
    capacity (weight 1 per entry unless `weigh` says otherwise). The newest entry is always
    kept, even when it alone weighs more than capacity.

    Not thread-safe: the agent symbolizes from its one drain thread.
    """

    def __init__(self, capacity: int, weigh: Callable[[V], int] = _one) -> None:
        self.capacity = capacity
        self.weight = 0
        self._weigh = weigh
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V) -> None:
        self.pop(key)
        weight = self._weigh(value)
        self._items[key] = (value, weight)
        self.weight += weight
        while self.weight > self.capacity and len(self._items) > 1:
            _, (_, evicted) = self._items.popitem(last=False)
            self.weight -= evicted

    def pop(self, key: K) -> V | None:
        item = self._items.pop(key, None)
        if item is None:
            return None
        self.weight -= item[1]
        return item[0]

    def items(self) -> list[tuple[K, V]]:
        """A copy, oldest first, leaving the recency order as it was."""
        return [(key, value) for key, (value, _) in self._items.items()]

    def __len__(self) -> int:
        return len(self._items)
