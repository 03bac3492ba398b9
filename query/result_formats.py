"""Writers for SQL results, one per format; each streams record batches as they come."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from decimal import Decimal
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

MAX_CELL_CHARS = 60


def write_table_text(reader: pa.RecordBatchReader, out: BinaryIO) -> None:
    """Aligned columns for a terminal; widths come from the first batch. Whole batches at
    a time, in Arrow's compute kernels: millions of rows print in seconds."""
    names = reader.schema.names
    widths: list[int] | None = None
    # lines are cut to a terminal's width, once asked (not per row)
    cut = shutil.get_terminal_size((200, 20)).columns if out.isatty() else None
    rows_written = 0
    for batch in reader:
        if batch.num_rows == 0:
            continue
        cells = [_cells(column) for column in batch.columns]
        if widths is None:
            widths = [
                max(len(name), pc.max(pc.utf8_length(column)).as_py() or 0)
                for name, column in zip(names, cells, strict=True)
            ]
            _write_header(out, names, widths, cut)
        padded = [pc.utf8_rpad(c, width=w, padding=" ") for c, w in zip(cells, widths, strict=True)]
        lines = pc.utf8_rtrim(pc.binary_join_element_wise(*padded, "  "), characters=" ")
        if cut is not None:
            lines = pc.utf8_slice_codeunits(lines, 0, cut)
        out.write("\n".join(lines.to_pylist()).encode() + b"\n")
        rows_written += batch.num_rows
    if widths is None:
        _write_header(out, names, [len(n) for n in names], cut)
    out.write(f"({rows_written} row{'s' if rows_written != 1 else ''})\n".encode())


def _cells(column: pa.Array) -> pa.Array:
    """A column as the table's text: NULL for nulls, cut to MAX_CELL_CHARS."""
    if (
        pa.types.is_integer(column.type)
        or pa.types.is_string(column.type)
        or pa.types.is_decimal(column.type)
    ):
        text = pc.cast(column, pa.string())  # what Python's str() gives, for these types
    elif pa.types.is_floating(column.type):
        # Arrow's shortest round-trip digits, as Python's, but 3.0 comes out "3"
        text = pc.cast(column, pa.string())
        whole = pc.match_substring_regex(text, r"^-?[0-9]+$")
        text = pc.if_else(whole, pc.binary_join_element_wise(text, ".0", ""), text)
    else:  # as Python prints them: 1.0, datetimes, lists, structs
        text = pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())
    text = pc.fill_null(text, "NULL")
    long = pc.greater(pc.utf8_length(text), MAX_CELL_CHARS)
    if pc.any(long).as_py():
        cut = pc.binary_join_element_wise(
            pc.utf8_slice_codeunits(text, 0, MAX_CELL_CHARS - 1), "…", ""
        )
        text = pc.if_else(long, cut, text)
    return text


def _write_header(out: BinaryIO, names: list[str], widths: list[int], cut: int | None) -> None:
    for row in (names, ["-" * w for w in widths]):
        line = "  ".join(map(str.ljust, row, widths)).rstrip()
        out.write((line[:cut] if cut is not None else line).encode() + b"\n")


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
