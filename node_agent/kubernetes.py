"""Kubernetes metadata: the namespace, pod, container and labels of a process.

The agent lists and watches the pods of its own node only (field selector spec.nodeName), in a
background thread, and maps a process to its container through /proc/PID/cgroup. With no
cluster (not in a pod, no kubeconfig given) everything is None and the `kubernetes` package is
not even imported (it costs ~30 MB).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubernetes.client import Configuration, V1Pod

log = logging.getLogger(__name__)

# A container's cgroup, by runtime and cgroup driver (the id is 64 hex digits everywhere):
#   systemd:  .../kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope  (containerd)
#             .../crio-<id>.scope (CRI-O)   .../docker-<id>.scope (docker, cri-dockerd)
#   cgroupfs: /kubepods/besteffort/pod<uid>/<id>   (/kubepods/pod<uid>/<id> when Guaranteed)
# Searched anywhere in the path: an agent in its own cgroup namespace sees /../../kubepods...
_CONTAINER_ID = re.compile(
    r"(?:^|/)(?:cri-containerd-|crio-|docker-)?([0-9a-f]{64})(?:\.scope)?(?=/|$)"
)
# The systemd driver writes the pod uid with underscores (dashes separate slice levels).
_POD_UID = re.compile(r"pod([0-9a-f]{8}(?:[-_][0-9a-f]{4}){3}[-_][0-9a-f]{12})(?:\.slice)?(?=/|$)")
# A static pod runs under its own uid; the API shows a mirror pod that names it here.
_MIRROR_ANNOTATION = "kubernetes.io/config.mirror"


@dataclass(frozen=True, slots=True)
class ContainerRef:
    """What a process's cgroup path says: its container id and pod uid, either may be None."""

    container_id: str | None
    pod_uid: str | None


def parse_cgroup(text: str) -> ContainerRef | None:
    """The container of a /proc/PID/cgroup text (`hierarchy:controllers:path` lines), if any."""
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        # The innermost id: kind nodes and docker-in-docker nest containers in containers.
        ids = _CONTAINER_ID.findall(path)
        uids = _POD_UID.findall(path)
        if ids or uids:
            return ContainerRef(
                ids[-1] if ids else None, uids[-1].replace("_", "-") if uids else None
            )
    return None


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    namespace: str
    pod: str
    pod_uid: str
    # None for the pod's sandbox ("pause") or a container the pod's status does not list yet.
    container: str | None
    labels: Mapping[str, str]  # all the pod's labels


@dataclass(frozen=True, slots=True)
class _PodEntry:
    uids: tuple[str, ...]  # its own, and a static pod's (the uid in its cgroup paths)
    sandbox: ContainerInfo  # container None: for processes of no known container
    containers: dict[str, ContainerInfo]  # by container id


def _pod_entry(pod: V1Pod) -> _PodEntry:
    meta, status = pod.metadata, pod.status
    labels = MappingProxyType(dict(meta.labels or {}))
    uids = (meta.uid, (meta.annotations or {}).get(_MIRROR_ANNOTATION, ""))
    statuses = []
    if status is not None:
        statuses = [
            *(status.init_container_statuses or ()),
            *(status.container_statuses or ()),
            *(status.ephemeral_container_statuses or ()),
        ]
    containers = {
        # "containerd://<id>", "cri-o://<id>", "docker://<id>"
        s.container_id.rpartition("://")[2]: ContainerInfo(
            meta.namespace, meta.name, meta.uid, s.name, labels
        )
        for s in statuses
        if s.container_id
    }
    sandbox = ContainerInfo(meta.namespace, meta.name, meta.uid, None, labels)
    return _PodEntry(tuple(uid for uid in uids if uid), sandbox, containers)


@dataclass(frozen=True)
class Backoff:
    """Delays between attempts after API errors: doubling, jittered, reset by a success."""

    initial_s: float = 0.5
    max_s: float = 30.0


class KubernetesMetadata:
    """The pods of one node, kept current by list + watch in a background thread.

    Survives API errors and dropped connections (retries with backoff, resuming the watch from
    the last resource version) and watch expiry (410 Gone: lists again). Thread-safe; lookups
    are dictionary reads. Call forget(pid) when a process execs or exits, after its last lookup.
    """

    def __init__(
        self,
        node: str,
        configuration: Configuration | None,
        *,
        watch_timeout_s: int = 300,
        connect_timeout_s: float = 5.0,
        backoff: Backoff = Backoff(),
    ) -> None:
        self.node = node
        self.enabled = configuration is not None
        self._configuration = configuration
        if configuration is not None:
            configuration.retries = 0  # our backoff retries: urllib3 would log every attempt
        self._watch_timeout_s = watch_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._backoff = backoff
        self._lock = threading.Lock()
        self._pods: dict[str, _PodEntry] = {}  # by uid
        self._by_uid: dict[str, ContainerInfo] = {}
        self._by_container: dict[str, ContainerInfo] = {}
        self._refs: dict[int, ContainerRef | None] = {}
        self._known: dict[int, ContainerInfo] = {}  # last found, for processes gone since
        self._resource_version: str | None = None  # None: list before watching
        self._failing = False  # in an outage (warned once)
        self._healthy = False  # a request succeeded since the last failure: reset the backoff
        self.synced = threading.Event()  # set by the first successful list
        self._stop = threading.Event()
        self._response: Any = None  # the open watch's
        self._thread: threading.Thread | None = None

    @classmethod
    def from_environment(cls, node: str, kubeconfig: str | None = None) -> KubernetesMetadata:
        """In a pod, the in-cluster service account; else `kubeconfig` if given; else disabled."""
        in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        if not in_cluster and not kubeconfig:
            log.info("not in a Kubernetes pod and no kubeconfig: no pod metadata")
            return cls(node, None)
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            if in_cluster:
                config.load_incluster_config(client_configuration=configuration)
            else:
                config.load_kube_config(kubeconfig, client_configuration=configuration)
        except (config.ConfigException, OSError, ValueError) as e:
            log.warning("Kubernetes API not configured (%s): no pod metadata", e)
            return cls(node, None)
        return cls(node, configuration)

    def start(self) -> None:
        if not self.enabled:
            return
        self._thread = threading.Thread(target=self._run, name="k8s-pods", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            _shut_down(response)
        if self._thread is not None:
            self._thread.join(timeout_s)

    # --- lookups (the agent's thread) ---

    def lookup(self, pid: int) -> ContainerInfo | None:
        """The container pid runs in, or None (not in a pod, pod unknown yet, no cluster)."""
        ref = self._ref(pid)
        if ref is None:
            return None
        with self._lock:
            info = self._by_container.get(ref.container_id or "") or self._by_uid.get(
                ref.pod_uid or ""
            )
        if info is None:
            return self._known.get(pid)
        self._known[pid] = info
        return info

    def settled(self, pid: int) -> bool:
        """Whether a None from lookup(pid) is final: no cluster, or not a process of a pod."""
        ref = self._ref(pid)
        return ref is None or ref.pod_uid is None or self.lookup(pid) is not None

    def forget(self, pid: int) -> None:
        self._refs.pop(pid, None)
        self._known.pop(pid, None)

    def pids(self) -> set[int]:
        return set(self._refs) | set(self._known)

    def _ref(self, pid: int) -> ContainerRef | None:
        if not self.enabled:
            return None
        if pid not in self._refs:
            try:
                with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
                    self._refs[pid] = parse_cgroup(f.read())
            except OSError:  # gone already
                return None
        return self._refs[pid]

    # --- list + watch (the background thread) ---

    def _run(self) -> None:
        from kubernetes.client import ApiClient, ApiException, CoreV1Api

        api = CoreV1Api(ApiClient(self._configuration))
        log.info("watching the pods of node %s", self.node)
        delay = self._backoff.initial_s
        while not self._stop.is_set():
            try:
                if self._resource_version is None:
                    self._list(api)
                self._watch_once(api)
                continue
            except ApiException as e:
                if e.status == 410:  # Gone: our resource version left the server's window
                    log.info("pod watch expired (410 Gone): listing again")
                    self._resource_version = None
                    continue
                self._failed(f"HTTP {e.status} {e.reason}")
            except Exception as e:  # the connection, TLS, a malformed response: retry them all
                self._failed(f"{type(e).__name__}: {e}")
            if self._healthy:
                delay, self._healthy = self._backoff.initial_s, False
            self._stop.wait(random.uniform(delay / 2, delay))
            delay = min(delay * 2, self._backoff.max_s)

    def _failed(self, reason: str) -> None:
        if self._stop.is_set():  # stop() cut the watch's connection: no error
            return
        # One warning per outage, not one per retry.
        (log.debug if self._failing else log.warning)("Kubernetes API error, retrying: %s", reason)
        self._failing = True

    def _succeeded(self) -> None:
        self._healthy = True
        if self._failing:
            log.info("Kubernetes API reachable again")
            self._failing = False

    def _list(self, api: Any) -> None:
        pods = api.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.node}",
            _request_timeout=(self._connect_timeout_s, 60),
        )
        entries = {pod.metadata.uid: _pod_entry(pod) for pod in pods.items}
        with self._lock:
            self._pods = entries
            self._reindex()
        self._resource_version = pods.metadata.resource_version
        self._succeeded()
        self.synced.set()

    def _watch_once(self, api: Any) -> None:
        """Apply the events of one watch request, until the server ends it."""
        from kubernetes.client import V1Pod
        from kubernetes.watch import Watch

        def request(**kwargs: Any) -> Any:
            self._response = response = api.list_pod_for_all_namespaces(**kwargs)
            if self._stop.is_set():  # stop() came before the response: it could not cut it
                _shut_down(response)
            return response

        watch = Watch(return_type=V1Pod)
        try:
            for event in watch.stream(
                request,
                field_selector=f"spec.nodeName={self.node}",
                resource_version=self._resource_version,
                allow_watch_bookmarks=True,
                # The server ends the watch after timeout_seconds; a dead connection that
                # never closes is caught by the read timeout a little later.
                timeout_seconds=self._watch_timeout_s,
                _request_timeout=(self._connect_timeout_s, self._watch_timeout_s + 30),
            ):
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    self._apply(event["type"], event["object"])
                # Bookmarks carry no change, only a newer resource version to resume from.
                self._resource_version = watch.resource_version
                self._succeeded()
        finally:
            self._response = None
        self._succeeded()

    def _apply(self, kind: str, pod: V1Pod) -> None:
        with self._lock:
            if kind == "DELETED":
                self._pods.pop(pod.metadata.uid, None)
            else:
                self._pods[pod.metadata.uid] = _pod_entry(pod)
            self._reindex()

    def _reindex(self) -> None:
        # At most ~110 pods per node: rebuilding beats keeping indexes in step by hand.
        by_uid: dict[str, ContainerInfo] = {}
        by_container: dict[str, ContainerInfo] = {}
        for entry in self._pods.values():
            by_uid.update(dict.fromkeys(entry.uids, entry.sandbox))
            by_container.update(entry.containers)
        self._by_uid, self._by_container = by_uid, by_container


def _shut_down(response: Any) -> None:
    """Cut a streaming response's connection: a read blocked on it returns at once."""
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
