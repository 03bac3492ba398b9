"""The aggregator's web UI and JSON API over HTTP, on the standard library's server.

Off unless `fleetprof aggregator --http HOST:PORT`. It follows the aggregator's transport
security: HTTPS with its --tls-cert/--tls-key, and, with --token-file, every /api/ request
needs a bearer token (`Authorization: Bearer T`, or the HttpOnly cookie that opening
`/?token=T` once sets for a browser). Plaintext off loopback needs --insecure.

    GET  /                  the UI page (query/render/templates/webui.html)
    GET  /static/NAME       its scripts and style sheets, flamegraph.js among them
    GET  /api/meta|flame|top|diff?...   JSON (aggregator/web_api.py)
    POST /api/sql           {"sql": "..."}: JSON, or Arrow IPC for Accept: ARROW_STREAM
    POST /v1development/profiles   OTLP/HTTP profiles, binary (aggregator/otlp_receiver.py)
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import queue
import socket
import ssl
import sys
import threading
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fleetprof.aggregator.otlp_receiver import http_export
from fleetprof.aggregator.query_service import ipc_chunks
from fleetprof.aggregator.storage import ProfileStore
from fleetprof.aggregator.web_api import ENDPOINTS, BadRequest, json_bytes, sql_json, sql_request
from fleetprof.proto import otlp, schema
from fleetprof.proto.security import AccessScope, ServerSecurity, bearer_token, is_loopback
from fleetprof.query.render.html import template
from fleetprof.query.sandbox import DEFAULT_TIMEOUT_S, QueryError, one_line
from fleetprof.query.source import ConnectionSource

log = logging.getLogger(__name__)

PAGE = "webui.html"
STATIC = {
    "flamegraph.js": "text/javascript; charset=utf-8",
    "flamegraph.css": "text/css; charset=utf-8",
    "webui.js": "text/javascript; charset=utf-8",
    "webui.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
ARROW_STREAM = "application/vnd.apache.arrow.stream"
MAX_BODY_BYTES = 1 << 20
# The page runs only its own files and talks only to its own origin: even a frame name
# that slipped past escaping could neither run script nor send data anywhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


TOKEN_COOKIE = "fleetprof_token"


class NotFound(LookupError):
    pass


class Unauthorized(PermissionError):
    pass


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def split_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:PORT` for IPv6) as a bindable address."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bad HTTP address {listen!r}: expected HOST:PORT")
    return host, int(port)


# Connections served at once, and accepted ones waiting for a thread: past both, a new
# connection is closed at once (1,000 half-open connections took one thread each).
HTTP_THREADS = 16
HTTP_BACKLOG = 64
# Connections of one client address, served or waiting: one client cannot take the pool
# (a browser opens about six). Behind a proxy every user has its address.
HTTP_PER_PEER = 8


class _Server(HTTPServer):
    """Connections handled on a fixed pool of daemon threads (not joined at close: an idle
    keep-alive connection would hold stop() for its timeout)."""

    store: ProfileStore
    loopback_only: bool
    # Off loopback in plaintext (--insecure): the Host names answered (IP literals too).
    host_names: frozenset[str] = frozenset()
    security: ServerSecurity
    https: bool
    max_query_s: float
    stopping = False
    # The kernel's queue of connections not accepted yet (socketserver's default: 5). A
    # flood must reach the accept loop, which closes what the pool cannot take; past this
    # queue the kernel drops SYNs, and every client (a real user too) waits 1 s or more.
    request_queue_size = 4 * HTTP_BACKLOG

    def start_pool(self) -> None:
        self._waiting: queue.Queue[tuple[socket.socket, Any] | None] = queue.Queue(HTTP_BACKLOG)
        self._per_peer: Counter[str] = Counter()
        self._peers_lock = threading.Lock()
        for number in range(HTTP_THREADS):
            threading.Thread(target=self._serve_pool, name=f"http-{number}", daemon=True).start()

    def process_request(self, request: socket.socket, client_address: Any) -> None:  # type: ignore[override]
        peer = client_address[0]
        with self._peers_lock:
            crowded = self._per_peer[peer] >= HTTP_PER_PEER
            if not crowded:
                self._per_peer[peer] += 1
        if crowded:
            log.debug("HTTP: %s has %d connections already, closed one", peer, HTTP_PER_PEER)
            self.shutdown_request(request)
            return
        try:
            self._waiting.put_nowait((request, client_address))
        except queue.Full:
            log.debug("HTTP: %d connections waiting already, closed one", HTTP_BACKLOG)
            self._done(request, peer)

    def _done(self, request: socket.socket, peer: str) -> None:
        self.shutdown_request(request)
        with self._peers_lock:
            self._per_peer[peer] -= 1
            if not self._per_peer[peer]:
                del self._per_peer[peer]

    def server_close(self) -> None:
        super().server_close()
        for _ in range(HTTP_THREADS):  # each pool thread ends at one of these
            with contextlib.suppress(queue.Full):
                self._waiting.put_nowait(None)

    def _serve_pool(self) -> None:
        while (waiting := self._waiting.get()) is not None:
            request, client_address = waiting
            try:
                if isinstance(request, ssl.SSLSocket):
                    # Here, not in the accept loop: a client that never starts TLS would
                    # stop every other one there.
                    request.settimeout(_Handler.timeout)
                    request.do_handshake()
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self._done(request, client_address[0])

    def handle_error(self, request: object, client_address: object) -> None:
        """One line, never a traceback: a client that went away is not a server fault."""
        exc = sys.exc_info()[1]
        log.info("HTTP client %s: %s", client_address, one_line(exc) if exc else "error")


class _Server6(_Server):
    address_family = socket.AF_INET6


class WebServer:
    """The HTTP server on its own thread; `address` is HOST:PORT as bound (useful with :0)."""

    def __init__(
        self,
        store: ProfileStore,
        listen: str,
        security: ServerSecurity,
        max_query_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        host, port = split_listen(listen)
        if not (security.cert or is_loopback(listen) or security.insecure):
            raise ValueError(
                f"refusing to serve the web UI on {listen} in plaintext: "
                "give --tls-cert/--tls-key, use a loopback address or --insecure"
            )
        self._httpd = (_Server6 if ":" in host else _Server)((host, port), _Handler)
        self._httpd.store = store
        self._httpd.max_query_s = max_query_s
        self._httpd.security = security
        self._httpd.https = security.cert is not None
        if security.cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(security.cert, security.key)
            self._httpd.socket = context.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        # Served on loopback, the UI answers only to loopback names: a web page whose
        # DNS name rebinds to 127.0.0.1 must not reach it. Off loopback in plaintext, only
        # to this host's names and IP addresses.
        self._httpd.loopback_only = is_loopback(listen)
        if not (security.cert or self._httpd.loopback_only):
            self._httpd.host_names = frozenset({host, socket.gethostname(), socket.getfqdn()})
            log.warning(
                "INSECURE: the web UI on %s is plaintext (--insecure): tokens and profiles "
                "cross the network readable; it answers Host names %s and IP addresses only",
                listen,
                ", ".join(sorted(self._httpd.host_names)),
            )
        bound = self._httpd.server_address[1]
        self.address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        self.url = f"{'https' if security.cert else 'http'}://{self.address}/"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http")

    def start(self) -> None:
        self._httpd.start_pool()
        self._thread.start()

    def stop(self) -> None:
        # kept-alive connections outlive shutdown(): their next request is turned away
        self._httpd.stopping = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the page makes several requests
    server_version = "fleetprof"
    sys_version = ""
    timeout = 20  # s: a stalled or idle keep-alive client gives its thread back
    server: _Server

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _dispatch(self, handle: Callable[[], None]) -> None:
        self._started = False  # True once a streamed answer has sent its status line
        if self.server.stopping:
            self.close_connection = True
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "the aggregator is stopping")
            return
        try:
            self._check_host()
            self._check_token()
            handle()
        except (BadRequest, QueryError) as exc:
            self._error(HTTPStatus.BAD_REQUEST, one_line(exc))
        except Unauthorized as exc:
            self._error(HTTPStatus.UNAUTHORIZED, str(exc), {"WWW-Authenticate": "Bearer"})
        except NotFound as exc:
            self._error(HTTPStatus.NOT_FOUND, str(exc))
        except ConnectionError:
            self.close_connection = True  # the client went away: no one to answer
        except Exception as exc:
            log.exception("HTTP %s %s failed", self.command, self.path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {one_line(exc)}")

    def _check_host(self) -> None:
        host = self.headers.get("Host")
        if not host:
            return
        name = urlsplit(f"//{host}").hostname or ""
        if self.server.loopback_only and not is_loopback(f"[{name}]:0"):  # no port needed
            raise BadRequest(f"this aggregator serves loopback names only, not {host!r}")
        if self.server.host_names and not (name in self.server.host_names or _is_ip(name)):
            raise BadRequest(f"this aggregator does not serve the name {host!r}")

    def _check_token(self) -> None:
        """With tokens, the API answers only requests that carry one (header or cookie);
        `self.scope` is what that token may see."""
        self.scope: AccessScope | None = None
        tokens = self.server.security.tokens
        path = urlsplit(self.path).path
        # OTLP/HTTP authenticates as ingest does (agent credentials), in its handler
        if not tokens or not path.startswith("/api/"):
            return
        cookie = SimpleCookie(self.headers.get("Cookie", "")).get(TOKEN_COOKIE)
        for token in (bearer_token(self._header_items()), cookie and cookie.value):
            if token in tokens:
                self.scope = tokens[token]
                return
        raise Unauthorized("a valid bearer token is required (a browser: open /?token=TOKEN)")

    def _header_items(self) -> list[tuple[str, str]]:
        """The request's headers as gRPC metadata has them (lower-case names)."""
        return [(name.lower(), value) for name, value in self.headers.items()]

    def _log_in(self, token: str) -> None:
        """`/?token=T`: keep the token in an HttpOnly cookie and drop it from the address."""
        if token not in self.server.security.tokens:
            raise Unauthorized("that token is not valid")
        secure = "; Secure" if self.server.https else ""
        cookie = f"{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{secure}"
        self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": "/", "Set-Cookie": cookie})

    def _get(self) -> None:
        url = urlsplit(self.path)
        login = parse_qs(url.query).get("token") if url.path == "/" else None
        if login:
            self._log_in(login[0])
        elif url.path == "/":
            self._send(HTTPStatus.OK, template(PAGE).encode(), "text/html; charset=utf-8")
        elif url.path.startswith("/static/") and url.path[8:] in STATIC:
            name = url.path[8:]
            self._send(HTTPStatus.OK, template(name).encode(), STATIC[name])
        elif url.path in ENDPOINTS:
            try:
                params = parse_qs(url.query, keep_blank_values=True, max_num_fields=200)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            store = self.server.store
            source = ConnectionSource(
                store.reader(), self.server.max_query_s, scope=self.scope, identity=store.path
            )
            try:
                answer = ENDPOINTS[url.path](source, params)
            finally:
                source.close()
            self._send(HTTPStatus.OK, json_bytes(answer), "application/json")
        elif url.path == "/api/sql":
            self._method_not_allowed("POST")
        else:
            raise NotFound(f"no such page: {url.path}")

    def _post(self) -> None:
        path = urlsplit(self.path).path
        if path == otlp.HTTP_PATH:
            self._otlp()
            return
        if path != "/api/sql":
            if path in ENDPOINTS:
                self._method_not_allowed("GET")
                return
            raise NotFound(f"no such page: {path}")
        # JSON only: a cross-site form can post text/plain without asking, never JSON.
        if self.headers.get_content_type() != "application/json":
            self.close_connection = True  # the body was not read
            raise BadRequest("send the query as JSON: Content-Type: application/json")
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise BadRequest(f"a Content-Length up to {MAX_BODY_BYTES} bytes is required")
        sql = sql_request(self.rfile.read(int(length)))
        source = ConnectionSource(
            self.server.store.reader(), self.server.max_query_s, scope=self.scope
        )
        try:
            if ARROW_STREAM in self.headers.get("Accept", ""):
                self._send_arrow(source, sql)
            else:
                self._send(HTTPStatus.OK, sql_json(source, sql), "application/json")
        finally:
            source.close()

    def _otlp(self) -> None:
        if self.headers.get_content_type() != "application/x-protobuf":
            self.close_connection = True  # the body was not read
            self._send(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, b"", "text/plain")
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > schema.MAX_MESSAGE_BYTES:
            self.close_connection = True
            raise BadRequest(f"a Content-Length up to {schema.MAX_MESSAGE_BYTES} is required")
        body = self.rfile.read(int(length))
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        status, body = http_export(
            self.server.store, self.server.security, self._header_items(), body, encoding
        )
        self._send(status, body, "application/x-protobuf")

    def _send_arrow(self, source: ConnectionSource, sql: str) -> None:
        """Stream the result as chunked Arrow IPC. A query that fails before its first
        batch still gets a 400; one that fails later (its timeout) ends the connection
        without the final chunk, so the client sees a truncated stream, not a short one."""
        with source.stream(sql) as reader:
            for data in ipc_chunks(reader):
                if not self._started:
                    self._started = True
                    self.send_response(HTTPStatus.OK)
                    self.send_header("Content-Type", ARROW_STREAM)
                    self.send_header("Transfer-Encoding", "chunked")
                    self._security_headers()
                    self.end_headers()
                if data:
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))
        self.wfile.write(b"0\r\n\r\n")

    def _method_not_allowed(self, allowed: str) -> None:
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"use {allowed}", {"Allow": allowed})

    def _error(
        self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None
    ) -> None:
        if self._started:
            self.close_connection = True
            return
        self._send(status, json_bytes({"error": message}), "application/json", headers)

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self._security_headers()
        self.end_headers()
        self.wfile.write(body)

    def _security_headers(self) -> None:
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
