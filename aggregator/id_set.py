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

A lookup is a few numpy calls over the ids, each of which hands the GIL to another ingest
thread when there are more than 500 of them, at a cost several times the call's own work
in a busy aggregator: so there are as few as can be. Free slots hold 0, but slot 0 (where 0
goes, whatever the multiplier) holds INT64_MIN when free, which never goes there (INT64_MIN
times an odd multiplier is 2^63 mod 2^64: the middle slot). So no id matches a free slot of
its home, and 0 needs no pass of its own.
"""

from __future__ import annotations

import secrets

import numpy as np

_FREE = 0
_FREE_AT_SLOT_0 = np.iinfo(np.int64).min
_MIN_SLOTS = 1024


class IdSet:
    """Distinct int64 ids; `contains`, `contains_all` and `add` take numpy arrays."""

    def __init__(self, slots: int = _MIN_SLOTS) -> None:
        self._multiplier = np.uint64(secrets.randbits(64) | 1)
        self._count = 0  # ids in this level's slots
        self._next: IdSet | None = None  # the ids whose home here was taken
        self._allocate(slots)

    def __len__(self) -> int:
        return self._count + (len(self._next) if self._next else 0)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Per id, whether it is in the set."""
        home = self._home(ids)
        held = self._slots.take(home)
        found = held == ids
        if self._next is not None:
            # not at home, which another id holds (slot 0 may hold 0): added after it, at a
            # next level
            left = np.flatnonzero(~found & ((held != _FREE) | (home == 0)))
            if len(left):
                found[left] = self._next.contains(ids[left])
        return found

    def contains_all(self, ids: np.ndarray) -> bool:
        """contains(ids).all(), in fewer passes: only the ids not at their home are asked
        at the next level (a missing id is asked at every level: refusals are rare)."""
        level: IdSet | None = self
        while level is not None:
            ids = ids[level._slots.take(level._home(ids)) != ids]
            if not len(ids):
                return True
            level = level._next
        return False

    def add(self, ids: np.ndarray) -> None:
        ids = np.unique(ids)
        self._insert(ids[~self.contains(ids)])

    def _home(self, ids: np.ndarray) -> np.ndarray:
        """Each id's slot: the top bits of id * multiplier (mod 2^64)."""
        home = ids.view(np.uint64) * self._multiplier
        home >>= self._shift
        return home.view(np.int64)  # < 2^63 after the shift

    def _allocate(self, slots: int) -> None:
        """Free slots, a power of two of them."""
        self._slots = np.full(slots, _FREE, np.int64)
        self._slots[0] = _FREE_AT_SLOT_0
        self._shift = np.uint64(65 - slots.bit_length())

    def _insert(self, ids: np.ndarray) -> None:
        """Distinct ids, none held yet: the table grows to stay at most half full
        (counting the next levels' ids), then each takes its home if it is free."""
        if 2 * (len(self) + len(ids)) > len(self._slots):
            count = len(self) + len(ids)
            ids = np.concatenate([self._held(), ids])
            self._allocate(1 << (2 * count - 1).bit_length())
            self._count, self._next = 0, None
        home = self._home(ids)
        free = np.flatnonzero(self._slots[home] == np.where(home == 0, _FREE_AT_SLOT_0, _FREE))
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
        """Every id held, at this level and the next ones."""
        taken = self._slots != _FREE
        taken[0] = self._slots[0] != _FREE_AT_SLOT_0
        held = [self._slots[taken]]
        if self._next is not None:
            held.append(self._next._held())
        return np.concatenate(held)
