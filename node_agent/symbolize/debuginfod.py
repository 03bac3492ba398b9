"""A debuginfod client: debug files of stripped binaries, fetched by build id in the background.

The protocol is elfutils' (debuginfod(8)): `GET <url>/buildid/<hex>/debuginfo` of each server
in DEBUGINFOD_URLS (space-separated), in order; 200 is the file, 404 says that server has
none. The cache is laid out as elfutils' own client lays out its (`<cache>/<hex>/debuginfo`;
an empty file of mode 000 records a miss, trusted for a while from its mtime), so a cache
shared with gdb or eu-stack through DEBUGINFOD_CACHE_PATH means the same to each.

Nothing here makes the drain thread wait on the network: request() queues a build id, one
worker thread downloads, checks and parses; deliver(), from the drain thread, hands the
names to the tables that asked. Until then their frames are named as without the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

from fleetprof.node_agent.symbolize.elf import ElfSymbols, debug_file_symbols

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "/var/cache/fleetprof/debuginfod"
_CHUNK = 1 << 20
STATS = ("requested", "fetched", "not_found", "failed", "cached_misses")


@dataclass(frozen=True)
class DebuginfodOptions:
    """What the client does; no urls: no client."""

    urls: tuple[str, ...] = ()
    cache_dir: str = DEFAULT_CACHE_DIR
    # Per connect or read (DEBUGINFOD_TIMEOUT), and for a whole download (DEBUGINFOD_MAXTIME).
    timeout_s: float = 5.0
    max_time_s: float = 120.0
    # A larger file is not downloaded (DEBUGINFOD_MAXSIZE; sent as X-DEBUGINFOD-MAXSIZE).
    max_bytes: int = 512 << 20
    # A build id all servers said 404 to is not asked again for this long (elfutils'
    # cache_miss_s); a server that failed is left alone for retry_s, its build ids retried.
    miss_ttl_s: float = 600.0
    retry_s: float = 60.0

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] = os.environ, cache_dir: str | None = None
    ) -> DebuginfodOptions:
        """As elfutils' client reads its environment (`ima:` policy tags are skipped);
        `cache_dir`, if given, wins over DEBUGINFOD_CACHE_PATH."""
        urls = tuple(
            url
            for url in environ.get("DEBUGINFOD_URLS", "").split()
            if url.startswith(("http://", "https://"))
        )

        def number(name: str, default: float) -> float:
            try:
                value = float(environ.get(name, ""))
            except ValueError:
                return default
            return value if value > 0 else default

        return cls(
            urls,
            cache_dir or environ.get("DEBUGINFOD_CACHE_PATH") or DEFAULT_CACHE_DIR,
            number("DEBUGINFOD_TIMEOUT", cls.timeout_s),
            number("DEBUGINFOD_MAXTIME", cls.max_time_s),
            int(number("DEBUGINFOD_MAXSIZE", cls.max_bytes)),
        )


class _Failed(Exception):
    """A server that did not answer with a usable file (other than 404)."""


class DebuginfodClient:
    """Fetches debug files for ElfCache (elf.RemoteDebugInfo) from debuginfod servers.

    stats: build ids `requested`, files `fetched`, `not_found` (every server said 404),
    `failed` (timeouts, refused connections, errors, files too large or of another build;
    retried after retry_s), `cached_misses` (a miss remembered on disk, no request made).
    """

    def __init__(self, options: DebuginfodOptions) -> None:
        self.options = options
        self.stats = dict.fromkeys(STATS, 0)
        self._lock = threading.Condition()
        # Build id -> when to fetch it; those being fetched; misses -> until when.
        self._due: dict[bytes, float] = {}
        self._busy: set[bytes] = set()
        self._missing: dict[bytes, float] = {}
        self._waiting: dict[bytes, weakref.WeakSet[ElfSymbols]] = {}
        self._arrived: list[tuple[bytes, ElfSymbols]] = []
        self._down_until: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    def _path(self, build_id: bytes) -> str:
        return os.path.join(self.options.cache_dir, build_id.hex(), "debuginfo")

    def cached(self, build_id: bytes) -> str | None:
        path = self._path(build_id)
        try:
            return path if os.stat(path).st_size > 0 else None
        except OSError:
            return None

    def request(self, build_id: bytes, table: ElfSymbols) -> None:
        with self._lock:
            self._waiting.setdefault(build_id, weakref.WeakSet()).add(table)
            if build_id in self._due or build_id in self._busy:
                return
            if self._missing.get(build_id, 0.0) > time.monotonic():
                return
            self._due[build_id] = time.monotonic()
            self.stats["requested"] += 1
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="debuginfod", daemon=True)
                self._thread.start()
            self._lock.notify()

    def deliver(self) -> int:
        """Give the tables that asked the names of the files arrived since the last call;
        how many tables were given names. Call it from the thread that resolves names."""
        with self._lock:
            arrived, self._arrived = self._arrived, []
            given = [(list(self._waiting.pop(b, ())), table) for b, table in arrived]
        for waiting, table in given:
            for old in waiting:
                old.take_names(table)
        return sum(len(waiting) for waiting, _ in given)

    def close(self) -> None:
        """Stop the worker (a download under way ends at its next read, within timeout_s)."""
        with self._lock:
            self._closed = True
            self._lock.notify()

    def _run(self) -> None:
        while (build_id := self._next()) is not None:
            try:
                table = self._fetch(build_id)
            except Exception:  # a bug must not end the worker, nor the agent
                log.exception("debuginfod: fetching %s failed", build_id.hex())
                table = None
            with self._lock:
                self._busy.discard(build_id)
                if table is not None:
                    self._arrived.append((build_id, table))

    def _next(self) -> bytes | None:
        """The next build id due, once one is; None when closed."""
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                due = min(self._due, key=self._due.__getitem__, default=None)
                if due is not None and self._due[due] <= now:
                    del self._due[due]
                    if not self._waiting.get(due):
                        continue  # every table that wanted it is gone
                    self._busy.add(due)
                    return due
                self._lock.wait(self._due[due] - now if due is not None else None)
            return None

    def _fetch(self, build_id: bytes) -> ElfSymbols | None:
        """The debug file's symbols, from the cache or a server; None if there are none.
        Counts the outcome, remembers misses and schedules retries."""
        path = self._path(build_id)
        if self._cached_miss(path):
            self._count("cached_misses", build_id)
            return None
        table = self._load(path, build_id)
        if table is not None:
            return table
        outcome = "not_found"
        for url in self.options.urls:
            if self._down_until.get(url, 0.0) > time.monotonic():
                outcome = "failed"
                continue
            try:
                table = self._download(url, build_id, path)
            except urllib.error.HTTPError as error:
                error.close()
                if error.code == 404:
                    continue
                outcome = "failed"
                log.warning("debuginfod: %s answered %s for %s", url, error.code, build_id.hex())
            except (_Failed, OSError, ValueError) as error:  # URLError, timeouts are OSErrors
                outcome = "failed"
                self._down_until[url] = time.monotonic() + self.options.retry_s
                log.warning(
                    "debuginfod: %s failed for %s (%s); left alone for %g s",
                    url,
                    build_id.hex(),
                    error,
                    self.options.retry_s,
                )
            else:
                self._count("fetched", build_id)
                return table
        if outcome == "not_found":
            self._remember_miss(path)
        self._count(outcome, build_id)
        return None

    def _count(self, outcome: str, build_id: bytes) -> None:
        """Count an outcome; a miss is not asked again for miss_ttl_s, a failure is
        retried after retry_s."""
        with self._lock:
            self.stats[outcome] += 1
            if outcome in ("not_found", "cached_misses"):
                self._missing[build_id] = time.monotonic() + self.options.miss_ttl_s
            elif outcome == "failed":
                self._due[build_id] = time.monotonic() + self.options.retry_s

    def _cached_miss(self, path: str) -> bool:
        """A miss recorded (an empty file of mode 000) within miss_ttl_s; an older one is
        removed, so the servers are asked again."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        if st.st_size or st.st_mode & 0o777:
            return False
        if time.time() - st.st_mtime < self.options.miss_ttl_s:
            return True
        _unlink(path)
        return False

    def _remember_miss(self, path: str) -> None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0))
            os.chmod(path, 0)
        except OSError:
            pass  # remembered in memory only

    def _load(self, path: str, build_id: bytes) -> ElfSymbols | None:
        symbols = debug_file_symbols(path, build_id)
        if symbols is None or not len(symbols.value):
            return None
        return ElfSymbols(None, symbols)

    def _download(self, url: str, build_id: bytes, path: str) -> ElfSymbols:
        """Download into the cache (else a temporary file, dropped after parsing) and parse;
        raises HTTPError (404 among them), _Failed or OSError."""
        request = urllib.request.Request(
            f"{url.rstrip('/')}/buildid/{build_id.hex()}/debuginfo",
            headers={
                "User-Agent": "fleetprof-agent",
                "X-DEBUGINFOD-MAXSIZE": str(self.options.max_bytes),
            },
        )
        deadline = time.monotonic() + self.options.max_time_s
        with urllib.request.urlopen(request, timeout=self.options.timeout_s) as response:
            if int(response.headers.get("Content-Length") or 0) > self.options.max_bytes:
                raise _Failed(f"larger than {self.options.max_bytes} bytes")
            fd, spooled, kept = _spool_file(os.path.dirname(path))
            try:
                with os.fdopen(fd, "wb") as out:
                    size = 0
                    while chunk := response.read(_CHUNK):
                        size += len(chunk)
                        if size > self.options.max_bytes:
                            raise _Failed(f"larger than {self.options.max_bytes} bytes")
                        if time.monotonic() > deadline:
                            raise _Failed(f"slower than {self.options.max_time_s} s")
                        out.write(chunk)
                table = self._load(spooled, build_id)
                if table is None:
                    raise _Failed("not a debug file of this build id")
                if kept:
                    os.replace(spooled, path)
                    spooled = ""
                log.info(
                    "debuginfod: %s: %d bytes from %s, %d symbols",
                    build_id.hex(),
                    size,
                    url,
                    len(table),
                )
                return table
            finally:
                if spooled:
                    _unlink(spooled)


def _spool_file(folder: str) -> tuple[int, str, bool]:
    """(fd, path, in the cache) of a new file to download into: in the cache's folder for
    this build id, else (a full or read-only cache) a temporary file."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=".debuginfo.", dir=folder)
        return fd, path, True
    except OSError:
        fd, path = tempfile.mkstemp(prefix="fleetprof-debuginfo.")
        return fd, path, False


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
