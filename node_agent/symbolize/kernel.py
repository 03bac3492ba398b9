"""Kernel addresses → function names, from /proc/kallsyms."""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_right

from fleetprof.node_agent.symbolize.elf import NameBlob
from fleetprof.node_agent.symbolize.frame import Frame

# Text symbols; on the same address the global beats the local, and both beat weak ones.
_TEXT_RANK = {"T": 3, "t": 2, "W": 1, "w": 0}

UNKNOWN_KERNEL = Frame("[unknown]", "[kernel]", "unknown")


class KernelSymbols:
    """The kernel's text symbols, sorted by address for bisection.

    kallsyms has no sizes: a symbol covers its address up to the next symbol. Without
    CAP_SYSLOG (or with kptr_restrict=2) kallsyms lists every address as 0; the table is then
    empty and every address resolves to "[unknown]".
    """

    def __init__(self, symbols: dict[int, tuple[str, str]]) -> None:
        starts = sorted(symbols)
        self._starts = array("Q", starts)
        self._names = NameBlob([symbols[start][0] for start in starts])
        # Few distinct modules: one small index per symbol instead of a reference.
        self._modules = sorted({module for _, module in symbols.values()})
        index = {module: i for i, module in enumerate(self._modules)}
        self._module_index = array("H", [index[symbols[start][1]] for start in starts])

    @classmethod
    def load(cls, path: str = "/proc/kallsyms") -> KernelSymbols:
        best: dict[int, tuple[str, str]] = {}
        ranks: dict[int, int] = {}
        with open(path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                parts = line.split()
                if len(parts) < 3:
                    continue
                rank = _TEXT_RANK.get(parts[1])
                if rank is None:
                    continue
                try:
                    addr = int(parts[0], 16)
                except ValueError:
                    continue
                if not 0 < addr < 1 << 64 or ranks.get(addr, -1) >= rank:
                    continue
                ranks[addr] = rank
                module = sys.intern(parts[3].strip("[]")) if len(parts) > 3 else "vmlinux"
                best[addr] = (parts[2], module)
        return cls(best)

    def __len__(self) -> int:
        return len(self._starts)

    def resolve(self, addr: int) -> Frame:
        i = bisect_right(self._starts, addr) - 1
        if i < 0:
            return UNKNOWN_KERNEL
        return Frame(self._names[i], self._modules[self._module_index[i]], "kernel")
