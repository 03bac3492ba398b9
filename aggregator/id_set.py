"""A set of 64-bit ids answering for a whole column at once: an open-addressing hash table
of numpy arrays (linear probing), every step vectorized over the ids asked about.

An ingest stream checks each batch's stack ids against the stacks it has sent: 100k sent, 10k
rows, a sorted array and searchsorted took ~600 us a batch, binary searches with a cache miss
each; a probe here is one gather, and nearly every id is found at its first slot. The table
takes 16 to 32 bytes an id (a Python set of ints ~60). Ids come from clients, who may choose
them: slots are a multiply-shift hash with a random multiplier, so that a client cannot pick
ids that pile up on one run of slots.
"""

from __future__ import annotations

import secrets

import numpy as np

# The value that marks a free slot; the id itself is tracked apart (`_has_empty`).
_EMPTY = 0
_MIN_SLOTS = 1024
# Slots an id not settled at its first slot reads at once: 8, a row of booleans is one
# 64-bit word (_any_per_row); the table at most half full, few runs of taken slots are longer.
PROBE_WINDOW = 8
_WINDOW = np.arange(PROBE_WINDOW)


class IdSet:
    """Distinct int64 ids; `contains` and `add` take numpy arrays."""

    def __init__(self) -> None:
        self._multiplier = np.uint64(secrets.randbits(64) | 1)
        self._slots = np.full(_MIN_SLOTS, _EMPTY, np.int64)
        self._shift = np.uint64(64 - _MIN_SLOTS.bit_length() + 1)
        self._count = 0
        self._has_empty = False

    def __len__(self) -> int:
        return self._count + self._has_empty

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Per id, whether it is in the set. Most ids are settled at their first slot (found
        there, or it is free); the others read the next PROBE_WINDOW slots at once, until
        they are found or meet a free slot (ids are never removed, so an id is held between
        its first slot and the first free one after it)."""
        first = self._home(ids)
        held = self._slots.take(first)
        found = held == ids
        pending = np.flatnonzero(~found & (held != _EMPTY))
        start = first[pending] + 1
        while len(pending):
            window = self._slots.take(start[:, None] + _WINDOW, mode="wrap")
            hit = _any_per_row(window == ids[pending, None])
            found[pending[hit]] = True
            probe_on = ~hit & ~_any_per_row(window == _EMPTY)
            pending, start = pending[probe_on], start[probe_on] + PROBE_WINDOW
        found[ids == _EMPTY] = self._has_empty  # a free slot "held" it above
        return found

    def add(self, ids: np.ndarray) -> None:
        if (ids == _EMPTY).any():
            self._has_empty = True
        ids = np.unique(ids[ids != _EMPTY])
        ids = ids[~self.contains(ids)]
        if 2 * (self._count + len(ids)) > len(self._slots):
            self._grow(self._count + len(ids))
        self._place(ids)

    def _home(self, ids: np.ndarray) -> np.ndarray:
        """Each id's first slot: the top bits of id * multiplier (mod 2^64)."""
        return ((ids.view(np.uint64) * self._multiplier) >> self._shift).astype(np.int64)

    def _grow(self, count: int) -> None:
        """Slots for `count` ids at most half full; the ids held placed again."""
        held = self._slots[self._slots != _EMPTY]
        size = 1 << (2 * count - 1).bit_length()
        self._slots = np.full(size, _EMPTY, np.int64)
        self._shift = np.uint64(64 - size.bit_length() + 1)
        self._count = 0
        self._place(held)

    def _place(self, ids: np.ndarray) -> None:
        """Put distinct ids, none held yet, in free slots: each round, of the ids whose
        slot is free one per slot takes it; the others move on to the next slot."""
        self._count += len(ids)
        slot = self._home(ids)
        mask = len(self._slots) - 1
        while len(ids):
            free = np.flatnonzero(self._slots[slot] == _EMPTY)
            _, first = np.unique(slot[free], return_index=True)
            placed = free[first]
            self._slots[slot[placed]] = ids[placed]
            left = np.ones(len(ids), bool)
            left[placed] = False
            ids, slot = ids[left], (slot[left] + 1) & mask


def _any_per_row(flags: np.ndarray) -> np.ndarray:
    """Per row of PROBE_WINDOW (8) booleans, whether any is true: the row's bytes read as
    one integer (numpy's any(axis=1) over short rows costs 4 times more)."""
    return flags.view(np.uint64).ravel() != 0
