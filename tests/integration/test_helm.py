"""The Helm chart, rendered by a real helm binary and checked object by object: against the
kubernetes client's models, against each other (selectors, ports, RBAC) and against the
fleetprof command line the containers run."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from fleetprof.cli import build_parser
from fleetprof.node_agent.jobs import JobResolver, load_config
from fleetprof.node_agent.kubernetes import KubernetesMetadata
from tests.conftest import require

HELM_DIR = Path(__file__).resolve().parents[2] / "helm"
CHART = HELM_DIR / "fleetprof"
RELEASE, NAMESPACE = "prof", "observability"
FULLNAME = f"{RELEASE}-fleetprof"

Objects = dict[tuple[str, str], dict[str, Any]]

TLS = {"tls": {"secretName": "aggregator-tls", "agentSecretName": "agent-tls"}}
TLS_NO_WEB = TLS | {"aggregator": {"http": {"enabled": False}}}
CAPABILITIES = {"agent": {"privileged": False}}
JOBS = {
    "agent": {
        "jobs": "[[resolver]]\nk8s_label = ['app.kubernetes.io/part-of']\n\n"
        "[[resolver]]\ncgroup = '/job_(\\d+)/'\ntemplate = 'slurm-{1}'\n",
        "podAnnotations": {"team": "perf"},
    }
}
VARIANTS = {"defaults": {}, "tls": TLS, "tls-no-web": TLS_NO_WEB}
VARIANTS |= {"capabilities": CAPABILITIES, "jobs": JOBS}


@pytest.fixture(scope="session")
def helm() -> Path:
    out = subprocess.run(
        [sys.executable, str(HELM_DIR / "fetch_helm.py")], capture_output=True, text=True
    )
    require(out.returncode == 0, f"cannot fetch helm: {out.stderr.strip()[-300:]}")
    return Path(out.stdout.strip())


@pytest.fixture(scope="session")
def render(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Objects]:
    values_dir = tmp_path_factory.mktemp("values")

    def render(values: dict[str, Any] | None = None) -> Objects:
        path = values_dir / f"{len(list(values_dir.iterdir()))}.json"
        path.write_text(json.dumps(values or {}))  # JSON is YAML
        out = subprocess.run(
            [helm, "template", RELEASE, CHART, "--namespace", NAMESPACE, "--values", path],
            capture_output=True,
            text=True,
            check=True,
        )
        docs = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
        objects = {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}
        assert len(objects) == len(docs), "two objects share a kind and name"
        return objects

    return render


def one(objects: Objects, kind: str) -> dict[str, Any]:
    (obj,) = (o for (k, _), o in objects.items() if k == kind)
    return obj


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def command_line(workload: dict[str, Any]) -> argparse.Namespace:
    """The container's arguments as fleetprof's own parser reads them (after the kubelet
    expanded $(NODE_NAME))."""
    c = container(workload)
    assert c["command"][0] == "fleetprof"
    argv = [arg.replace("$(NODE_NAME)", "node-1") for arg in c["command"][1:] + c["args"]]
    return build_parser().parse_args(argv)


def volume_at(workload: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume a file of the container lives on (its longest mount path prefix)."""
    mounts = [m for m in container(workload)["volumeMounts"] if path.startswith(m["mountPath"])]
    name = max(mounts, key=lambda m: len(m["mountPath"]))["name"]
    spec = workload["spec"]
    claims = {t["metadata"]["name"]: t for t in spec.get("volumeClaimTemplates", [])}
    if name in claims:
        return {"name": name, "persistentVolumeClaim": claims[name]}
    (volume,) = (v for v in spec["template"]["spec"]["volumes"] if v["name"] == name)
    return volume


def port(host_port: str) -> int:
    return int(host_port.rsplit(":", 1)[1])


def test_lint(helm: Path, tmp_path: Path) -> None:
    for name, values in VARIANTS.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(values))
        out = subprocess.run(
            [helm, "lint", "--strict", CHART, "--values", path], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stdout + out.stderr


MODELS = {
    "ServiceAccount": client.V1ServiceAccount,
    "ClusterRole": client.V1ClusterRole,
    "ClusterRoleBinding": client.V1ClusterRoleBinding,
    "ConfigMap": client.V1ConfigMap,
    "Service": client.V1Service,
    "DaemonSet": client.V1DaemonSet,
    "StatefulSet": client.V1StatefulSet,
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_objects_are_valid_kubernetes(render: Callable[..., Objects], variant: str) -> None:
    objects = render(VARIANTS[variant])
    api = client.ApiClient()
    for obj in objects.values():
        # The models check types strictly; a field they drop is one Kubernetes does not know.
        model = MODELS[obj["kind"]].from_dict(obj)
        assert api.sanitize_for_serialization(model) == obj
        namespaced = obj["kind"] not in ("ClusterRole", "ClusterRoleBinding")
        assert obj["metadata"].get("namespace") == (NAMESPACE if namespaced else None)
    kinds = sorted(kind for kind, _ in objects)
    expected = ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "Service", "Service"]
    expected += ["ServiceAccount", "StatefulSet"]
    if variant != "tls-no-web":
        expected.insert(4, "Service")  # the web UI's
    if variant == "jobs":
        expected.insert(2, "ConfigMap")
    assert kinds == expected


def test_selectors_match_their_pods(render: Callable[..., Objects]) -> None:
    objects = render()
    agent, aggregator = one(objects, "DaemonSet"), one(objects, "StatefulSet")
    pods = {}
    for workload in (agent, aggregator):
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        pods[workload["kind"]] = labels
    services = [o for (kind, _), o in objects.items() if kind == "Service"]
    for service in services:
        # Each Service selects the aggregator, never the agents.
        assert service["spec"]["selector"].items() <= pods["StatefulSet"].items()
        assert not service["spec"]["selector"].items() <= pods["DaemonSet"].items()
    headless = objects["Service", aggregator["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("variant", ["defaults", "tls"])
def test_ports_match_the_aggregator_flags(render: Callable[..., Objects], variant: str) -> None:
    objects = render(VARIANTS[variant])
    aggregator = one(objects, "StatefulSet")
    args = command_line(aggregator)
    assert args.command == "aggregator"
    container_ports = {p["name"]: p["containerPort"] for p in container(aggregator)["ports"]}
    assert container_ports == {"grpc": port(args.listen), "http": port(args.http)}
    assert (port(args.listen), port(args.http)) == (7470, 7471)
    flags = {"grpc": port(args.listen), "http": port(args.http)}
    for name, port_name in ((f"{FULLNAME}-aggregator", "grpc"), (f"{FULLNAME}-web", "http")):
        (service_port,) = objects["Service", name]["spec"]["ports"]
        target = service_port["targetPort"]
        # A named target port is resolved in the pod's container ports.
        assert container_ports.get(target, target) == flags[port_name]
        assert service_port["port"] == flags[port_name]
    # The database is on the persistent volume claim.
    assert args.db == "/data/fleetprof.duckdb"
    claim = volume_at(aggregator, args.db)["persistentVolumeClaim"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    # The agents dial the gRPC Service.
    agent_args = command_line(one(objects, "DaemonSet"))
    assert agent_args.command == "agent"
    assert agent_args.aggregator == f"{FULLNAME}-aggregator.{NAMESPACE}.svc:{port(args.listen)}"


def test_agent_runs_privileged_on_every_node(render: Callable[..., Objects]) -> None:
    agent = one(render(), "DaemonSet")
    pod = agent["spec"]["template"]["spec"]
    c = container(agent)
    assert pod["hostPID"] is True
    assert c["securityContext"] == {"privileged": True}
    args = command_line(agent)
    assert args.node == "node-1"  # $(NODE_NAME), from the downward API:
    (env,) = c["env"]
    assert env == {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
    assert (args.frequency, args.interval, args.events, args.insecure) == (19, 10.0, "cpu", True)
    for path in ("/sys/kernel/tracing", "/sys/kernel/debug", "/lib/modules", "/usr/src"):
        assert volume_at(agent, path)["hostPath"] == {"path": path}
    read_only = {m["mountPath"] for m in c["volumeMounts"] if m.get("readOnly")}
    assert read_only == {"/lib/modules", "/usr/src"}
    # Tolerates every taint: an empty key with Exists.
    assert {"operator": "Exists"} in pod["tolerations"]
    assert c["resources"]["limits"] == {"cpu": "1", "memory": "1Gi"}


def test_agent_with_capabilities_only(render: Callable[..., Objects]) -> None:
    security = container(one(render(CAPABILITIES), "DaemonSet"))["securityContext"]
    assert "privileged" not in security
    assert {"BPF", "PERFMON", "SYS_ADMIN"} <= set(security["capabilities"]["add"])
    # The runtimes' default profiles refuse bpf() and perf_event_open().
    assert security["seccompProfile"] == {"type": "Unconfined"}
    assert security["appArmorProfile"] == {"type": "Unconfined"}


def test_rbac_lets_the_agents_watch_pods(render: Callable[..., Objects]) -> None:
    objects = render()
    agent = one(objects, "DaemonSet")
    account = agent["spec"]["template"]["spec"]["serviceAccountName"]
    assert ("ServiceAccount", account) in objects
    binding = one(objects, "ClusterRoleBinding")
    assert {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in binding[
        "subjects"
    ]
    role = objects["ClusterRole", binding["roleRef"]["name"]]
    assert binding["roleRef"]["kind"] == "ClusterRole"
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    # The aggregator needs no API access.
    aggregator = one(objects, "StatefulSet")
    assert aggregator["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_mutual_tls(render: Callable[..., Objects]) -> None:
    objects = render(TLS_NO_WEB)
    aggregator, agent = one(objects, "StatefulSet"), one(objects, "DaemonSet")
    server, client_args = command_line(aggregator), command_line(agent)
    assert not server.insecure and not client_args.insecure and server.http is None
    for workload, path, secret, key in (
        (aggregator, server.tls_cert, "aggregator-tls", "tls.crt"),
        (aggregator, server.tls_key, "aggregator-tls", "tls.key"),
        (aggregator, server.tls_client_ca, "aggregator-tls", "ca.crt"),
        (agent, client_args.tls_ca, "aggregator-tls", "ca.crt"),
        (agent, client_args.tls_cert, "agent-tls", "tls.crt"),
        (agent, client_args.tls_key, "agent-tls", "tls.key"),
    ):
        volume = volume_at(workload, path)
        assert volume["secret"]["secretName"] == secret
        assert Path(path).name == key
        assert key in [i["key"] for i in volume["secret"].get("items", [{"key": key}])]
    # The web UI has no TLS yet: with it on, the aggregator needs --insecure (for it alone).
    assert command_line(one(render(TLS), "StatefulSet")).insecure


def test_job_config(render: Callable[..., Objects], tmp_path: Path) -> None:
    objects = render(JOBS)
    agent = one(objects, "DaemonSet")
    args = container(agent)["args"]
    path = args[args.index("--job-config") + 1]
    volume = volume_at(agent, path)
    config_map = objects["ConfigMap", volume["configMap"]["name"]]
    toml = tmp_path / "jobs.toml"
    toml.write_text(config_map["data"][Path(path).name])
    specs = load_config(toml)
    assert specs == [
        {"k8s_label": ["app.kubernetes.io/part-of"]},
        {"cgroup": r"/job_(\d+)/", "template": "slurm-{1}"},
    ]
    JobResolver.from_config(specs, KubernetesMetadata("node-1", None))
    annotations = agent["spec"]["template"]["metadata"]["annotations"]
    assert annotations["team"] == "perf" and len(annotations["checksum/jobs"]) == 64


def test_debuginfod_servers(render: Callable[..., Objects]) -> None:
    urls = "https://debuginfod.example.org https://debuginfod.example.com/"
    env = container(one(render({"agent": {"debuginfodUrls": urls}}), "DaemonSet"))["env"]
    assert {"name": "DEBUGINFOD_URLS", "value": urls} in env
    default = container(one(render(), "DaemonSet"))["env"]
    assert "DEBUGINFOD_URLS" not in {variable["name"] for variable in default}


def test_image(render: Callable[..., Objects]) -> None:
    objects = render({"image": {"repository": "registry.example/fleetprof", "tag": "1.2.3"}})
    for kind in ("DaemonSet", "StatefulSet"):
        assert container(one(objects, kind))["image"] == "registry.example/fleetprof:1.2.3"


def test_refused_combinations(helm: Path, tmp_path: Path) -> None:
    for values, message in (
        ({"aggregator": {"queryTokens": {"secretName": "t"}}}, "web UI cannot check tokens"),
        ({"tls": {"agentSecretName": "a"}}, "needs tls.secretName"),
    ):
        path = tmp_path / "values.json"
        path.write_text(json.dumps(values))
        out = subprocess.run(
            [helm, "template", RELEASE, CHART, "--values", path], capture_output=True, text=True
        )
        assert out.returncode != 0 and message in out.stderr
