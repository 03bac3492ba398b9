"""Unwind rows for HotSpot JVMs' code caches: Java frames without frame pointers.

A JVM started with no flags compiles Java methods into code that uses rbp as an ordinary
register, so a frame-pointer walk stops at the first compiled frame. HotSpot knows each code
blob's frame size (CodeBlob::_frame_size) and where its prologue ends
(_frame_complete_offset): from there on the frame ends at rsp + frame size, with the return
address and the caller's rbp in its last two words (x86_64; HotSpot's frame::sender and the
OpenTelemetry profiler unwind it so). These rules become rows of the native unwinder's
kernel table, like a file's: one set per JVM, its code cache as the "file", read from the
JVM's memory (each code heap's segment map, then the header of each block it shows, once
while the block is unchanged). A thread compares the segment maps five times a second and
hands the rows over when one changed (at most once a second per JVM), so code compiled a
moment ago is unwound within about a second.

- Compiled code (nmethods, runtime stubs): rsp + 8 up to the end of the prologue (only the
  return address is pushed; the last instruction or two of the prologue are not told apart),
  then rsp + frame size with rbp saved at CFA - 16. A leaf stopped in its epilogue is
  unwound wrongly; callers never are (they are at a call).
- The template interpreter keeps rbp: CFA_INTERPRETER makes the BPF walk record the frame's
  Method* as a word of its own after the interpreter's pc (symbolize/hotspot.py names it),
  then go on at the caller's sp the interpreter saved.
- Blobs without a frame size (stubs that keep rbp) and free space get no rule: frame
  pointers, and the scan for a frameless leaf's callers.
"""

from __future__ import annotations

import logging
import re
import struct
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain

from fleetprof.node_agent.symbolize.hotspot import HotSpotProcess, HotSpotSymbolizer, Unreadable
from fleetprof.node_agent.unwind.cfi import (
    CFA_INTERPRETER,
    CFA_RSP,
    CFA_UNKNOWN,
    pack_row,
)

log = logging.getLogger(__name__)

# A block of the segment map: its first segment is 0, the next count up (up to 0xfe, then
# again from 1); 0xff marks free segments (heap.cpp, mark_segmap_as_used/free).
_BLOCK = re.compile(rb"\x00[^\x00\xff]*", re.DOTALL)
# Rows' cfa_offset is 16 bits: larger frames are left to frame pointers.
_MAX_FRAME = 0xFFFF
# The caller's rbp is saved at CFA - 16 in a compiled frame.
_SAVED_RBP_SLOT = -2
# CodeBlob::_frame_complete_offset of a blob that never has a complete frame.
_NEVER_COMPLETE = -1


@dataclass
class _HeapState:
    segmap: bytes = b""
    # Per block (address, segments): its packed rows.
    blocks: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)
    rows: array = field(default_factory=lambda: array("Q"))  # all of them, in order


class CodeCacheRows:
    """One JVM's code cache as unwind rows; `read()` gives them when they changed."""

    def __init__(self, process: HotSpotProcess) -> None:
        self.process = process
        self._heaps: dict[int, _HeapState] = {}
        layout = process.layout
        # Block header (HeapBlock: {size_t or u4 length in segments; bool used}), then the
        # CodeBlob: enough of it for the fields read here.
        self._header = "<IB" if layout.sizes["HeapBlock"] == 8 else "<QB"
        self._fields = (
            layout["blob_frame_size"],
            layout["blob_frame_complete"],
            layout["blob_code_begin"],
            layout["blob_code_end"],
        )
        self._read_size = layout.sizes["HeapBlock"] + max(self._fields) + 8
        self.stats = {"reads": 0, "blocks_read": 0, "unreadable": 0}
        self.updated_at = 0.0  # when read() last gave rows (time.monotonic)

    @property
    def bounds(self) -> tuple[int, int]:
        """The code cache's [low, high): the rows' addresses are relative to low."""
        return self.process.code_bounds

    def read(self) -> array | None:
        """The code cache's rows (packed, sorted), or None if no segment map changed since
        the last call. Raises OSError (the JVM exited) or Unreadable (a torn read)."""
        process = self.process
        memory, layout = process.memory, process.layout
        changed = False
        heaps = {}
        for heap in process.heaps:  # sorted by address
            state = heaps[heap.low] = self._heaps.get(heap.low) or _HeapState()
            committed = memory.word(heap.address + layout["heap_memory"] + layout["vs_high"])
            if not heap.low <= committed <= heap.high:
                raise Unreadable(f"code heap 0x{heap.low:x}: committed up to 0x{committed:x}")
            segmap = memory.read(heap.segmap, (committed - heap.low) >> heap.shift)
            if segmap == state.segmap:
                continue
            changed = True
            blocks = {}
            for match in _BLOCK.finditer(segmap):
                key = (heap.low + (match.start() << heap.shift), match.end() - match.start())
                rows = state.blocks.get(key)
                blocks[key] = rows if rows is not None else self._block_rows(*key, heap.shift)
            state.segmap, state.blocks = segmap, blocks
            state.rows = array("Q", chain.from_iterable(blocks.values()))
        changed |= heaps.keys() != self._heaps.keys()
        self._heaps = heaps
        if not changed:
            return None
        self.stats["reads"] += 1
        return array("Q", chain.from_iterable(state.rows for state in heaps.values()))

    def _block_rows(self, block: int, segments: int, shift: int) -> tuple[int, ...]:
        """The packed rows of the code blob in one heap block; () for a free block."""
        self.stats["blocks_read"] += 1
        low = self.bounds[0]
        interpreter = self.process.interpreter
        if block <= interpreter[0] < block + (segments << shift):
            return (
                pack_row(interpreter[0] - low, CFA_INTERPRETER, 0, 0),
                pack_row(interpreter[1] - low, CFA_UNKNOWN, 0, 0),
            )
        data = self.process.memory.read(block, self._read_size)
        length, used = struct.unpack_from(self._header, data)
        if not used or not length:
            return ()
        blob = block + self.process.layout.sizes["HeapBlock"]
        at_size, at_complete, at_begin, at_end = (blob - block + offset for offset in self._fields)
        frame_size = 8 * int.from_bytes(data[at_size : at_size + 4], "little", signed=True)
        # JDK 23 made the frame-complete offset 16 bits and the code bounds 32-bit offsets
        # from the blob (codeBlob.hpp).
        recent = self.process.layout.major >= 23
        width = 2 if recent else 4
        complete = int.from_bytes(data[at_complete : at_complete + width], "little", signed=True)
        if recent:
            begin = blob + int.from_bytes(data[at_begin : at_begin + 4], "little")
            end = blob + int.from_bytes(data[at_end : at_end + 4], "little")
        else:
            begin = int.from_bytes(data[at_begin : at_begin + 8], "little")
            end = int.from_bytes(data[at_end : at_end + 8], "little")
        if not blob < begin <= end <= block + (length << shift):
            self.stats["unreadable"] += 1
            return ()  # a block being written or freed: read again when the map changes
        if not 0 < frame_size <= _MAX_FRAME or complete == _NEVER_COMPLETE:
            return ()
        if not 0 <= complete <= end - begin:
            self.stats["unreadable"] += 1
            return ()
        return (
            pack_row(begin - low, CFA_RSP, 8, 0),
            pack_row(begin + complete - low, CFA_RSP, frame_size, _SAVED_RBP_SLOT),
            pack_row(end - low, CFA_UNKNOWN, 0, 0),
        )


class CodeCaches:
    """The code caches of the JVMs the symbolizer reads, kept in the native unwinder by a
    thread of their own: every PERIOD_S the segment maps are compared (a few reads per JVM),
    so code compiled a moment ago is unwound within that time, not at the next drain."""

    PERIOD_S = 0.2
    # After an update, a JVM's code cache is read again no sooner than this: one that keeps
    # compiling costs a scan of its segment maps a second, not five.
    SETTLE_S = 1.0

    def __init__(
        self,
        hotspot: HotSpotSymbolizer,
        set_rows: Callable[[int, int, int, array], None],
        forget_rows: Callable[[int], None],
    ) -> None:
        self._hotspot = hotspot
        self._set_rows = set_rows
        self._forget_rows = forget_rows
        self._jvms: dict[int, CodeCacheRows] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="code-cache-rows", daemon=True)
        self.stats = {"updates": 0, "unreadable": 0}
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._hotspot.jvm_seen.set()  # wakes the thread if it sleeps for want of JVMs
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._jvms and not self._hotspot.has_jvms():
                # No JVM on the node: no wake-ups until one is sampled.
                self._hotspot.jvm_seen.wait()
                self._hotspot.jvm_seen.clear()
                continue
            if self._stop.wait(self.PERIOD_S):
                return
            try:
                self.update()
            except Exception:  # a bug here must not end Java unwinding for good
                log.exception("code cache rows: update failed")

    def update(self) -> None:
        """Read each JVM's code cache again; hand over the rows of those that changed."""
        self._hotspot.retry_waiting()
        with self._hotspot.lock:
            processes = self._hotspot.processes()
            for pid, process in processes.items():
                jvm = self._jvms.get(pid)
                if jvm is None or jvm.process is not process:
                    jvm = self._jvms[pid] = CodeCacheRows(process)
                elif time.monotonic() < jvm.updated_at + self.SETTLE_S:
                    continue
                try:
                    rows = jvm.read()
                except (OSError, Unreadable, struct.error) as exc:
                    self.stats["unreadable"] += 1
                    log.debug("JVM %d: code cache not read (%s)", pid, exc)
                    continue
                if rows is not None:
                    self.stats["updates"] += 1
                    jvm.updated_at = time.monotonic()
                    self._set_rows(pid, *jvm.bounds, rows)
            for pid in set(self._jvms) - set(processes):
                self._jvms.pop(pid)
                self._forget_rows(pid)
