"""Transport security of the wire contract: TLS, mutual TLS for agents, bearer tokens.

Rules: every gRPC endpoint may use TLS; when the aggregator names a client CA, every client
(agents above all) proves who it is with a certificate signed by it (mutual TLS, enforced
in the handshake); queries also carry a bearer token when the aggregator has tokens.
Loopback may stay plaintext and open for local use; any other address needs TLS unless
the user explicitly passes --insecure.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

AUTHORIZATION = "authorization"
INGEST_PREFIX = "/fleetprof.ingest.v1.IngestService/"


def is_loopback(address: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (with a :port)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


@dataclass(frozen=True)
class ClientSecurity:
    """How a client (agent, query, CLI) reaches an aggregator."""

    ca: str | None = None  # PEM bundle trusted for the aggregator's certificate
    cert: str | None = None  # client certificate, for mutual TLS
    key: str | None = None
    token: str | None = None
    insecure: bool = False

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        if self.ca or self.cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(self.ca),
                private_key=_read(self.key),
                certificate_chain=_read(self.cert),
            )
            return grpc.secure_channel(address, credentials, options=list(options))
        if not (is_loopback(address) or self.insecure):
            raise ValueError(
                f"{address} is not a loopback address: give --tls-ca (TLS) or --insecure"
            )
        return grpc.insecure_channel(address, options=list(options))

    def metadata(self) -> list[tuple[str, str]]:
        return [(AUTHORIZATION, f"Bearer {self.token}")] if self.token else []


@dataclass(frozen=True)
class ServerSecurity:
    """What an aggregator demands of its clients."""

    cert: str | None = None
    key: str | None = None
    # With a client CA, every client must present a certificate signed by it.
    client_ca: str | None = None
    # With tokens, every RPC but ingest (agents) requires one of them as a bearer token.
    tokens: frozenset[str] = field(default_factory=frozenset)
    insecure: bool = False

    def add_port(self, server: grpc.Server, listen: str) -> int:
        """Bind `listen` with TLS when configured; refuse plaintext off loopback."""
        if self.cert:
            credentials = grpc.ssl_server_credentials(
                [(_read(self.key), _read(self.cert))],
                root_certificates=_read(self.client_ca),
                require_client_auth=self.client_ca is not None,
            )
            return server.add_secure_port(listen, credentials)
        if self.client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if not (is_loopback(listen) or self.insecure):
            raise ValueError(
                f"refusing to listen on {listen} without TLS: give --tls-cert/--tls-key "
                "or --insecure"
            )
        return server.add_insecure_port(listen)

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [_TokenInterceptor(self.tokens)] if self.tokens else []


class _TokenInterceptor(grpc.ServerInterceptor):
    """Requires a bearer token on every RPC but ingest."""

    def __init__(self, tokens: frozenset[str]) -> None:
        self._tokens = tokens

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(INGEST_PREFIX):
            return handler
        header = dict(details.invocation_metadata or ()).get(AUTHORIZATION, "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token in self._tokens:
            return handler
        return _refusing(handler, "a valid bearer token is required")


def _refusing(handler: grpc.RpcMethodHandler, problem: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers UNAUTHENTICATED."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    make = next(make for name, make in kinds if getattr(handler, name))

    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
