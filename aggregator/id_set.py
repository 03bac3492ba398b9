"""A set of 64-bit ids answering for a whole column at once: hash tables of numpy arrays,
every step vectorized over the ids asked about.

An ingest stream checks each batch's stack ids against the stacks it has sent: 100k sent, 10k
rows, a sorted array and searchsorted took ~600 us a batch, binary searches with a cache miss
each; a probe here is one gather. Each id has one slot, its "home"; an id whose home is taken
when it is added goes to the next level, a smaller set of the same kind (~17% of the ids
with the table at most half full, ~3% of those at the level after, ...). So a lookup reads
one slot per id, then one per id left for each level: nearly every id is settled at the
first (found there, or its home is free: it was never added). Linear probing read the next 8
slots of every id not at home instead, which cost as much as the rest of the lookup. The
tables take 16 to 40 bytes an id (a Python set of ints ~60). Ids come from clients, who may
choose them: homes are a multiply-shift hash with a random multiplier per level, so that a
client cannot pick ids that pile up on a few slots.
"""

from __future__ import annotations

import secrets

import numpy as np

# The value that marks a free slot; the id itself is tracked apart (`_has_empty`).
_EMPTY = 0
_MIN_SLOTS = 1024


class IdSet:
    """Distinct int64 ids; `contains`, `contains_all` and `add` take numpy arrays."""

    def __init__(self, slots: int = _MIN_SLOTS) -> None:
        self._multiplier = np.uint64(secrets.randbits(64) | 1)
        self._slots = np.full(slots, _EMPTY, np.int64)
        self._shift = np.uint64(64 - slots.bit_length() + 1)
        self._count = 0  # ids in this level's slots
        self._has_empty = False  # at the first level only
        self._next: IdSet | None = None  # the ids whose home here was taken

    def __len__(self) -> int:
        return self._count + self._has_empty + (len(self._next) if self._next else 0)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Per id, whether it is in the set."""
        found = self._contains(ids)
        found[ids == _EMPTY] = self._has_empty  # a free slot "held" it
        return found

    def contains_all(self, ids: np.ndarray) -> bool:
        """contains(ids).all(), in fewer passes: the first id missing ends it."""
        if np.count_nonzero(ids) < len(ids):  # a free slot "holds" 0: it is asked apart
            if not self._has_empty:
                return False
            ids = ids[ids != _EMPTY]
        level: IdSet | None = self
        while level is not None:
            held = level._slots.take(level._home(ids))
            left = np.flatnonzero(held != ids)
            if not len(left):
                return True
            if (held[left] == _EMPTY).any():  # home free: never added
                return False
            ids, level = ids[left], level._next
        return False

    def add(self, ids: np.ndarray) -> None:
        if (ids == _EMPTY).any():
            self._has_empty = True
        ids = np.unique(ids[ids != _EMPTY])
        self._insert(ids[~self.contains(ids)])

    def _contains(self, ids: np.ndarray) -> np.ndarray:
        held = self._slots.take(self._home(ids))
        found = held == ids
        if self._next is not None:
            # not at home, which another id holds: added after it, at a next level
            left = np.flatnonzero(~found & (held != _EMPTY))
            if len(left):
                found[left] = self._next._contains(ids[left])
        return found

    def _home(self, ids: np.ndarray) -> np.ndarray:
        """Each id's slot: the top bits of id * multiplier (mod 2^64)."""
        home = ids.view(np.uint64) * self._multiplier
        home >>= self._shift
        return home.view(np.int64)  # < 2^63 after the shift

    def _insert(self, ids: np.ndarray) -> None:
        """Distinct ids, none 0 or held yet: the table grows to stay at most half full
        (counting the next levels' ids), then each takes its home if it is free."""
        if 2 * (len(self) - self._has_empty + len(ids)) > len(self._slots):
            count = len(self) - self._has_empty + len(ids)
            ids = np.concatenate([self._held(), ids])
            size = 1 << (2 * count - 1).bit_length()
            self._slots = np.full(size, _EMPTY, np.int64)
            self._shift = np.uint64(64 - size.bit_length() + 1)
            self._count, self._next = 0, None
        home = self._home(ids)
        free = np.flatnonzero(self._slots[home] == _EMPTY)
        _, first = np.unique(home[free], return_index=True)  # one id per free home
        placed = free[first]
        self._slots[home[placed]] = ids[placed]
        self._count += len(placed)
        if len(placed) < len(ids):
            others = np.ones(len(ids), bool)
            others[placed] = False
            if self._next is None:
                self._next = IdSet()
            self._next._insert(ids[others])

    def _held(self) -> np.ndarray:
        """Every id held, at this level and the next ones (0 aside)."""
        held = [self._slots[self._slots != _EMPTY]]
        if self._next is not None:
            held.append(self._next._held())
        return np.concatenate(held)
