"""Unwind rows from .eh_frame, held against binutils' own reading of the same CFI."""

from __future__ import annotations

import bisect
import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fleetprof.node_agent.symbolize.elf import file_reader, read_layout
from fleetprof.node_agent.unwind import cfi
from fleetprof.node_agent.unwind.native import _prefixes
from fleetprof.node_agent.unwind.tables import UnwindTables
from tests.conftest import require

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
LIBJVM = "/usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so"


def eh_frame(path: str) -> tuple[bytes, int]:
    with open(path, "rb") as f:
        layout = read_layout(file_reader(f.fileno()), Path(path).stat().st_size)
        address, offset, size = layout.sections[".eh_frame"]
        f.seek(offset)
        return f.read(size), address


def readelf_rules(path: str) -> list[tuple[int, tuple[int, int, int] | None]]:
    """(address, (cfa kind, cfa offset, rbp slot)) of every row `readelf -wF` prints;
    None where the rule is one rows do not express (DWARF expressions)."""
    listing = subprocess.run(
        ["readelf", "--debug-dump=frames-interp", path], capture_output=True, text=True
    ).stdout
    rules: list[tuple[int, tuple[int, int, int] | None]] = []
    columns: list[str] = []
    for line in listing.splitlines():
        if line.strip().startswith("LOC"):
            columns = line.split()
            continue
        if not columns or not re.match(r"^[0-9a-f]{16} ", line):
            continue
        values = line.split()
        cells = dict(zip(columns[2:], values[2:], strict=False))
        address, cfa, rbp = int(values[0], 16), values[1], cells.get("rbp", "u")
        slot = int(rbp[1:]) // 8 if rbp.startswith("c") else 0
        if cells.get("ra", "u") == "u":
            rules.append((address, (cfi.CFA_END, 0, 0)))
        elif cfa.startswith(("rsp+", "rbp+")) and (rbp == "u" or rbp.startswith("c")):
            kind = cfi.CFA_RSP if cfa.startswith("rsp") else cfi.CFA_RBP
            rules.append((address, (kind, int(cfa[4:]), slot)))
        else:
            rules.append((address, None))
    return rules


@pytest.mark.parametrize("path", [LIBC, LIBJVM], ids=["libc", "libjvm"])
def test_rows_agree_with_readelf_at_every_address_it_lists(path: str) -> None:
    require(Path(path).exists() and shutil.which("readelf") is not None, f"no {path}/readelf")
    rows = cfi.parse(*eh_frame(path))
    starts = [cfi.unpack_row(row)[0] for row in rows]
    checked = wrong = 0
    for address, rule in readelf_rules(path):
        if rule is None or address == 0:  # an expression, or a CIE's initial row
            continue
        found = cfi.unpack_row(rows[bisect.bisect_right(starts, address) - 1])[1:]
        checked += 1
        wrong += found != rule
    assert checked > 20_000
    # The few left are registers saved in other registers, which rows do not follow.
    assert wrong <= checked / 1000, f"{wrong} of {checked} rows differ"


def test_plt_entries_get_the_plt_rule() -> None:
    rows = cfi.parse(*eh_frame(LIBC))
    assert any(cfi.unpack_row(row)[1] == cfi.CFA_PLT for row in rows)


def test_corrupt_cfi_is_refused_with_a_reason(tmp_path: Path) -> None:
    data, address = eh_frame(LIBC)
    with pytest.raises(cfi.CfiError, match=r"beyond the section|truncated"):
        cfi.parse(data[: len(data) // 2 + 3], address)
    # A file whose CFI cannot be read keeps no rows, says why, and is not cached.
    broken = tmp_path / "broken.so"
    image = bytearray(Path(LIBC).read_bytes())
    _, eh_offset, _ = read_layout(
        lambda at, size: bytes(image[at : at + size]), len(image)
    ).sections[".eh_frame"]
    image[eh_offset + 4 : eh_offset + 8] = b"\xff\xff\xff\x7f"  # an entry past the section
    image[eh_offset : eh_offset + 4] = b"\xf0\xff\xff\x0f"
    broken.write_bytes(bytes(image))
    tables = UnwindTables(str(tmp_path / "cache"))
    found = tables.get((str(broken),))
    assert found is not None
    assert not found[1].rows and "eh_frame" in found[1].error
    assert not (tmp_path / "cache").exists()
    # Not an ELF file at all: no rows either, nothing raised.
    (tmp_path / "text").write_text("not elf")
    assert not tables.get((str(tmp_path / "text"),))[1].rows  # type: ignore[index]


def test_rows_are_cached_by_build_id(tmp_path: Path) -> None:
    first = UnwindTables(str(tmp_path))
    parsed = first.get((LIBC,))
    again = UnwindTables(str(tmp_path)).get((LIBC,))
    assert parsed and again and parsed[1].rows == again[1].rows
    assert first.stats["parsed"] == 1
    assert next(tmp_path.iterdir()).name == f"{parsed[1].layout.build_id.hex()}.rows"


def test_address_ranges_become_exact_prefix_blocks() -> None:
    for start, end in ((0x7F0000001000, 0x7F0000185000), (0x400000, 0x401000), (0x1000, 0x3000)):
        blocks = _prefixes(start, end)
        covered = sorted((address, address + (1 << (64 - length))) for address, length in blocks)
        assert covered[0][0] == start and covered[-1][1] == end
        assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))
        assert all(address % (1 << (64 - length)) == 0 for address, length in blocks)
