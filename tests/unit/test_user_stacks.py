"""Decoding user stacks as user_stacks.bpf.h stores them (chunks of 128 frames, a
truncation flag), and linking bpf_loop's callback into a program (bpf_loop.py): no BPF."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from fleetprof.node_agent.samplers import bpf_loop
from fleetprof.node_agent.samplers.stack_maps import USER_TRUNCATED, _UserStacks, chunk_key

FRAMES = 128
TRUNCATED = 1 << 63


def stored(key: int, ips: list[int], flag: int = 0) -> dict[int, tuple[int, list[int]]]:
    """The values BPF stores for a stack under `key`: chunk 0 names the depth, chunk k's
    depth word is the previous chunk's last frame."""
    padded = ips + [0] * (-len(ips) % FRAMES)
    values = {key: (len(ips) | flag, padded[:FRAMES])}
    for k in range(1, len(padded) // FRAMES):
        values[chunk_key(key, k)] = (padded[k * FRAMES - 1], padded[k * FRAMES : (k + 1) * FRAMES])
    return values


def test_chunk_key_matches_the_bpf_macro() -> None:
    # CHUNK_KEY(hash, k): FNV-1a's step over k, never USER_STACK_NONE or _LOST.
    key = 0xDEADBEEF12345677
    expected = ((key ^ 3) * 0x100000001B3) % (1 << 64) | 2
    assert chunk_key(key, 3) == expected


@pytest.mark.parametrize("depth", [1, 127, 128, 129, 400, 1024])
def test_deep_stacks_are_put_together_from_their_chunks(depth: int) -> None:
    ips = list(range(4096, 4096 + depth))
    stacks = _UserStacks(stored(0x1002, ips))
    assert stacks.get(0x1002) == tuple(ips)
    assert stacks.get(0) == ()  # no user stack
    assert stacks.get(0x2002) is None  # lost


def test_a_stack_cut_in_bpf_ends_with_the_truncation_mark() -> None:
    ips = list(range(4096, 4096 + 1024))
    stacks = _UserStacks(stored(0x1002, ips, TRUNCATED))
    assert stacks.get(0x1002) == (*ips, USER_TRUNCATED)


def test_a_missing_chunk_cuts_the_stack_there() -> None:
    ips = list(range(4096, 4096 + 400))
    values = stored(0x1002, ips)
    del values[chunk_key(0x1002, 2)]
    assert _UserStacks(values).get(0x1002) == (*ips[:256], USER_TRUNCATED)


def test_the_callback_is_linked_where_its_address_is_loaded() -> None:
    def insn(code: int, regs: int, imm: int = 0) -> bytes:
        return struct.pack("<BBhi", code, regs, 0, imm)

    program = bytearray(
        insn(0xB7, 0x01, 1024)  # r1 = 1024
        + insn(0x18, 0x02) + insn(0, 0)  # r2 = <callback>: left 0 by BCC
        + insn(0x18, 0x11, 5) + insn(0, 0)  # a map's fd: left alone
        + insn(0x85, 0, 181)  # call bpf_loop
        + insn(0x95, 0)
    )  # fmt: skip
    assert bpf_loop.link_callback(program) == 1
    code, regs, _, imm = struct.unpack_from("<BBhi", program, 8)
    # BPF_PSEUDO_FUNC into r2, offset from the next instruction to the callback (after 7).
    assert (code, regs, imm) == (0x18, 0x42, 7 - 2)
    assert struct.unpack_from("<BBhi", program, 24)[3] == 5


def test_the_btf_names_the_program_and_its_callback() -> None:
    blob, ids = bpf_loop.func_btf((b"on_cpu_sample", b"walk_user_frame"))
    magic, version, _, header, _, types, strings_at, strings = struct.unpack_from("<HBBIIIII", blob)
    assert (magic, version, header) == (0xEB9F, 1, 24)
    names = blob[header + strings_at : header + strings_at + strings]
    assert b"on_cpu_sample\0" in names and b"walk_user_frame\0" in names
    assert ids == (5, 6)
    assert len(np.frombuffer(blob[header : header + types], np.uint32)) * 4 == types
