"""deploy/: the DaemonSet, RBAC, ConfigMap and Containerfile are well formed, consistent
with each other, and the ClusterRole grants exactly the API calls the code makes."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kproxy import config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SOURCE = ROOT / "python" / "kproxy" / "sources" / "apiserver.py"

API_GROUPS = {"CoreV1Api": "", "DiscoveryV1Api": "discovery.k8s.io", "EventsV1Api": "events.k8s.io"}
VERBS = {"list": "list", "read": "get", "create": "create", "patch": "patch",
         "replace": "update", "delete": "delete"}  # fmt: skip


def documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in documents()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def test_daemonset() -> None:
    ds = one("DaemonSet")
    assert ds["apiVersion"] == "apps/v1"
    assert ds["metadata"]["namespace"] == "kube-system"
    assert ds["metadata"]["labels"]["k8s-app"] == "kube-proxy"
    assert ds["spec"]["selector"]["matchLabels"] == {"k8s-app": "kube-proxy"}
    pod = ds["spec"]["template"]
    assert pod["metadata"]["labels"]["k8s-app"] == "kube-proxy"
    spec = pod["spec"]
    assert spec["hostNetwork"] is True
    sa = one("ServiceAccount")
    assert spec["serviceAccountName"] == sa["metadata"]["name"]
    assert sa["metadata"]["namespace"] == "kube-system"
    (c,) = spec["containers"]
    assert c["securityContext"]["privileged"] is True
    assert {p["containerPort"] for p in c["ports"]} == {10256, 10249}
    live, ready = c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"]
    assert (live["path"], live["port"]) == ("/livez", 10256)
    assert (ready["path"], ready["port"]) == ("/healthz", 10256)
    # the mounted ConfigMap exists and the flags point at its key
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    cm_volume = next(v for v in volumes.values() if "configMap" in v)
    cm = one("ConfigMap", cm_volume["configMap"]["name"])
    assert cm["metadata"]["namespace"] == "kube-system"
    config_flag = next(a for a in c["command"] if a.startswith("--config="))
    mount = mounts[cm_volume["name"]]
    key = config_flag.split("=", 1)[1].removeprefix(mount + "/")
    assert key in cm["data"]
    assert c["command"][0] == "kproxy"
    assert "--hostname-override=$(NODE_NAME)" in c["command"]
    assert c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_configmap_is_a_valid_kube_proxy_configuration(tmp_path: Path) -> None:
    cm = one("ConfigMap")
    path = tmp_path / "config.conf"
    path.write_text(cm["data"]["config.conf"])
    cfg = config.load_config(["--config", str(path), "--hostname-override", "n1"])
    assert cfg.mode == "iptables"
    assert cfg.healthz_bind_address.endswith(":10256")
    assert cfg.metrics_bind_address.endswith(":10249")
    assert cfg.kube_api_qps == 5 and cfg.kube_api_burst == 10
    assert not cfg.kubeconfig and not cfg.master  # in-cluster config


def api_calls() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every client API method apiserver.py calls: the
    variables bound to ``client.XxxV1Api(...)`` and the methods used on them."""
    text = SOURCE.read_text()
    tree = ast.parse(text)
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call):
            m = re.fullmatch(r"client\.(\w+Api)", ast.unparse(node.value.func))
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if m:
                assert m.group(1) in API_GROUPS, f"no group mapping for {m.group(1)}"
                for t in targets:
                    bound[ast.unparse(t)] = m.group(1)
    assert set(bound.values()) == set(API_GROUPS)
    watches = "watch=True" in text
    calls: set[tuple[str, str, str]] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and ast.unparse(node.value) in bound):
            continue
        cls = bound[ast.unparse(node.value)]
        name = node.attr.removesuffix("_with_http_info")
        verb_word, _, rest = name.partition("_")
        rest = rest.removeprefix("namespaced_").removesuffix("_for_all_namespaces")
        verb = VERBS[verb_word]
        resource = rest.replace("_", "") + "s"
        calls.add((API_GROUPS[cls], resource, verb))
        if verb == "list" and watches:
            calls.add((API_GROUPS[cls], resource, "watch"))
    return calls


def granted() -> set[tuple[str, str, str]]:
    role = one("ClusterRole")
    out: set[tuple[str, str, str]] = set()
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


def test_rbac_grants_exactly_the_calls_the_code_makes() -> None:
    calls = api_calls()
    assert calls == {
        ("", "services", "list"),
        ("", "services", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("", "nodes", "list"),
        ("", "nodes", "watch"),
        ("events.k8s.io", "events", "create"),
    }
    assert granted() == calls


def test_binding_ties_the_role_to_the_service_account() -> None:
    binding = one("ClusterRoleBinding")
    role = one("ClusterRole")
    sa = one("ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "kube-system"}
    ]


@pytest.mark.parametrize("tool", ["iptables", "nftables", "ipset", "conntrack"])
def test_containerfile_installs_the_dataplane_tools(tool: str) -> None:
    text = (DEPLOY / "Containerfile").read_text()
    install = " ".join(line for line in text.splitlines() if "apt-get install" in line)
    assert re.search(rf"\b{tool}\b", install)
    assert re.search(r"^FROM \S+", text, re.M)
    assert re.search(r"pip install .*kproxy-\*\.whl", text)
    assert 'ENTRYPOINT ["kproxy"]' in text
