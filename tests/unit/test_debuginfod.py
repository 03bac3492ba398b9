"""The debuginfod client against a small HTTP server of the test's own (tests/integration/
test_debuginfod.py has the real elfutils server and a real agent)."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fleetprof.node_agent.symbolize.debuginfod import DebuginfodClient, DebuginfodOptions
from fleetprof.node_agent.symbolize.elf import ElfCache, ElfSymbols, file_reader, read_layout
from tests.conftest import require

SOURCE = "__attribute__((noinline)) int hidden_%s(int x) { return x * 3; }\n"
SOURCE += "int main(int argc, char **argv) { return hidden_%s(argc); }\n"


class Served:
    """Debug files by build id over HTTP; every path asked is recorded. silent: requests
    are held, never answered (until the server closes)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.asked: list[str] = []
        self.silent = threading.Event()
        served = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served.asked.append(self.path)
                if served.silent.is_set():
                    time.sleep(5)
                    return
                parts = self.path.split("/")  # /buildid/HEX/debuginfo
                body = served.files.get(parts[2]) if len(parts) > 2 else None
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def served() -> Iterator[Served]:
    server = Served()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def stripped(tmp_path: Path) -> Callable[[str], tuple[Path, str, bytes]]:
    """A stripped program of its own build id: (binary, build id hex, its debug file)."""
    require(shutil.which("gcc") is not None, "gcc is not installed")

    def build(name: str) -> tuple[Path, str, bytes]:
        (tmp_path / f"{name}.c").write_text(SOURCE % (name, name))
        binary, debug = tmp_path / name, tmp_path / f"{name}.debug"
        subprocess.run(
            ["gcc", "-O2", "-g", "-Wl,--build-id", "-o", str(binary), f"{binary}.c"], check=True
        )
        subprocess.run(["objcopy", "--only-keep-debug", str(binary), str(debug)], check=True)
        subprocess.run(["strip", "--strip-all", str(binary)], check=True)
        with binary.open("rb") as f:
            build_id = read_layout(file_reader(f.fileno()), binary.stat().st_size).build_id
        return binary, build_id.hex(), debug.read_bytes()

    return build


def client(served: Served, cache: Path, **options: float) -> DebuginfodClient:
    return DebuginfodClient(DebuginfodOptions((served.url,), str(cache), **options))  # type: ignore[arg-type]


def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def hidden_named(table: ElfSymbols, binary: Path) -> bool:
    """Whether the table names some address hidden_*: scanned over the file's text."""
    size = binary.stat().st_size
    return any((table.resolve_file_offset(at) or "").startswith("hidden_") for at in range(size))


def test_options_are_read_as_elfutils_reads_them() -> None:
    environ = {
        "DEBUGINFOD_URLS": "https://a.example ima:enforcing http://b.example/ file:///x",
        "DEBUGINFOD_CACHE_PATH": "/srv/cache",
        "DEBUGINFOD_TIMEOUT": "7",
        "DEBUGINFOD_MAXSIZE": "1000",
        "DEBUGINFOD_MAXTIME": "nonsense",
    }
    options = DebuginfodOptions.from_environment(environ)
    assert options.urls == ("https://a.example", "http://b.example/")
    assert (options.cache_dir, options.timeout_s, options.max_bytes) == ("/srv/cache", 7, 1000)
    assert options.max_time_s == DebuginfodOptions.max_time_s
    assert DebuginfodOptions.from_environment(environ, "/mine").cache_dir == "/mine"
    assert DebuginfodOptions.from_environment({}).urls == ()


def test_a_fetched_file_names_the_table_once_delivered_and_serves_from_the_cache(
    served, stripped, tmp_path
) -> None:
    binary, build_id, debug = stripped("fetched")
    served.files[build_id] = debug
    first = client(served, tmp_path / "cache")
    table = ElfCache(remote=first).get(str(binary))
    assert table is not None and not hidden_named(table, binary)
    until(lambda: first.stats["fetched"] == 1)
    assert not hidden_named(table, binary), "names change only in the resolving thread"
    assert first.deliver() == 1 and hidden_named(table, binary)
    assert (tmp_path / "cache" / build_id / "debuginfo").read_bytes() == debug
    # Another agent, or this one restarted: named at once from the cache, nothing asked.
    again = client(served, tmp_path / "cache")
    table = ElfCache(remote=again).get(str(binary))
    assert table is not None and hidden_named(table, binary)
    assert len(served.asked) == 1 and again.stats["requested"] == 0


def test_a_404_is_remembered_on_disk_for_a_while(served, stripped, tmp_path) -> None:
    binary, build_id, _ = stripped("missing")
    first = client(served, tmp_path / "cache")
    kept = [ElfCache(remote=first).get(str(binary)) for _ in range(3)]  # 3 reads, 1 request
    until(lambda: first.stats["not_found"] == 1)
    assert len(served.asked) == 1 and first.stats["requested"] == 1, (kept, first.stats)
    miss = (tmp_path / "cache" / build_id / "debuginfo").stat()
    assert miss.st_size == 0 and miss.st_mode & 0o777 == 0
    again = client(served, tmp_path / "cache")
    kept.append(ElfCache(remote=again).get(str(binary)))
    until(lambda: again.stats["cached_misses"] == 1)
    assert len(served.asked) == 1
    expired = client(served, tmp_path / "cache", miss_ttl_s=0.001)
    kept.append(ElfCache(remote=expired).get(str(binary)))
    until(lambda: expired.stats["not_found"] == 1)
    assert len(served.asked) == 2


@pytest.mark.parametrize("served_file", ["too large", "another build's"])
def test_an_unusable_file_is_not_kept(served, stripped, tmp_path, served_file) -> None:
    binary, build_id, debug = stripped("wanted")
    _, _, other = stripped("other")
    served.files[build_id] = debug if served_file == "too large" else other
    cap = len(debug) // 2 if served_file == "too large" else len(debug) + len(other)
    fetcher = client(served, tmp_path / "cache", max_bytes=cap)
    kept = ElfCache(remote=fetcher).get(str(binary))
    until(lambda: fetcher.stats["failed"] == 1)
    assert kept is not None and fetcher.deliver() == 0 and not hidden_named(kept, binary)
    assert not (tmp_path / "cache" / build_id / "debuginfo").exists()
    assert list((tmp_path / "cache").glob("*/.debuginfo.*")) == []


def test_a_silent_server_costs_one_timeout_then_is_left_alone(served, stripped, tmp_path) -> None:
    served.silent.set()
    first, _, _ = stripped("first")
    second, _, _ = stripped("second")
    fetcher = client(served, tmp_path / "cache", timeout_s=0.3, retry_s=60)
    cache = ElfCache(remote=fetcher)
    started = time.monotonic()
    kept = [cache.get(str(first)), cache.get(str(second))]
    assert time.monotonic() - started < 0.25, "asking must not wait for the server"
    until(lambda: fetcher.stats["failed"] == 2)
    assert len(served.asked) == 1, (kept, served.asked)  # the second was not sent to it
