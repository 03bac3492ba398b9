"""gRPC AdminService: delete stored rows (poisoned data, a decommissioned node), audited.

Only a token that sees everything may delete; an aggregator without tokens takes deletes
from loopback only. Every delete, done or refused, is logged with who asked and from where.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import grpc

from fleetprof.aggregator.limits import peer_host
from fleetprof.aggregator.storage import ProfileStore
from fleetprof.proto.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from fleetprof.proto.security import ServerSecurity, bearer_token, is_loopback

log = logging.getLogger(__name__)


def _time(unix_ms: int) -> datetime | None:
    return datetime.fromtimestamp(unix_ms / 1000, UTC) if unix_ms else None


class AdminService(ingest_pb2_grpc.AdminServiceServicer):
    def __init__(self, store: ProfileStore, security: ServerSecurity) -> None:
        self._store = store
        self._security = security

    def Delete(
        self, request: ingest_pb2.DeleteRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.DeleteReply:
        peer = context.peer()
        what = (
            f"node={request.node or '*'!r} agent={request.agent_id or '*'!r} "
            f"since={_time(request.since_unix_ms)} until={_time(request.until_unix_ms)}"
        )
        token = bearer_token(context.invocation_metadata())
        if self._security.tokens:
            allowed = token in self._security.tokens and self._security.tokens[token] is None
        else:
            allowed = is_loopback(f"[{peer_host(peer).strip('[]')}]:0")
        if not allowed:
            log.warning("AUDIT refused delete from %s: %s", peer, what)
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "deleting needs a token that sees everything (or, without tokens, loopback)",
            )
        if not (request.node or request.agent_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name a node, an agent or both")
        deleted = self._store.delete(
            request.node or None,
            request.agent_id or None,
            _time(request.since_unix_ms),
            _time(request.until_unix_ms),
        )
        log.warning(
            "AUDIT delete from %s (%s): %s: %s",
            peer,
            "token" if token else "no token",
            what,
            ", ".join(f"{count} {name}" for name, count in deleted.items()),
        )
        return ingest_pb2.DeleteReply(**deleted)
