"""A TCP proxy on loopback whose bandwidth the test sets: a slow link to a real aggregator."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

CHUNK = 4096


class ThrottledProxy:
    """Forwards 127.0.0.1:`port` to `upstream`, at most `bytes_per_s` each way (None: full
    speed); the rate can change while connections are open."""

    def __init__(self, upstream: tuple[str, int], bytes_per_s: float | None = None) -> None:
        self.upstream = upstream
        self.bytes_per_s = bytes_per_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self.upstream)
            except OSError:
                continue
            self._sockets += (client, server)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(CHUNK):
                rate = self.bytes_per_s
                if rate:
                    time.sleep(len(data) / rate)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for end in self._sockets:
            end.close()

    def __enter__(self) -> ThrottledProxy:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
