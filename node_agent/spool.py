"""A bounded on-disk queue of batches the aggregator has not acknowledged yet.

Batches wait here, oldest first, while the aggregator is down or slow, and survive an agent
restart. When the spool exceeds its size cap the oldest batches are dropped, counted and
logged: the node's disk matters more than old profiles.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path

from google.protobuf.message import DecodeError

from fleetprof.proto.ingest.v1 import ingest_pb2

log = logging.getLogger(__name__)

SUFFIX = ".batch"


class Spool:
    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.dropped = 0
        # Oldest first: (path, size). Numbered names keep the order across restarts.
        self._files: deque[tuple[Path, int]] = deque(
            (path, path.stat().st_size) for path in sorted(self.directory.glob(f"*{SUFFIX}"))
        )
        self.bytes = sum(size for _, size in self._files)
        self._next_number = int(self._files[-1][0].stem) + 1 if self._files else 0
        for stale in self.directory.glob("*.tmp"):  # an interrupted append
            stale.unlink(missing_ok=True)
        if self._files:
            log.info("spool %s holds %d undelivered batches", self.directory, len(self._files))

    def __len__(self) -> int:
        return len(self._files)

    def append(self, batch: ingest_pb2.IngestBatch) -> None:
        data = batch.SerializeToString()
        path = self.directory / f"{self._next_number:016d}{SUFFIX}"
        self._next_number += 1
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)  # a batch file is whole or absent
        self._files.append((path, len(data)))
        self.bytes += len(data)
        while self.bytes > self.max_bytes and len(self._files) > 1:
            self._drop_oldest()

    def oldest(self) -> ingest_pb2.IngestBatch | None:
        while self._files:
            path, _ = self._files[0]
            try:
                return ingest_pb2.IngestBatch.FromString(path.read_bytes())
            except (OSError, DecodeError) as exc:  # removed or corrupted under us
                log.error("dropping unreadable spooled batch %s: %s", path, exc)
                self._drop_oldest()
        return None

    def remove_oldest(self) -> None:
        path, size = self._files.popleft()
        path.unlink(missing_ok=True)
        self.bytes -= size

    def _drop_oldest(self) -> None:
        path, _ = self._files[0]
        self.remove_oldest()
        self.dropped += 1
        log.warning(
            "spool over %d bytes: dropped the oldest batch %s (%d dropped so far)",
            self.max_bytes,
            path.name,
            self.dropped,
        )
