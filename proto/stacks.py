"""The stack contract: a distinct stack as agents, the aggregator and readers hold it, and
its id (equal on every node for equal stacks). Rows travel as schema.STACKS."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import pyarrow as pa

from fleetprof.proto import schema

# The one frame of a stack the kernel could not record (a map collision or overflow).
LOST_FRAME = ("[lost stack]", "", "lost")
# The root of a stack whose outermost callers were left out (deeper than the agent walks,
# or than schema.MAX_FRAMES_PER_STACK).
TRUNCATED_FRAME = ("[truncated]", "", "lost")


class StackRow(NamedTuple):
    """One distinct stack, root first."""

    frames: tuple[str, ...]
    modules: tuple[str, ...]
    kinds: tuple[str, ...]


def stack_row(frames: Sequence[tuple[str, str, str]]) -> StackRow:
    """The row of (name, module, kind) frames, root first, cut to the contract: names, and
    depth (the outermost callers give way to TRUNCATED_FRAME)."""
    frames = fit_depth(frames)
    return StackRow(
        tuple(fit(name) for name, _, _ in frames),
        tuple(fit(module) for _, module, _ in frames),
        tuple(kind for _, _, kind in frames),
    )


def fit_depth(frames: Sequence[tuple[str, str, str]]) -> Sequence[tuple[str, str, str]]:
    """Root-first frames, at most MAX_FRAMES_PER_STACK: a deeper stack keeps the frames
    nearest its leaf below a TRUNCATED_FRAME root (a batch with a deeper stack is refused)."""
    if len(frames) <= schema.MAX_FRAMES_PER_STACK:
        return frames
    return [TRUNCATED_FRAME, *frames[len(frames) - schema.MAX_FRAMES_PER_STACK + 1 :]]


def fit(name: str) -> str:
    """A name cut to what the wire contract accepts: demangled C++ templates (LLVM's reach
    8k characters) would otherwise get the whole batch refused."""
    encoded = name.encode()
    if len(encoded) <= schema.MAX_STRING_BYTES:
        return name
    ellipsis = "…"
    kept = encoded[: schema.MAX_STRING_BYTES - len(ellipsis.encode())]
    return kept.decode(errors="ignore") + ellipsis  # a character cut in two goes


def stack_id(row: StackRow) -> int:
    """64-bit id of a stack: a hash of its frames, equal on every node for equal stacks."""
    frames = zip(row.frames, row.modules, row.kinds, strict=True)
    return keyed_stack_id(b"".join(frame_key(*frame) for frame in frames))


def frame_key(name: str, module: str, kind: str) -> bytes:
    """What one frame adds to its stack's id."""
    return f"{name}\x1f{module}\x1f{kind}\x1e".encode(errors="surrogateescape")


def keyed_stack_id(keys: bytes) -> int:
    """The stack_id of the stack whose frame_keys, root first, are joined in `keys` (for
    readers that key each part of a stack once, as OTLP's locations)."""
    digest = hashlib.blake2b(keys, digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def stacks_table(stacks: dict[int, StackRow]) -> pa.Table:
    rows = list(stacks.values())
    return pa.table(
        {
            "stack_id": list(stacks),
            "frames": [r.frames for r in rows],
            "modules": [r.modules for r in rows],
            "kinds": [r.kinds for r in rows],
        },
        schema=schema.STACKS,
    )
