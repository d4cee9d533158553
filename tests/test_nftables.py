"""nftables-mode specific tests (the shared packet-flow table runs in tests/test_packet_flow.py).

- incremental syncs converge: after a series of changes applied as incremental
  transactions, the kernel table equals a fresh full sync of the final state;
- a ClusterIP on a port that is not a Service port is rejected;
- NodePorts answer only on nodePortAddresses (default `primary` in nftables mode);
- per-Service kernel algorithms from kproxy.io/lb-algorithm;
- drift (someone flushed the table) is repaired on the sync period;
- a refused transaction is counted and retried as a full sync;
- a full sync keeps the ClientIP affinity entries of endpoints that remain;
- `--cleanup` removes the tables.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bench import gen, netns

from flows import REJECT, Flow, check_flow, pods
from kproxy import _core
from kproxy.sandbox import ANSWER, NODE_IP, POD_GATEWAY, ConnectResult, Sandbox

pytestmark = pytest.mark.kernel

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TEST_PREFIX = "kpt"  # the suite's sandbox prefix (see conftest.py)

POD = "pod:client"
DEADLINE = 30.0


def _nft_available() -> None:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs Linux, root and iproute2")
    if shutil.which("nft") is None:
        pytest.skip("needs the nft tool")


def test_refused_transaction_names_line_and_object() -> None:
    from kproxy.dataplane.nftables import explain_nft_error

    text = "flush chain ip kube-proxy a\ndelete element ip kube-proxy cluster-ips { 10.96.1.9 }\n"
    err = (
        "/dev/stdin:2:44-52: Error: Could not process rule: No such file or directory\n"
        "delete element ip kube-proxy cluster-ips { 10.96.1.9 }\n" + "^" * 5000
    )
    msg = explain_nft_error(err, text)
    assert "line 2, object 'cluster-ips'" in msg and "No such file" in msg
    assert len(msg) < 700


# ------------------------------------------------------------------ convergence


def _render_config() -> str:
    return json.dumps(
        {
            "family": "v4",
            "node_name": gen.NODE_NAME,
            "node_ips": [gen.NODE_IP],
            "local_detector": {"kind": "cidr", "cidrs": [gen.CLUSTER_CIDR]},
            "nodeport_addresses": [gen.NODE_IP],
        }
    )


def _nft(text: str) -> None:
    proc = subprocess.run(
        ["nft", "-f", "-"], input=text, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"nft -f failed: {proc.stderr[:800]}\n--- input:\n{text[:2000]}"


def _table_state() -> dict[str, Any]:
    """The table as comparable data: chains -> rules, sets -> (type, elements)."""
    out = subprocess.run(
        ["nft", "-j", "list", "table", "ip", "kube-proxy"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    chains: dict[str, list[str]] = {}
    sets: dict[str, tuple[str, list[str]]] = {}
    for item in json.loads(out)["nftables"]:
        if "chain" in item:
            chains.setdefault(item["chain"]["name"], [])
        elif "rule" in item:
            r = item["rule"]
            chains.setdefault(r["chain"], []).append(json.dumps(r["expr"], sort_keys=True))
        elif "set" in item or "map" in item:
            s = item.get("set") or item["map"]
            elems = sorted(json.dumps(e, sort_keys=True) for e in s.get("elem", []))
            sets[s["name"]] = (json.dumps(s["type"]), elems)
    return {"chains": chains, "sets": sets}


def _service(i: int, **annotations: str) -> dict[str, Any]:
    svc = gen.service(i)
    if annotations:
        svc["metadata"]["annotations"] = dict(annotations)
    return svc


def test_incremental_syncs_converge_to_a_full_sync() -> None:
    _nft_available()
    n = 60
    model = _core.Model()
    for obj in gen.objects(n, 2):
        key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
        setter = model.set_service if obj["kind"] == "Service" else model.set_endpoint_slice
        setter(key, json.dumps(obj))
    rng = random.Random(4)
    changes: list[Callable[[int], None]] = [
        lambda i: model.set_endpoint_slice(
            gen.slice_key(i), json.dumps(gen.endpoint_slice(i, 2, change=rng.randrange(1000)))
        ),
        lambda i: model.set_endpoint_slice(
            gen.slice_key(i), json.dumps(gen.endpoint_slice(i, rng.randrange(0, 4)))
        ),
        lambda i: model.set_service(gen.service_key(i), None),
        lambda i: model.set_service(gen.service_key(i), json.dumps(_service(i))),
        lambda i: model.set_service(
            gen.service_key(i),
            json.dumps(
                _service(
                    i, **{"kproxy.io/lb-algorithm": rng.choice(["round-robin", "source-hash"])}
                )
            ),
        ),
        lambda i: model.set_service(
            gen.service_key(i),
            json.dumps(
                {
                    **_service(i),
                    "spec": {**_service(i)["spec"], "sessionAffinity": "ClientIP"},
                }
            ),
        ),
        lambda i: model.set_service(gen.service_key(n + i), json.dumps(_service(n + i))),
    ]
    with netns.fresh():
        r = _core.NftablesRenderer(_render_config())
        text, _ = r.render(model, True)
        _nft(text)
        r.commit()
        for step in range(40):
            for _ in range(rng.randrange(1, 4)):
                rng.choice(changes)(rng.randrange(n))
            text, meta = r.render(model, False)
            assert not json.loads(meta)["stats"]["full"], f"step {step}"
            if text:
                _nft(text)
            r.commit()
        incremental = _table_state()
    with netns.fresh():
        text, _ = _core.NftablesRenderer(_render_config()).render(model, True)
        _nft(text)
        full = _table_state()
    assert incremental["sets"] == full["sets"]
    assert incremental["chains"] == full["chains"]


def test_full_sync_replaces_a_foreign_table_atomically() -> None:
    _nft_available()
    model = _core.Model()
    for obj in gen.objects(3, 1):
        key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
        setter = model.set_service if obj["kind"] == "Service" else model.set_endpoint_slice
        setter(key, json.dumps(obj))
    with netns.fresh():
        # What upstream kube-proxy (or an older kproxy) may have left.
        _nft("add table ip kube-proxy\nadd chain ip kube-proxy service-STALE-x/y/tcp/z\n")
        text, _ = _core.NftablesRenderer(_render_config()).render(model, True)
        _nft(text)
        state = _table_state()
        assert "service-STALE-x/y/tcp/z" not in state["chains"]
        assert (
            sum(c.startswith("service-") and c.endswith("/tcp/http") for c in state["chains"]) == 3
        )


def test_full_sync_keeps_affinity_entries() -> None:
    """A full sync replaces the table; the ClientIP affinity entries of endpoints that
    remain come back with the time they had left, those of removed endpoints do not."""
    _nft_available()
    from kproxy.config import ProxyConfig
    from kproxy.dataplane.nftables import AFFINITY_PREFIX, NftablesBackend
    from kproxy.node import NodeInfo

    def affinity_service(i: int) -> str:
        svc = _service(i)
        svc["spec"]["sessionAffinity"] = "ClientIP"
        svc["spec"]["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 600}}
        return json.dumps(svc)

    model = _core.Model()
    for i in range(2):
        model.set_service(gen.service_key(i), affinity_service(i))
        model.set_endpoint_slice(gen.slice_key(i), json.dumps(gen.endpoint_slice(i, 2)))

    def affinity_sets() -> dict[str, list[dict[str, Any]]]:
        out = subprocess.run(
            ["nft", "-j", "list", "sets", "table", "ip", "kube-proxy"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        sets = [i["set"] for i in json.loads(out)["nftables"] if "set" in i]
        return {
            s["name"]: [e["elem"] for e in s.get("elem", [])]
            for s in sets
            if s["name"].startswith(AFFINITY_PREFIX)
        }

    cfg = ProxyConfig(mode="nftables", cluster_cidrs=(gen.CLUSTER_CIDR,))
    node = NodeInfo(name=gen.NODE_NAME, ips=(gen.NODE_IP,))
    with netns.fresh():
        backend = NftablesBackend(cfg, node)
        backend.sync(model, full=True)
        names = sorted(affinity_sets())
        assert len(names) == 4, names  # 2 Services x 2 endpoints
        # Clients that were sent to an endpoint (what the dataplane's `update` does).
        for n, name in enumerate(names):
            _nft(f"add element ip kube-proxy {name} {{ 10.200.0.{n + 1} }}")
        time.sleep(1.1)
        # Service 1 loses one endpoint: that endpoint's set goes, and its entry with it.
        one_left = gen.endpoint_slice(1, 2)
        one_left["endpoints"] = one_left["endpoints"][:1]
        model.set_endpoint_slice(gen.slice_key(1), json.dumps(one_left))
        result = backend.sync(model, full=True)
        assert result.full
        after = affinity_sets()
        assert len(after) == 3 and set(after) < set(names), (names, sorted(after))
        for name, elems in after.items():
            n = names.index(name)
            assert [e["val"] for e in elems] == [f"10.200.0.{n + 1}"], (name, elems)
            # The time left carried over (counting down from 600 s), not restarted.
            assert 0 < elems[0]["expires"] < 600, (name, elems)
        # Service 0 goes: its sets and entries with it; Service 1's entry stays.
        model.set_service(gen.service_key(0), None)
        backend.sync(model, full=True)
        final = affinity_sets()
        assert len(final) == 1 and all(final.values()), final


def test_ipv6_table_loads_and_updates() -> None:
    _nft_available()
    cfg = json.dumps(
        {
            "family": "v6",
            "node_name": "node1",
            "node_ips": ["fd00::2"],
            "local_detector": {"kind": "cidr", "cidrs": ["fd00:10:244::/64"]},
            "nodeport_addresses": None,
        }
    )
    svc = {
        "metadata": {"name": "s", "namespace": "ns"},
        "spec": {
            "type": "LoadBalancer",
            "clusterIPs": ["fd00:96::1"],
            "externalTrafficPolicy": "Local",
            "sessionAffinity": "ClientIP",
            "loadBalancerSourceRanges": ["fd00:1::/64"],
            "ports": [{"name": "p", "port": 80, "nodePort": 30080}],
        },
        "status": {"loadBalancer": {"ingress": [{"ip": "fd00:5::5"}]}},
    }

    def slice_(addrs: list[str]) -> str:
        eps = [{"addresses": [a], "nodeName": "node1"} for a in addrs]
        return json.dumps(
            {
                "metadata": {
                    "name": "s-x",
                    "namespace": "ns",
                    "labels": {"kubernetes.io/service-name": "s"},
                },
                "addressType": "IPv6",
                "ports": [{"name": "p", "port": 8080}],
                "endpoints": eps,
            }
        )

    model = _core.Model()
    model.set_service("ns/s", json.dumps(svc))
    model.set_endpoint_slice("ns/s-x", slice_(["fd00:10:244::5", "fd00:10:244::6"]))
    with netns.fresh():
        r = _core.NftablesRenderer(cfg)
        text, _ = r.render(model, True)
        _nft(text)
        r.commit()
        model.set_endpoint_slice("ns/s-x", slice_(["fd00:10:244::7"]))
        text, _ = r.render(model, False)
        _nft(text)
        r.commit()
        out = subprocess.run(
            ["nft", "list", "table", "ip6", "kube-proxy"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert "dnat to [fd00:10:244::7]:8080" in out
        assert "fd00:10:244::5" not in out


# ------------------------------------------------------------------ sandbox

SYNC_PERIOD = 2.0


@pytest.fixture(scope="module")
def nft_proxied() -> Iterator[Sandbox]:
    _nft_available()
    with Sandbox.from_manifests([EXAMPLES], prefix=TEST_PREFIX) as sb:
        sb.start_kproxy("nftables", ["--iptables-sync-period", f"{SYNC_PERIOD:g}s"])
        yield sb
        if sb.kproxy is not None and not sb.kproxy.running():
            pytest.fail(f"kproxy died during the tests:\n{sb.kproxy.log_text(tail=40)}")


def _wait(pred: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    for _ in range(int(deadline / 0.25) + 1):
        if pred():
            return
        if time.monotonic() > end:
            break
        time.sleep(0.25)
    raise AssertionError(f"timed out after {deadline}s waiting for {what}")


def _metric(sb: Sandbox, name: str) -> float:
    status, body = sb.http_get("node", "http://127.0.0.1:10249/metrics")
    assert status == 200
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _answers(sb: Sandbox, ip: str, port: int, count: int) -> list[ConnectResult]:
    return sb.connect_many(POD, "tcp", ip, port, count=count, timeout=1.0)


def test_tables_have_upstream_names(nft_proxied: Sandbox) -> None:
    out = nft_proxied.run_in("node", ["nft", "list", "tables"])
    assert "table ip kube-proxy" in out
    chains = nft_proxied.run_in("node", ["nft", "list", "chain", "ip", "kube-proxy", "services"])
    assert "vmap @service-ips" in chains and "@nodeport-ips" in chains


def test_cluster_ip_on_other_port_is_rejected(nft_proxied: Sandbox) -> None:
    for source in (POD, "node"):
        check_flow(
            nft_proxied,
            Flow(f"clusterip-port-81-{source}", source, "tcp", "10.96.0.10", 81, REJECT),
        )
    check_flow(nft_proxied, Flow("clusterip-udp-port-9", POD, "udp", "10.96.0.53", 9, REJECT))


def test_nodeport_only_on_nodeport_addresses(nft_proxied: Sandbox) -> None:
    check_flow(
        nft_proxied,
        Flow("nodeport-primary", POD, "tcp", NODE_IP, 30080, pods("web-1", "web-2"), True),
    )
    # The pod gateway is a local address of the node, but not a primary node IP.
    res = _answers(nft_proxied, POD_GATEWAY, 30080, 3)
    assert all(r.outcome != ANSWER for r in res), res


def _svc_with(name: str, ip: str, algo: str) -> list[dict[str, Any]]:
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": "demo",
            "annotations": {"kproxy.io/lb-algorithm": algo},
        },
        "spec": {
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
        },
    }
    eps = [
        {"addresses": [a], "conditions": {"ready": True}, "nodeName": "node1"}
        for a in ("10.244.0.11", "10.244.0.12", "10.244.0.13")
    ]
    sl = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-x",
            "namespace": "demo",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": eps,
    }
    return [svc, sl]


@pytest.mark.parametrize(
    "algo,ip",
    [("round-robin", "10.96.1.1"), ("source-hash", "10.96.1.2"), ("maglev", "10.96.1.3")],
)
def test_per_service_algorithm(nft_proxied: Sandbox, algo: str, ip: str) -> None:
    name = f"algo-{algo}"
    nft_proxied.write_manifest(f"zz-{name}.yaml", _svc_with(name, ip, algo))
    try:
        _wait(lambda: _answers(nft_proxied, ip, 80, 1)[0].answered, f"{name} to answer")
        res = _answers(nft_proxied, ip, 80, 9)
        seen = [r.pod for r in res]
        assert all(r.answered for r in res), res
        web = {"web-1", "web-2", "web-3"}
        if algo == "round-robin":
            # An exact rotation over the three endpoints.
            assert set(seen[:3]) == web, seen
            assert seen[3:6] == seen[:3] and seen[6:9] == seen[:3], seen
        elif algo == "source-hash":
            assert len(set(seen)) == 1, seen
        else:
            assert set(seen) <= web
            log = nft_proxied.kproxy.log_text() if nft_proxied.kproxy else ""
            assert "demo/algo-maglev:http: kproxy.io/lb-algorithm 'maglev'" in log
            assert "using random" in log
    finally:
        nft_proxied.remove_manifest(f"zz-{name}.yaml")
    _wait(lambda: not _answers(nft_proxied, ip, 80, 1)[0].answered, f"{name} to go away")


def test_flushed_table_is_repaired(nft_proxied: Sandbox) -> None:
    flow = Flow(
        "web-after-flush", POD, "tcp", "10.96.0.10", 80, pods("web-1", "web-2", "web-3"), False
    )
    check_flow(nft_proxied, flow)
    nft_proxied.run_in("node", ["nft", "flush", "table", "ip", "kube-proxy"])
    # (Not asserting the outage: the drift check may repair it within a connect.)
    _wait(
        lambda: _answers(nft_proxied, "10.96.0.10", 80, 1)[0].answered,
        "the drift check to repair the table",
        deadline=4 * SYNC_PERIOD + 10,
    )
    check_flow(nft_proxied, flow)
    nft_proxied.run_in("node", ["nft", "delete", "table", "ip", "kube-proxy"])
    _wait(
        lambda: _answers(nft_proxied, "10.96.0.10", 80, 1)[0].answered,
        "the drift check to recreate the table",
        deadline=4 * SYNC_PERIOD + 10,
    )


def test_refused_transaction_is_counted_and_retried_full(nft_proxied: Sandbox) -> None:
    name, ip = "fail-me", "10.96.1.9"
    before = _metric(nft_proxied, "kubeproxy_sync_proxy_rules_nftables_sync_failures_total")
    nft_proxied.write_manifest(f"zz-{name}.yaml", _svc_with(name, ip, "random"))
    try:
        _wait(lambda: _answers(nft_proxied, ip, 80, 1)[0].answered, f"{name} to answer")
        # Someone removes our element behind our back: deleting the Service will then
        # ask the kernel to delete an element that is gone, and it refuses.
        nft_proxied.run_in(
            "node",
            ["nft", "delete", "element", "ip", "kube-proxy", "cluster-ips", "{", ip, "}"],
        )
    finally:
        nft_proxied.remove_manifest(f"zz-{name}.yaml")
    _wait(
        lambda: (
            _metric(nft_proxied, "kubeproxy_sync_proxy_rules_nftables_sync_failures_total") > before
        ),
        "the failure to be counted",
    )
    # Retried as a full sync: the Service is gone and the others work.
    _wait(lambda: not _answers(nft_proxied, ip, 80, 1)[0].answered, "the full-sync retry")
    check_flow(
        nft_proxied,
        Flow(
            "web-after-retry", POD, "tcp", "10.96.0.10", 80, pods("web-1", "web-2", "web-3"), False
        ),
    )
    log = nft_proxied.kproxy.log_text() if nft_proxied.kproxy else ""
    assert "nft -f failed" in log and "cluster-ips" in log


def test_cleanup_removes_the_tables(nft_proxied: Sandbox) -> None:
    # Last in the module: stops the daemon.
    assert nft_proxied.stop_kproxy() == 0
    nft_proxied.kproxy = None  # stopped on purpose: the fixture must not report a death
    out = nft_proxied.run_in("node", ["nft", "list", "tables"])
    assert "kube-proxy" in out, "rules stay in place after SIGTERM"
    nft_proxied.run_in("node", [sys.executable, "-m", "kproxy", "--cleanup"], timeout=120)
    out = nft_proxied.run_in("node", ["nft", "list", "tables"])
    assert "kube-proxy" not in out
