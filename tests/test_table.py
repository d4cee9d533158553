"""ServiceTable: lookup reasons for every branch of the categorisation, masquerading,
pick, render, object inputs, and the runnable example of docs/api.md."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

import kproxy
from kproxy import ConfigError, KproxyError, NoRouteError, Route, ServiceTable

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
POD = "10.244.0.5"
EXT = "172.18.0.100"
NODE = "172.18.0.2"


@pytest.fixture(scope="module")
def table() -> ServiceTable:
    return ServiceTable.from_manifests(EXAMPLES, node_name="node1", cluster_cidrs=["10.244.0.0/16"])


def look(t: ServiceTable, dst: str, port: int, src: str = POD, origin: str = "pod") -> Route:
    return t.lookup("tcp", dst, port, src, origin)  # type: ignore[arg-type]


def test_node_facts_from_node_object(table: ServiceTable) -> None:
    assert table.node_ips == (NODE,)
    assert table.zone == "zone-a"
    assert table.errors == []


@pytest.mark.parametrize(
    ("dst", "port", "src", "origin", "verdict", "masq", "words"),
    [
        ("10.96.0.18", 80, POD, "pod", "forward", False, "session affinity"),
        ("10.96.0.19", 80, POD, "pod", "reject", False, "no endpoints"),
        ("10.96.0.20", 80, POD, "pod", "forward", False, "falls back to 2 serving terminating"),
        ("10.96.0.21", 80, POD, "pod", "forward", False, "topology hints for zone zone-a"),
        ("10.96.0.22", 80, "10.244.0.95", "pod", "forward", True, "hairpin"),
        ("10.96.0.18", 80, NODE, "node", "forward", True, "outside the cluster CIDR"),
        ("192.168.100.17", 80, EXT, "external", "drop", False, "loadBalancerSourceRanges"),
        ("192.168.100.16", 80, EXT, "external", "forward", True, "externalTrafficPolicy Cluster"),
        ("192.168.50.10", 80, EXT, "external", "forward", True, "external IP"),
        (NODE, 30081, EXT, "external", "forward", False, "client IP is preserved"),
        (NODE, 30082, EXT, "external", "drop", False, "no endpoint on node node1"),
        (NODE, 30082, POD, "pod", "forward", False, "pod traffic to an external destination"),
        (NODE, 30082, NODE, "node", "forward", True, "node traffic to an external destination"),
        ("127.0.0.1", 30080, "127.0.0.1", "node", "forward", True, "NodePort"),
        ("10.96.0.18", 81, POD, "pod", "not-handled", False, "no Service port matches"),
        ("1.1.1.1", 80, POD, "pod", "not-handled", False, "no Service has 1.1.1.1:80/TCP"),
        ("10.96.0.2", 80, POD, "pod", "not-handled", False, "no Service"),  # headless/ignored
    ],
)
def test_examples(
    table: ServiceTable,
    dst: str,
    port: int,
    src: str,
    origin: str,
    verdict: str,
    masq: bool,
    words: str,
) -> None:
    r = look(table, dst, port, src, origin)
    assert r.verdict == verdict, r
    assert r.masquerade == masq, r
    assert words in r.reason, r
    assert (r.verdict == "forward") == bool(r.endpoints)


def test_terminating_endpoint_that_no_longer_serves_is_never_chosen(table: ServiceTable) -> None:
    assert "10.244.0.63:80" not in look(table, "10.96.0.20", 80).endpoints


def test_pick_raises_for_non_forward(table: ServiceTable) -> None:
    with pytest.raises(NoRouteError, match="reject"):
        table.pick("tcp", "10.96.0.19", 80, POD, "pod")
    with pytest.raises(NoRouteError, match="not-handled"):
        table.pick("tcp", "1.1.1.1", 80, POD, "pod")


def test_affinity_pick_with_injected_clock(table: ServiceTable) -> None:
    a = table.pick("tcp", "10.96.0.18", 80, "10.244.0.7", "pod", now=0.0)
    assert table.pick("tcp", "10.96.0.18", 80, "10.244.0.7", "pod", now=10800.0) == a


def svc(name: str, ip: str, extra: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "t", **(extra or {})},
        "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": 80}], **spec},
    }
    return obj


def eps(name: str, *endpoints: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-x",
            "namespace": "t",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080}],
        "endpoints": list(endpoints),
    }


def ep(ip: str, node: str = "n1", **cond: bool) -> dict[str, Any]:
    return {"addresses": [ip], "nodeName": node, "conditions": cond}


def small(*objs: dict[str, Any], **kw: Any) -> ServiceTable:
    kw.setdefault("cluster_cidrs", ["10.244.0.0/16"])
    return ServiceTable.from_objects(objs, node_name="n1", node_ips=["192.0.2.1"], **kw)


def test_itp_local_branches() -> None:
    t = small(
        svc("a", "10.96.1.1", internalTrafficPolicy="Local"),
        eps("a", ep("10.244.1.1", "n2")),
        svc("b", "10.96.1.2", internalTrafficPolicy="Local"),
        eps("b", ep("10.244.0.1"), ep("10.244.1.1", "n2")),
        svc("c", "10.96.1.3", internalTrafficPolicy="Local"),
        eps("c", ep("10.244.0.1", ready=False, serving=True, terminating=True)),
    )
    r = look(t, "10.96.1.1", 80)
    assert r.verdict == "drop" and "internalTrafficPolicy Local" in r.reason
    r = look(t, "10.96.1.2", 80)
    assert r.endpoints == ["10.244.0.1:8080"] and "1 ready local endpoint" in r.reason
    r = look(t, "10.96.1.3", 80)
    assert r.verdict == "forward" and "serving terminating local" in r.reason


def test_no_cluster_cidr_and_masquerade_all() -> None:
    objs = (svc("a", "10.96.1.1"), eps("a", ep("10.244.0.1")))
    r = look(small(*objs, cluster_cidrs=()), "10.96.1.1", 80, "192.0.2.50", "external")
    assert not r.masquerade and "no cluster CIDR" in r.reason
    r = look(small(*objs, masquerade_all=True), "10.96.1.1", 80)
    assert r.masquerade and "masqueradeAll" in r.reason


def test_node_hints_topology() -> None:
    hinted = [
        {**ep("10.244.0.1"), "hints": {"forNodes": [{"name": "n1"}]}},
        {**ep("10.244.1.1", "n2"), "hints": {"forNodes": [{"name": "n2"}]}},
    ]
    r = look(small(svc("a", "10.96.1.1"), eps("a", *hinted)), "10.96.1.1", 80)
    assert r.endpoints == ["10.244.0.1:8080"] and "topology hints for node n1" in r.reason


def test_lb_algorithm_annotation_and_unknown_value(caplog: pytest.LogCaptureFixture) -> None:
    ann = {"annotations": {"kproxy.io/lb-algorithm": "round-robin"}}
    bad = {"annotations": {"kproxy.io/lb-algorithm": "fastest"}}
    t = small(
        svc("a", "10.96.1.1", ann),
        eps("a", ep("10.244.0.1"), ep("10.244.0.2")),
        svc("b", "10.96.1.2", bad),
    )
    assert t.algorithms() == {"t/a:p": "round-robin", "t/b:p": "random"}
    assert any("fastest" in w for w in t.warnings)
    picks = [t.pick("tcp", "10.96.1.1", 80, POD, "pod") for _ in range(4)]
    assert picks == ["10.244.0.1:8080", "10.244.0.2:8080"] * 2


def test_masquerade_for_hairpin() -> None:
    t = small(svc("a", "10.96.1.1"), eps("a", ep("10.244.0.1"), ep("10.244.0.2")))
    r = look(t, "10.96.1.1", 80, "10.244.0.1")
    assert not r.masquerade
    assert r.masquerade_for("10.244.0.1:8080") and not r.masquerade_for("10.244.0.2:8080")


def test_invalid_objects_skipped_like_the_daemon() -> None:
    t = small(svc("a", "10.96.1.300"), svc("b", "10.96.1.2"))
    assert len(t) == 1 and "spec.clusterIPs[0]" in t.errors[0]


def test_bad_flows_raise_config_error(table: ServiceTable) -> None:
    for args in [
        ("icmp", "10.96.0.18", 80, POD, "pod"),
        ("tcp", "10.96.0.18", 80, "fd00::1", "pod"),
        ("tcp", "10.96.0.18", 0, POD, "pod"),
        ("tcp", "10.96.0.18", 80, POD, "space"),
        ("tcp", "nope", 80, POD, "pod"),
    ]:
        with pytest.raises(ConfigError):
            table.lookup(*args)  # type: ignore[arg-type]


def test_lookup_many_equals_lookup(table: ServiceTable) -> None:
    flows = [("tcp", f"10.96.0.{i}", 80, POD, "pod") for i in range(10, 25)]
    assert table.lookup_many(flows) == [table.lookup(*f) for f in flows]  # type: ignore[arg-type]


def test_kubernetes_client_models() -> None:
    client = pytest.importorskip("kubernetes.client")
    s = client.V1Service(
        metadata=client.V1ObjectMeta(name="a", namespace="t"),
        spec=client.V1ServiceSpec(
            cluster_ip="10.96.1.1", ports=[client.V1ServicePort(name="p", port=80)]
        ),
    )
    sl = client.V1EndpointSlice(
        address_type="IPv4",
        metadata=client.V1ObjectMeta(
            name="a-x", namespace="t", labels={"kubernetes.io/service-name": "a"}
        ),
        endpoints=[client.V1Endpoint(addresses=["10.244.0.1"], node_name="n1")],
        ports=[client.DiscoveryV1EndpointPort(name="p", port=8080)],
    )
    t = ServiceTable.from_objects([s, sl], node_name="n1")
    assert look(t, "10.96.1.1", 80).endpoints == ["10.244.0.1:8080"]


def test_render(table: ServiceTable) -> None:
    text = kproxy.render("iptables", table)
    assert text.startswith("*filter") and "COMMIT" in text
    assert "demo/no-endpoints:http has no endpoints" in text
    for mode in ("nftables", "ipvs", "userspace"):
        with pytest.raises(KproxyError, match="not available yet"):
            kproxy.render(mode, table)
    with pytest.raises(ConfigError):
        kproxy.render("ebpf", table)


def test_docs_example_runs() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(code.group(1), "docs/api.md", "exec"), {})
    finally:
        os.chdir(cwd)
