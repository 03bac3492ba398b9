"""Transport security of the wire contract: TLS, mutual TLS for agents, bearer tokens.

Rules: every gRPC endpoint may use TLS; when the aggregator names a client CA, every client
(agents above all) proves who it is with a certificate signed by it (mutual TLS, enforced
in the handshake); queries also carry a bearer token when the aggregator has tokens.
Loopback may stay plaintext and open for local use; any other address needs TLS unless
the user explicitly passes --insecure. A token may be limited to some jobs and namespaces
(AccessScope): its queries see only their samples, and it can profile only those jobs.
Agents write only the nodes their credential grants (NodeGrant, docs/security.md): a token
or a client certificate per agent or node group, named in an agent credentials file.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import grpc

from fleetprof.proto import otlp

AUTHORIZATION = "authorization"
# Agents' calls: they authenticate with ingest_grant (an agent credential), not query tokens.
# OpenTelemetry agents' OTLP exports are ingest too.
AGENT_METHODS = (
    "/fleetprof.ingest.v1.IngestService/Ingest",
    "/fleetprof.control.v1.ControlService/Connect",
    otlp.EXPORT_METHOD,
)


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
class AccessScope:
    """What a limited token may see: samples of these jobs, or of pods in these namespaces."""

    jobs: frozenset[str] = frozenset()
    namespaces: frozenset[str] = frozenset()

    def allows_job(self, job: str) -> bool:
        return job in self.jobs


def parse_tokens(lines: Iterable[str]) -> dict[str, AccessScope | None]:
    """A token file: `TOKEN` (sees everything) or `TOKEN jobs=a,b namespaces=x` per line;
    blank lines and `#` comments are skipped."""
    tokens: dict[str, AccessScope | None] = {}
    for number, line in enumerate(lines, start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        token, *rules = words
        limits: dict[str, frozenset[str]] = {}
        for rule in rules:
            key, sep, values = rule.partition("=")
            if key not in ("jobs", "namespaces") or not sep or not values:
                raise ValueError(f"token file line {number}: expected jobs=A,B or namespaces=X,Y")
            limits[key] = frozenset(v for v in values.split(",") if v)
        tokens[token] = AccessScope(**limits) if limits else None
    return tokens


@dataclass(frozen=True)
class NodeGrant:
    """The nodes an agent credential may write samples of (fnmatch patterns); `name` says
    which credential it is in logs (never the secret itself)."""

    name: str
    nodes: tuple[str, ...] = ("*",)

    def allows(self, node: str) -> bool:
        return any(fnmatchcase(node, pattern) for pattern in self.nodes)


CERT_PREFIX = "cert:"


def parse_agent_credentials(lines: Iterable[str]) -> dict[str, NodeGrant]:
    """An agent credentials file: `TOKEN nodes=web-*,db-1` (a bearer token) or
    `cert:NAME nodes=...` (a client certificate whose subject CN or a DNS SAN is NAME) per
    line; `nodes=` is required. Keys are tokens, or `cert:NAME`."""
    grants: dict[str, NodeGrant] = {}
    for number, line in enumerate(lines, start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        credential, *rules = words
        key, sep, values = rules[0].partition("=") if len(rules) == 1 else ("", "", "")
        nodes = tuple(v for v in values.split(",") if v)
        if key != "nodes" or not sep or not nodes:
            raise ValueError(f"agent credentials line {number}: expected CREDENTIAL nodes=A,B*")
        name = credential if credential.startswith(CERT_PREFIX) else f"token of line {number}"
        grants[credential] = NodeGrant(name, nodes)
    return grants


class IngestDenied(PermissionError):
    """An ingest caller that is not who it must be; `code` is the gRPC status to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


ANYONE = NodeGrant("an unauthenticated client")


@dataclass(frozen=True)
class ServerSecurity:
    """What an aggregator demands of its clients."""

    cert: str | None = None
    key: str | None = None
    # With a client CA, every client must present a certificate signed by it.
    client_ca: str | None = None
    # With tokens, every RPC but the agents' requires one of them as a bearer token; a
    # token mapped to a scope sees only that scope.
    tokens: Mapping[str, AccessScope | None] = field(default_factory=dict)
    insecure: bool = False
    # Agent credentials (parse_agent_credentials): with them, or with query tokens, every
    # ingest caller must prove which nodes it may write.
    agents: Mapping[str, NodeGrant] = field(default_factory=dict)

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

    def ingest_grant(
        self,
        metadata: Iterable[tuple[str, str | bytes]] | None,
        auth_context: Mapping[str, Sequence[bytes]],
    ) -> NodeGrant:
        """Which nodes an ingest caller (gRPC metadata and auth context, as the OTLP receiver
        has them too) may write; raises IngestDenied. Accepted: an agent token, a query
        token that sees everything, a client certificate named in the agent credentials
        or, when no certificate is named there, any certificate of the client CA."""
        token = bearer_token(metadata)
        if token is not None and token in self.agents:
            return self.agents[token]
        if token is not None and token in self.tokens and self.tokens[token] is None:
            return NodeGrant("a query token that sees everything")
        names = [
            value.decode(errors="replace")
            for key in ("x509_common_name", "x509_subject_alternative_name")
            for value in auth_context.get(key, ())
        ]
        for name in names:
            if (grant := self.agents.get(CERT_PREFIX + name)) is not None:
                return grant
        certified = bool(names) and self.client_ca is not None
        if certified and not any(key.startswith(CERT_PREFIX) for key in self.agents):
            return NodeGrant(f"certificate {names[0]}")
        if not (self.tokens or self.agents):
            return ANYONE
        raise IngestDenied(
            grpc.StatusCode.UNAUTHENTICATED,
            "ingest needs an agent credential: a token (--token) or a client certificate "
            "named in the aggregator's --agent-credentials",
        )

    def scope(self, token: str | None) -> AccessScope | None:
        """The scope of an accepted token (None: everything; the interceptor has already
        turned away requests without a valid token)."""
        return self.tokens.get(token) if token else None


class HandlerInterceptor(grpc.ServerInterceptor):
    """A server interceptor that may answer a call with a handler of its own
    (`same_shape`); calls of unknown methods pass through."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        return None if handler is None else self.intercept(handler, details)

    def intercept(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        raise NotImplementedError


class _TokenInterceptor(HandlerInterceptor):
    """Requires a bearer token on every RPC but the agents' (AGENT_METHODS)."""

    def __init__(self, tokens: Mapping[str, AccessScope | None]) -> None:
        self._tokens = tokens

    def intercept(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if details.method in AGENT_METHODS:
            return handler
        if bearer_token(details.invocation_metadata) in self._tokens:
            return handler
        return _refusing(handler, "a valid bearer token is required")


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer T` header, if there is one."""
    header = dict(metadata or ()).get(AUTHORIZATION, "")
    scheme, _, token = str(header).partition(" ")
    return token if scheme.lower() == "bearer" else None


def _refusing(handler: grpc.RpcMethodHandler, problem: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers UNAUTHENTICATED."""

    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    return same_shape(handler, refuse)


def same_shape(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind (unary or streaming each way) and (de)serializers that
    runs `behavior(request or request iterator, context)` instead."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    make = next(make for name, make in kinds if getattr(handler, name))
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
