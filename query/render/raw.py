"""The raw rows of a selection, each sample row joined with its stack: Parquet or Arrow IPC.

For analysis elsewhere (pandas, Polars, DuckDB, Spark); written batch by batch as the
query streams, so an export of any size needs no more memory than one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc

from fleetprof.query.filters import SampleFilter
from fleetprof.query.render.base import RenderOptions
from fleetprof.query.result_formats import write_arrow, write_parquet


@dataclass(frozen=True)
class RawRowsRenderer:
    suffixes: tuple[str, ...]
    write: Callable[[pa.RecordBatchReader, BinaryIO], None]

    def rows_sql(self, selection: SampleFilter) -> str:
        return f"""
            SELECT samples.*, stacks.frames, stacks.modules, stacks.kinds
            FROM samples JOIN stacks USING (stack_id)
            WHERE {selection.where()}
            ORDER BY ts, node, pid, tid, stack_id
        """

    def render_rows(self, rows: pa.RecordBatchReader, options: RenderOptions, out: BinaryIO) -> int:
        total = 0

        def counted() -> Iterator[pa.RecordBatch]:
            nonlocal total
            for batch in rows:
                total += pc.sum(batch["weight"]).as_py() or 0
                yield batch

        self.write(pa.RecordBatchReader.from_batches(rows.schema, counted()), out)
        return total


PARQUET = RawRowsRenderer((".parquet",), write_parquet)
ARROW = RawRowsRenderer((".arrow", ".feather"), write_arrow)
