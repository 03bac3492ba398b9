"""A local HTTP server answering the Kubernetes API's pod list and watch as the API server does.

No API server can run here, so this speaks its wire format for the requests the agent makes:
`GET /api/v1/pods?fieldSelector=spec.nodeName%3DN` (a PodList; its items carry no kind or
apiVersion) and the same with `watch=true&resourceVersion=R&timeoutSeconds=T
&allowWatchBookmarks=true`: a chunked stream of `{"type": ..., "object": ...}` lines, one per
chunk, of the changes after R. A watch from a compacted resource version gets the
`{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired",...}}` event and the
stream ends, as the real server does. Errors are Status objects. All JSON is made by the
kubernetes client's own models (ApiClient().sanitize_for_serialization).
"""

from __future__ import annotations

import functools
import json
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kubernetes import client

_API = client.ApiClient()
_REASONS = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 410: "Expired"}
_REASONS |= {500: "InternalError", 503: "ServiceUnavailable"}


def wire(model: Any) -> dict[str, Any]:
    data = _API.sanitize_for_serialization(model)
    created = data.get("metadata", {}).get("creationTimestamp")
    if created:  # Go writes RFC 3339 in UTC with a Z
        data["metadata"]["creationTimestamp"] = created.replace("+00:00", "Z")
    return data


def status(code: int, message: str) -> dict[str, Any]:
    return wire(
        client.V1Status(
            api_version="v1",
            kind="Status",
            metadata=client.V1ListMeta(),
            status="Failure",
            message=message,
            reason=_REASONS[code],
            code=code,
        )
    )


def make_pod(
    name: str,
    node: str,
    containers: dict[str, str],
    *,
    namespace: str = "default",
    uid: str | None = None,
    labels: dict[str, str] | None = None,
    runtime: str = "containerd",
) -> client.V1Pod:
    """A running pod as the API shows it; containers maps container names to runtime ids."""
    return client.V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=client.V1ObjectMeta(
            name=name,
            namespace=namespace,
            uid=uid or str(uuid.uuid4()),
            labels=labels,
            creation_timestamp=datetime.now(UTC).replace(microsecond=0),
        ),
        spec=client.V1PodSpec(
            node_name=node,
            containers=[
                client.V1Container(name=c, image=f"registry.example/{c}:1") for c in containers
            ],
        ),
        status=client.V1PodStatus(
            phase="Running",
            container_statuses=[
                client.V1ContainerStatus(
                    name=c,
                    container_id=f"{runtime}://{container_id}",
                    image=f"registry.example/{c}:1",
                    image_id=f"registry.example/{c}@sha256:{'0' * 64}",
                    ready=True,
                    restart_count=0,
                )
                for c, container_id in containers.items()
            ],
        ),
    )


class FakeKubeApi:
    """The pods of a cluster, their change history, and an HTTP server over them."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token  # when set, requests need "Authorization: Bearer <token>"
        self.requests: list[dict[str, list[str]]] = []  # the query of every request
        self.unavailable = False  # while set, every request gets 503 Service Unavailable
        self.expired = 0  # watches answered with 410 Gone
        self._cond = threading.Condition()
        self._rv = 1000
        self._pods: dict[str, dict[str, Any]] = {}  # by uid, wire form with kind + apiVersion
        self._history: list[tuple[int, str, dict[str, Any]]] = []  # (rv, type, pod)
        self._oldest = self._rv  # a watch from before this is too old: 410
        self._generation = 0  # bumped to end every open watch
        self._drop = False  # with the bump: cut connections instead of ending cleanly
        self._bookmarks = 0  # bumped to send a bookmark on every open watch
        self._open_watches = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self.drop_connections()
        self._server.shutdown()
        self._server.server_close()

    # --- cluster changes ---

    def put(self, pod: client.V1Pod) -> None:
        """Create or update a pod (ADDED or MODIFIED to watchers of its node)."""
        with self._cond:
            self._rv += 1
            pod.metadata.resource_version = str(self._rv)
            data = wire(pod)
            kind = "MODIFIED" if pod.metadata.uid in self._pods else "ADDED"
            self._pods[pod.metadata.uid] = data
            self._history.append((self._rv, kind, data))
            self._cond.notify_all()

    def delete(self, uid: str) -> None:
        with self._cond:
            self._rv += 1
            data = self._pods.pop(uid)
            data = {**data, "metadata": {**data["metadata"], "resourceVersion": str(self._rv)}}
            self._history.append((self._rv, "DELETED", data))
            self._cond.notify_all()

    def compact(self) -> None:
        """Forget the history (as etcd compaction does): older resource versions expire."""
        with self._cond:
            self._history.clear()
            self._oldest = self._rv

    def end_watches(self) -> None:
        """End every open watch cleanly, as its timeoutSeconds would."""
        self._bump(drop=False)

    def drop_connections(self) -> None:
        """Cut every open watch's connection mid-stream (no final chunk)."""
        self._bump(drop=True)

    def bookmark(self) -> None:
        """Send a BOOKMARK with the current resource version on every open watch."""
        with self._cond:
            self._bookmarks += 1
            self._cond.notify_all()

    def wait_watching(self, count: int = 1, timeout_s: float = 10.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._open_watches >= count, timeout_s):
                raise TimeoutError(f"{self._open_watches} watches open, not {count}")

    def _news(self, since: int, generation: int, bookmarks: int) -> bool:
        """Whether an open watch has something to do (called with the lock held)."""
        return (
            generation != self._generation
            or bookmarks != self._bookmarks
            or bool(self._history and self._history[-1][0] > since)
        )

    def _bump(self, drop: bool) -> None:
        with self._cond:
            self._generation += 1
            self._drop = drop
            self._cond.notify_all()

    # --- HTTP ---

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, as the real one

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                api.requests.append(query)
                if api.token and self.headers.get("Authorization") != f"Bearer {api.token}":
                    return self._send(401, status(401, "Unauthorized"))
                if api.unavailable:
                    return self._send(503, status(503, "the server is currently unavailable"))
                if url.path != "/api/v1/pods":
                    return self._send(404, status(404, "the server could not find the resource"))
                node = None
                for selector in query.get("fieldSelector", []):
                    key, _, node = selector.partition("=")
                    if key != "spec.nodeName":
                        return self._send(400, status(400, f'field label not supported: "{key}"'))
                if query.get("watch", ["false"])[0] in ("true", "1"):
                    return self._watch(node, query)
                with api._cond:
                    items = [
                        {k: v for k, v in pod.items() if k not in ("kind", "apiVersion")}
                        for pod in api._pods.values()
                        if node is None or pod["spec"]["nodeName"] == node
                    ]
                    rv = api._rv
                pod_list = {"kind": "PodList", "apiVersion": "v1"}
                pod_list |= {"metadata": {"resourceVersion": str(rv)}, "items": items}
                self._send(200, pod_list)

            def _headers(self, code: int) -> None:
                self.send_response(code)
                self.send_header("Audit-Id", str(uuid.uuid4()))
                self.send_header("Cache-Control", "no-cache, private")
                self.send_header("Content-Type", "application/json")

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body, separators=(",", ":")).encode() + b"\n"
                self._headers(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def _event(self, kind: str, obj: dict[str, Any]) -> None:
                self._chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

            def _watch(self, node: str | None, query: dict[str, list[str]]) -> None:
                since = int(query.get("resourceVersion", ["0"])[0] or 0)
                timeout_s = int(query.get("timeoutSeconds", ["1800"])[0])
                bookmarks = query.get("allowWatchBookmarks", ["false"])[0] == "true"
                self._headers(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                with api._cond:
                    oldest, generation, seen = api._oldest, api._generation, api._bookmarks
                    api.expired += since < oldest
                if since < oldest:
                    self._event(
                        "ERROR", status(410, f"too old resource version: {since} ({oldest})")
                    )
                    return self._end()
                deadline = time.monotonic() + timeout_s
                with api._cond:
                    api._open_watches += 1
                    api._cond.notify_all()
                try:
                    while True:
                        with api._cond:
                            api._cond.wait_for(
                                functools.partial(api._news, since, generation, seen),
                                max(0.0, deadline - time.monotonic()),
                            )
                            events = [event for event in api._history if event[0] > since]
                            ended = api._generation != generation
                            drop = ended and api._drop
                            bookmark = bookmarks and api._bookmarks != seen
                            seen, rv = api._bookmarks, api._rv
                        for event_rv, kind, pod in events:
                            since = event_rv
                            if node is None or pod["spec"]["nodeName"] == node:
                                self._event(kind, pod)
                        if bookmark:
                            since = rv
                            meta = client.V1ObjectMeta(resource_version=str(rv))
                            pod = client.V1Pod(api_version="v1", kind="Pod", metadata=meta)
                            self._event("BOOKMARK", wire(pod))
                        if drop:
                            self.connection.shutdown(socket.SHUT_RDWR)
                            self.close_connection = True
                            return None
                        if ended or time.monotonic() >= deadline:
                            return self._end()
                finally:
                    with api._cond:
                        api._open_watches -= 1

            def _end(self) -> None:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        return Handler
