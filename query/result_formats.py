"""Writers for SQL results, one per format; each streams record batches as they come."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from decimal import Decimal
from typing import BinaryIO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

MAX_CELL_CHARS = 60


def write_table_text(reader: pa.RecordBatchReader, out: BinaryIO) -> None:
    """Aligned columns for a terminal; widths come from the first batch."""
    names = reader.schema.names
    widths: list[int] | None = None
    rows_written = 0
    for batch in reader:
        rows = [[_cell(v) for v in row.values()] for row in batch.to_pylist()]
        if widths is None:
            widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
            _write_row(out, names, widths)
            _write_row(out, ["-" * w for w in widths], widths)
        for row in rows:
            _write_row(out, row, widths)
        rows_written += len(rows)
    if widths is None:
        _write_row(out, names, [len(n) for n in names])
    out.write(f"({rows_written} row{'s' if rows_written != 1 else ''})\n".encode())


def _cell(value: object) -> str:
    text = "NULL" if value is None else str(value)
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 1] + "…"


def _write_row(out: BinaryIO, cells: list[str], widths: list[int]) -> None:
    line = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    width = shutil.get_terminal_size((200, 20)).columns
    out.write((line[:width] if out.isatty() else line).encode() + b"\n")


def write_csv(reader: pa.RecordBatchReader, out: BinaryIO) -> None:
    with pacsv.CSVWriter(out, reader.schema) as writer:
        for batch in reader:
            writer.write_batch(batch)


def write_json_lines(reader: pa.RecordBatchReader, out: BinaryIO) -> None:
    """One JSON object per row (JSON Lines), so large results stream."""
    for batch in reader:
        for row in batch.to_pylist():
            out.write(json.dumps(row, default=json_value).encode() + b"\n")


def json_value(value: object) -> object:
    # DuckDB's sum() of BIGINT is HUGEINT, which arrives as an integral Decimal.
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return str(value)


def write_parquet(reader: pa.RecordBatchReader, out: BinaryIO) -> None:
    with pq.ParquetWriter(out, reader.schema, compression="zstd") as writer:
        for batch in reader:
            writer.write_batch(batch)


def write_arrow(reader: pa.RecordBatchReader, out: BinaryIO) -> None:
    with ipc.new_file(out, reader.schema) as writer:
        for batch in reader:
            writer.write_batch(batch)


WRITERS: dict[str, Callable[[pa.RecordBatchReader, BinaryIO], None]] = {
    "table": write_table_text,
    "csv": write_csv,
    "json": write_json_lines,
    "parquet": write_parquet,
    "arrow": write_arrow,
}
# Formats that are not text: they need -o FILE.
BINARY_FORMATS = frozenset({"parquet", "arrow"})
