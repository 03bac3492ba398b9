"""Writers for SQL results, one per format; each streams record batches as they come."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import BinaryIO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

MAX_CELL_CHARS = 60


def write_table_text(reader: pa.RecordBatchReader, out: BinaryIO) -> None:
    """Aligned columns for a terminal; widths come from the first batch. Column by column
    and a batch at a time: millions of rows print in seconds."""
    names = reader.schema.names
    widths: list[int] | None = None
    # lines are cut to a terminal's width, once asked (not per row)
    cut = shutil.get_terminal_size((200, 20)).columns if out.isatty() else None
    rows_written = 0
    for batch in reader:
        columns = [list(map(_cell, column.to_pylist())) for column in batch.columns]
        if widths is None:
            widths = [max([len(n), *map(len, c)]) for n, c in zip(names, columns, strict=True)]
            _write_lines(out, [names, ["-" * w for w in widths]], widths, cut)
        _write_lines(out, zip(*columns, strict=True), widths, cut)
        rows_written += batch.num_rows
    if widths is None:
        _write_lines(out, [names], [len(n) for n in names], cut)
    out.write(f"({rows_written} row{'s' if rows_written != 1 else ''})\n".encode())


def _cell(value: object) -> str:
    text = "NULL" if value is None else str(value)
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 1] + "…"


def _write_lines(
    out: BinaryIO, rows: Iterable[Sequence[str]], widths: list[int], cut: int | None
) -> None:
    lines = ["  ".join(map(str.ljust, row, widths)).rstrip() for row in rows]
    if cut is not None:
        lines = [line[:cut] for line in lines]
    out.write("\n".join(lines).encode() + b"\n" if lines else b"")


def write_csv(reader: pa.RecordBatchReader, out: BinaryIO) -> None:
    for field in reader.schema:
        if pa.types.is_nested(field.type):
            raise ValueError(
                f"CSV cannot hold column {field.name!r} of type {field.type}: "
                "use --format json or parquet, or cast it in the query (::VARCHAR)"
            )
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
