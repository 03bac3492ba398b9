"""OTLP/gRPC ProfilesService/Export on its own port (`fleetprof aggregator --otlp-listen`),
and OTLP/HTTP (binary protobuf) at /v1development/profiles of the web server (`--http`).

Each request is decoded whole (aggregator/otlp_decode.py), every batch of it validated by
validate_batch, then stored like an agent's: a bad request gets INVALID_ARGUMENT with the
reason and stores nothing. The port has the aggregator's transport security (its TLS and
client CA), and a sender proves which nodes it may write as an agent does
(ServerSecurity.ingest_grant: agent credentials); a request with another node's samples is
refused whole.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Sequence
from concurrent import futures
from http import HTTPStatus
from typing import Any

import grpc
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2

from fleetprof.aggregator.ingest_service import store_valid
from fleetprof.aggregator.otlp_decode import Decoded, decode_request
from fleetprof.aggregator.storage import ProfileStore, StorageUnavailable
from fleetprof.aggregator.validate import validate_batch
from fleetprof.proto import otlp, schema
from fleetprof.proto.security import ANYONE, IngestDenied, NodeGrant, ServerSecurity

log = logging.getLogger(__name__)

# Decoding is Python under the GIL: more threads would only queue behind each other.
WORKERS = 8
# The dropped-data summary of a response names at most this many kinds of data.
MOST_REPORTED = 10
# Each kind of data not stored (a sample type, an attribute key) is logged the first time
# an export carries it: exporters send the same ones in every request. Past this many
# kinds (keys are the sender's to choose) the rest go unlogged, still in each response.
MOST_LOGGED = 1000
_logged: set[str] = set()
_logged_lock = threading.Lock()


def export(
    store: ProfileStore, data: bytes, grant: NodeGrant
) -> profiles_service_pb2.ExportProfilesServiceResponse:
    """Decode, check and store one serialized ExportProfilesServiceRequest from a caller
    that may write `grant`'s nodes (ServerSecurity.ingest_grant, as for agents). Raises
    schema.SchemaError (bad request), IngestDenied (a node the grant does not name) or
    StorageUnavailable; nothing of the request is stored then, except after a
    StorageUnavailable between its nodes' batches (a retry stores the rest: the stored
    ones are duplicates)."""
    decoded = decode_request(data)
    for batch in decoded.batches:
        if not grant.allows(batch.node):
            raise IngestDenied(
                grpc.StatusCode.PERMISSION_DENIED, f"{grant.name} may not write node {batch.node!r}"
            )
    valid = [validate_batch(batch) for batch in decoded.batches]
    for batch in valid:
        store_valid(store, batch)
    _log_first_dropped(decoded)
    return _response(decoded)


def _log_first_dropped(decoded: Decoded) -> None:
    """Tell the aggregator's operator, once per kind, what OTLP senders send that no
    column holds (the senders are told in every response)."""
    with _logged_lock:
        new = sorted(decoded.dropped.keys() - _logged)[: MOST_LOGGED - len(_logged)]
        _logged.update(new)
    if new:
        log.warning("OTLP data not stored, no fleetprof column for: %s", ", ".join(new))


def _response(decoded: Decoded) -> profiles_service_pb2.ExportProfilesServiceResponse:
    """OTLP's partial success: the profiles rejected (no fleetprof event for their sample
    type) and, as a warning, what had no column."""
    response = profiles_service_pb2.ExportProfilesServiceResponse()
    if decoded.dropped or decoded.rejected_profiles:
        kinds = decoded.dropped.most_common()
        summary = ", ".join(f"{what} ({count} samples)" for what, count in kinds[:MOST_REPORTED])
        if len(kinds) > MOST_REPORTED:
            summary += f", {len(kinds) - MOST_REPORTED} more"
        response.partial_success.rejected_profiles = decoded.rejected_profiles
        response.partial_success.error_message = f"not stored: {summary}"
    return response


def http_export(
    store: ProfileStore,
    security: ServerSecurity,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    encoding: str,
) -> tuple[HTTPStatus, bytes]:
    """An OTLP/HTTP answer to a body in a Content-Encoding: the response, or an error
    status with a google.rpc.Status."""
    try:
        grant = _http_grant(security, headers)
        data = _inflate(body, encoding)
        return HTTPStatus.OK, export(store, data, grant).SerializeToString()
    except schema.SchemaError as exc:
        log.warning("rejected OTLP/HTTP export: %s", exc)
        return HTTPStatus.BAD_REQUEST, _status(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except IngestDenied as exc:
        log.warning("refused OTLP/HTTP export: %s", exc)
        status = _HTTP_STATUS.get(exc.code, HTTPStatus.FORBIDDEN)
        return status, _status(exc.code, str(exc))
    except StorageUnavailable as exc:  # 503: the client retries
        log.error("cannot store OTLP/HTTP export: %s", exc)
        message = f"storage unavailable: {exc}"
        return HTTPStatus.SERVICE_UNAVAILABLE, _status(grpc.StatusCode.UNAVAILABLE, message)


_HTTP_STATUS = {grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED}


def _http_grant(security: ServerSecurity, headers: Sequence[tuple[str, str]]) -> NodeGrant:
    """The nodes an OTLP/HTTP caller may write. The web server asks for no client
    certificate, so only a bearer token (an agent token, a query token that sees
    everything) names the caller; where gRPC demands certificates (a client CA) and no
    token could name one, OTLP/HTTP is closed rather than open to anyone."""
    grant = security.ingest_grant(headers, {})
    if grant is ANYONE and security.client_ca:
        raise IngestDenied(
            grpc.StatusCode.UNAUTHENTICATED,
            "OTLP/HTTP cannot check client certificates: give the aggregator agent "
            "credentials or tokens, or use OTLP/gRPC",
        )
    return grant


def _inflate(body: bytes, encoding: str) -> bytes:
    """The body decompressed (the Collector's OTLP/HTTP exporter gzips by default), up to
    the size a gRPC message may have."""
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        raise schema.SchemaError(f"unsupported Content-Encoding {encoding!r}: use gzip or none")
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    try:
        data = inflater.decompress(body, schema.MAX_MESSAGE_BYTES)
    except zlib.error as exc:
        raise schema.SchemaError(f"malformed gzip body: {exc}") from None
    if inflater.unconsumed_tail:
        raise schema.SchemaError(f"more than {schema.MAX_MESSAGE_BYTES} bytes once decompressed")
    return data


def _status(code: grpc.StatusCode, message: str) -> bytes:
    """A serialized google.rpc.Status {code, message}, which OTLP/HTTP error bodies are.
    Its fields 1 (int32 code) and 2 (string message) are on the wire what
    ExportProfilesPartialSuccess's 1 (int64) and 2 (string) are: no other package needed."""
    status = profiles_service_pb2.ExportProfilesPartialSuccess(
        rejected_profiles=code.value[0], error_message=message
    )
    return status.SerializeToString()


class OtlpReceiver:
    """The gRPC server of ProfilesService; `address` is HOST:PORT as bound."""

    def __init__(
        self,
        store: ProfileStore,
        listen: str,
        security: ServerSecurity,
        options: Sequence[tuple[str, Any]],
    ) -> None:
        self._store = store
        self._security = security
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="otlp"),
            options=list(options),
            interceptors=security.interceptors(),
        )
        service, method = otlp.EXPORT_METHOD.strip("/").split("/")
        handler = grpc.unary_unary_rpc_method_handler(
            self._export,
            # raw bytes: a malformed request is answered here, with the reason
            request_deserializer=None,
            response_serializer=profiles_service_pb2.ExportProfilesServiceResponse.SerializeToString,
        )
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {method: handler}),)
        )
        self.port = security.add_port(self._server, listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")
        self.address = f"{listen.rsplit(':', 1)[0]}:{self.port}"

    def start(self) -> None:
        self._server.start()

    def stop(self, grace_s: float) -> None:
        self._server.stop(grace_s).wait()

    def _export(
        self, data: bytes, context: grpc.ServicerContext
    ) -> profiles_service_pb2.ExportProfilesServiceResponse:
        try:
            grant = self._security.ingest_grant(
                context.invocation_metadata(), context.auth_context()
            )
            return export(self._store, data, grant)
        except schema.SchemaError as exc:
            log.warning("rejected OTLP export from %s: %s", context.peer(), exc)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except IngestDenied as exc:
            log.warning("refused OTLP export from %s: %s", context.peer(), exc)
            context.abort(exc.code, str(exc))
        except StorageUnavailable as exc:
            log.error("cannot store OTLP export from %s: %s", context.peer(), exc)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"storage unavailable: {exc}")
        raise AssertionError("context.abort raises")
