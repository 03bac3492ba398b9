"""Kubernetes metadata against a local server speaking the API's wire format (no cluster can
run here), with real processes in real cgroups named as each container runtime names them."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from kubernetes import client

from fleetprof.node_agent.jobs import JobResolver
from fleetprof.node_agent.kubernetes import (
    Backoff,
    ContainerInfo,
    ContainerRef,
    KubernetesMetadata,
    parse_cgroup,
)
from tests.fake_kube_api import FakeKubeApi, make_pod

if TYPE_CHECKING:  # imported by pytest as the plugin below
    from tests.cgroups import ScratchCgroups

pytest_plugins = ["tests.cgroups"]

NODE = "node-a"
FAST = Backoff(initial_s=0.05, max_s=0.2)

UID = "7a5d7d2c-3f0e-4b2f-9b7a-0c7c9e3c2a11"
UID_ = UID.replace("-", "_")
CID = "4c2f0d2b1e7c0c7c6f1b0e3e1f2d3c4b5a6978877665544332211000ffeeddcc"
KIND_NODE = "9b1f" * 16


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # containerd, systemd cgroup driver, cgroup v2
        (
            f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
            f"cri-containerd-{CID}.scope\n",
            ContainerRef(CID, UID),
        ),
        # containerd or docker, cgroupfs driver, cgroup v1 (one line per hierarchy)
        (
            f"12:pids:/kubepods/besteffort/pod{UID}/{CID}\n"
            f"11:memory:/kubepods/besteffort/pod{UID}/{CID}\n"
            f"1:name=systemd:/kubepods/besteffort/pod{UID}/{CID}\n0::/\n",
            ContainerRef(CID, UID),
        ),
        # Guaranteed QoS pods sit right under kubepods
        (f"0::/kubepods/pod{UID}/{CID}\n", ContainerRef(CID, UID)),
        # CRI-O, systemd driver; its conmon is in the pod but in no container
        (
            f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
            f"crio-{CID}.scope\n",
            ContainerRef(CID, UID),
        ),
        (
            f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
            f"crio-conmon-{CID}.scope\n",
            ContainerRef(None, UID),
        ),
        # CRI-O, cgroupfs driver
        (f"0::/kubepods/burstable/pod{UID}/crio-{CID}\n", ContainerRef(CID, UID)),
        # docker (cri-dockerd), systemd driver
        (
            f"0::/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope\n",
            ContainerRef(CID, UID),
        ),
        # a container running systemd: its processes are in sub-cgroups of the container's
        (
            f"0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope/init.scope\n",
            ContainerRef(CID, UID),
        ),
        # kind: the node is itself a docker container; the innermost id is the container's
        (
            f"0::/system.slice/docker-{KIND_NODE}.scope/kubelet.slice/kubelet-kubepods.slice/"
            f"kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/"
            f"cri-containerd-{CID}.scope\n",
            ContainerRef(CID, UID),
        ),
        # seen from an agent in its own cgroup namespace
        (
            f"0::/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
            ContainerRef(CID, UID),
        ),
        # a plain docker container: no pod
        (f"0::/system.slice/docker-{CID}.scope\n", ContainerRef(CID, None)),
        # not containers
        ("0::/user.slice/user-1000.slice/session-2.scope\n", None),
        ("0::/system.slice/containerd.service\n", None),
        ("0::/init.scope\n", None),
        (f"0::/system.slice/{CID[:63]}.scope\n", None),
    ],
)
def test_cgroup_paths_of_each_runtime(text: str, expected: ContainerRef | None) -> None:
    assert parse_cgroup(text) == expected


def wait_until(condition: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def container_id() -> str:
    return uuid.uuid4().hex * 2


def systemd_cgroup(uid: str, cid: str, qos: str = "besteffort") -> str:
    pod_slice = f"kubepods-{qos}-pod{uid.replace('-', '_')}.slice"
    return f"kubepods.slice/kubepods-{qos}.slice/{pod_slice}/cri-containerd-{cid}.scope"


@pytest.fixture
def api() -> Iterator[FakeKubeApi]:
    server = FakeKubeApi()
    yield server
    server.close()


@pytest.fixture
def metadata(api: FakeKubeApi) -> Iterator[Callable[[], KubernetesMetadata]]:
    started: list[KubernetesMetadata] = []

    def start() -> KubernetesMetadata:
        configuration = client.Configuration(host=api.url)
        m = KubernetesMetadata(NODE, configuration, backoff=FAST, connect_timeout_s=2)
        m.start()
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


def lists(api: FakeKubeApi) -> int:
    return sum(1 for q in api.requests if q.get("watch") != ["true"])


def test_processes_map_to_their_pods_on_this_node(
    api: FakeKubeApi, metadata: Callable[[], KubernetesMetadata], cgroups: ScratchCgroups
) -> None:
    app, sidecar, sandbox, crio, elsewhere = (container_id() for _ in range(5))
    web = make_pod(
        "web-7d4f", NODE, {"app": app, "envoy": sidecar}, labels={"app": "web"}, namespace="shop"
    )
    # CRI-O with the cgroupfs driver, a Burstable pod
    batch = make_pod("batch-x1", NODE, {"main": crio}, runtime="cri-o")
    other = make_pod("db-0", "node-b", {"db": elsewhere})
    for pod in (web, batch, other):
        api.put(pod)
    web_uid, batch_uid = web.metadata.uid, batch.metadata.uid
    pids = {
        "app": cgroups.spawn(cgroup=systemd_cgroup(web_uid, app)),
        "envoy": cgroups.spawn(cgroup=systemd_cgroup(web_uid, sidecar)),
        "pause": cgroups.spawn(cgroup=systemd_cgroup(web_uid, sandbox)),
        "crio": cgroups.spawn(cgroup=f"kubepods/burstable/pod{batch_uid}/crio-{crio}"),
        "other node": cgroups.spawn(cgroup=systemd_cgroup(other.metadata.uid, elsewhere)),
        "host": cgroups.spawn(),
    }

    m = metadata()
    assert m.synced.wait(10)
    labels = {"app": "web"}
    assert m.lookup(pids["app"]) == ContainerInfo("shop", "web-7d4f", web_uid, "app", labels)
    assert m.lookup(pids["envoy"]) == ContainerInfo("shop", "web-7d4f", web_uid, "envoy", labels)
    assert m.lookup(pids["pause"]) == ContainerInfo("shop", "web-7d4f", web_uid, None, labels)
    assert m.lookup(pids["crio"]) == ContainerInfo("default", "batch-x1", batch_uid, "main", {})
    # Only this node's pods are listed: the other node's pod is unknown here.
    assert m.lookup(pids["other node"]) is None
    assert not m.settled(pids["other node"])
    assert m.lookup(pids["host"]) is None
    assert m.settled(pids["host"])
    assert m.lookup(pids["app"]) is not None and m.settled(pids["app"])
    assert all(q["fieldSelector"] == [f"spec.nodeName={NODE}"] for q in api.requests)

    # Changes arrive by the watch: a new pod, a label change, a deletion.
    api.wait_watching()
    late = container_id()
    job = make_pod("late", NODE, {"late": late}, labels={"job-name": "nightly"})
    pid = cgroups.spawn(cgroup=systemd_cgroup(job.metadata.uid, late))
    assert m.lookup(pid) is None
    api.put(job)
    wait_until(lambda: m.lookup(pid) is not None)
    assert m.lookup(pid).container == "late"  # type: ignore[union-attr]
    batch.metadata.labels = {"team": "data"}
    api.put(batch)
    wait_until(lambda: m.lookup(pids["crio"]).labels == {"team": "data"})  # type: ignore[union-attr]
    api.delete(web_uid)
    fresh = cgroups.spawn(cgroup=systemd_cgroup(web_uid, app))
    wait_until(lambda: m.lookup(fresh) is None)
    # A process already looked up keeps its last known pod: its samples may be drained later.
    assert m.lookup(pids["app"]) is not None
    m.forget(pids["app"])
    assert m.lookup(pids["app"]) is None
    watches = [q for q in api.requests if q.get("watch") == ["true"]]
    assert watches and all(q["allowWatchBookmarks"] == ["true"] for q in watches)
    assert lists(api) == 1


def test_watch_expiry_lists_again(
    api: FakeKubeApi, metadata: Callable[[], KubernetesMetadata], cgroups: ScratchCgroups
) -> None:
    cid_a, cid_b = container_id(), container_id()
    pod_a = make_pod("a", NODE, {"c": cid_a})
    pod_b = make_pod("b", NODE, {"c": cid_b})
    api.put(pod_a)
    pid_a = cgroups.spawn(cgroup=systemd_cgroup(pod_a.metadata.uid, cid_a))
    pid_b = cgroups.spawn(cgroup=systemd_cgroup(pod_b.metadata.uid, cid_b))
    m = metadata()
    api.wait_watching()
    assert m.lookup(pid_a) is not None and m.lookup(pid_b) is None

    # The agent is cut off while pods change and the history is compacted past its version.
    api.unavailable = True
    api.drop_connections()
    api.delete(pod_a.metadata.uid)
    api.put(pod_b)
    api.compact()
    m.forget(pid_a)
    api.unavailable = False

    # Its watch from the old version gets 410 Gone in the stream; it lists again.
    wait_until(lambda: m.lookup(pid_b) is not None)
    assert api.expired >= 1
    assert lists(api) == 2
    assert m.lookup(pid_a) is None


def test_dropped_connection_resumes_the_watch(
    api: FakeKubeApi,
    metadata: Callable[[], KubernetesMetadata],
    cgroups: ScratchCgroups,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fleetprof.node_agent.kubernetes")
    cid = container_id()
    pod = make_pod("p", NODE, {"c": cid})
    pid = cgroups.spawn(cgroup=systemd_cgroup(pod.metadata.uid, cid))
    m = metadata()
    api.wait_watching()
    api.drop_connections()
    api.put(pod)  # while the agent reconnects
    wait_until(lambda: m.lookup(pid) is not None)
    # Resumed from its resource version: no second list, no expiry.
    assert lists(api) == 1 and api.expired == 0
    # At most one line about it (the drop may also look like a clean end of the stream).
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) <= 1


def test_bookmarks_keep_the_watch_resumable(
    api: FakeKubeApi, metadata: Callable[[], KubernetesMetadata]
) -> None:
    metadata()
    api.wait_watching()
    # Changes on other nodes move the version on without an event for this node's watch;
    # a bookmark brings the agent up to date, so a compaction does not expire it.
    for i in range(3):
        api.put(make_pod(f"elsewhere-{i}", "node-b", {"c": container_id()}))
    api.bookmark()
    time.sleep(0.2)
    api.compact()
    api.end_watches()  # as timeoutSeconds does
    api.wait_watching()
    assert api.expired == 0 and lists(api) == 1


def test_api_errors_are_retried_with_one_warning(
    api: FakeKubeApi,
    metadata: Callable[[], KubernetesMetadata],
    cgroups: ScratchCgroups,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fleetprof.node_agent.kubernetes")
    api.unavailable = True
    cid = container_id()
    pod = make_pod("p", NODE, {"c": cid})
    api.put(pod)
    pid = cgroups.spawn(cgroup=systemd_cgroup(pod.metadata.uid, cid))
    m = metadata()
    wait_until(lambda: len(api.requests) >= 4)
    assert m.lookup(pid) is None and not m.settled(pid) and not m.synced.is_set()
    api.unavailable = False
    assert m.synced.wait(10)
    assert m.lookup(pid) is not None
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    warnings = [text for level, text in messages if level == logging.WARNING]
    assert len(warnings) == 1 and "HTTP 503" in warnings[0]
    assert (logging.INFO, "Kubernetes API reachable again") in messages


def test_unreachable_api_server(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fleetprof.node_agent.kubernetes")
    # A port nothing listens on: connections are refused.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    m = KubernetesMetadata(NODE, client.Configuration(host=url), backoff=FAST, connect_timeout_s=1)
    m.start()

    def failures(level: int) -> int:
        return sum(1 for r in caplog.records if r.levelno == level and "API error" in r.message)

    wait_until(lambda: failures(logging.DEBUG) >= 3)  # retried, quietly
    assert failures(logging.WARNING) == 1
    assert m.lookup(1) is None and not m.synced.is_set()
    m.stop()


def test_no_cluster(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fleetprof.node_agent.kubernetes")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    m = KubernetesMetadata.from_environment(NODE)
    m.start()
    assert not m.enabled
    assert m.lookup(1) is None and m.settled(1)
    m.stop()
    assert [r.getMessage() for r in caplog.records] == [
        "not in a Kubernetes pod and no kubeconfig: no pod metadata"
    ]


def test_no_cluster_does_not_load_the_client() -> None:
    code = (
        "import sys\n"
        "from fleetprof.node_agent.jobs import JobResolver\n"
        "from fleetprof.node_agent.kubernetes import KubernetesMetadata\n"
        "m = KubernetesMetadata.from_environment('n')\n"
        "print(JobResolver.from_config([], m).resolve(1), 'kubernetes' in sys.modules)\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout == "None False\n", out.stderr


def test_in_cluster_without_service_account(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert not Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    m = KubernetesMetadata.from_environment(NODE)
    assert not m.enabled
    assert "Kubernetes API not configured" in caplog.text


def test_kubeconfig_with_a_bearer_token(tmp_path: Path) -> None:
    api = FakeKubeApi(token="s3cret")  # answers 401 to requests without the token
    # JSON is YAML: a kubeconfig as kubectl writes it.
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": api.url}}],
        "users": [{"name": "agent", "user": {"token": "s3cret"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "agent"}}],
        "current-context": "test",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(kubeconfig))
    m = KubernetesMetadata.from_environment(NODE, kubeconfig=str(path))
    m.start()
    try:
        assert m.synced.wait(10)
    finally:
        m.stop()
        api.close()


def test_job_from_pod_labels(
    api: FakeKubeApi, metadata: Callable[[], KubernetesMetadata], cgroups: ScratchCgroups
) -> None:
    spark, cron, plain = container_id(), container_id(), container_id()
    executor_labels = {"spark-app-selector": "spark-4f2a", "spark-role": "executor"}
    pods = [
        make_pod("exec-1", NODE, {"spark-kubernetes-executor": spark}, labels=executor_labels),
        make_pod("nightly-28471", NODE, {"main": cron}, labels={"job-name": "nightly-28471"}),
        make_pod("web", NODE, {"web": plain}, labels={"app": "web"}),
    ]
    pids = [
        cgroups.spawn(cgroup=systemd_cgroup(pod.metadata.uid, cid))
        for pod, cid in zip(pods, (spark, cron, plain), strict=True)
    ]
    api.unavailable = True
    for pod in pods:
        api.put(pod)
    m = metadata()
    jobs = JobResolver.from_config([{"k8s_label": ["spark-app-selector", "job-name"]}], m)
    # The pods are not known yet: no job, but not remembered as none either.
    assert jobs.resolve(pids[0]) is None
    api.unavailable = False
    assert m.synced.wait(10)
    assert [jobs.resolve(pid) for pid in pids] == ["spark-4f2a", "nightly-28471", None]
