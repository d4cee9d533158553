"""The ipvs mode's backend (python/kproxy/dataplane/ipvs.py) against a real kernel
(runs inside the guest): partial syncs program only what changed (virtual servers,
kube-ipvs0 addresses, ipset members), a draining real server goes on a sync without
any change once it has no connections, a full sync reconciles against the kernel, and
``kproxy --cleanup`` removes kproxy's state but not foreign virtual servers or those
inside --ipvs-exclude-cidrs."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from kproxy import _core
from kproxy.config import ProxyConfig
from kproxy.dataplane.iptables import run_save
from kproxy.dataplane.ipvs import FILTER_CHAINS, IPSETS, IPVS_INTERFACE, NAT_CHAINS, IpvsBackend
from kproxy.node import NodeInfo

NODE_DEV, NODE_IP = "kpt0", "192.0.2.10"
EXCLUDED = "10.96.9.0/24"
FOREIGN = "192.168.77.1"


def cluster_ip(i: int) -> str:
    return f"10.96.3.{i + 1}"


def service(i: int, node_port: int = 0) -> str:
    port: dict[str, Any] = {"port": 80, "targetPort": 8080, "protocol": "TCP"}
    if node_port:
        port["nodePort"] = node_port
    return json.dumps(
        {
            "kind": "Service",
            "metadata": {"name": f"s{i}", "namespace": "t"},
            "spec": {
                "type": "NodePort" if node_port else "ClusterIP",
                "clusterIP": cluster_ip(i),
                "clusterIPs": [cluster_ip(i)],
                "ports": [port],
            },
        }
    )


def endpoint_slice(i: int, ips: list[str]) -> str:
    return json.dumps(
        {
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"s{i}-x",
                "namespace": "t",
                "labels": {"kubernetes.io/service-name": f"s{i}"},
            },
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": [ip], "conditions": {"ready": True}, "nodeName": "n1"} for ip in ips
            ],
            "ports": [{"port": 8080, "protocol": "TCP", "name": ""}],
        }
    )


def run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout


def ipvsadm() -> str:
    return run("ipvsadm", "-Ln")


def real_server(out: str, addr: str) -> int | None:
    """Weight of real server `addr` (ip:port) in `ipvsadm -Ln` output, None if absent."""
    m = re.search(rf"-> {re.escape(addr)}\s+Masq\s+(\d+)", out)
    return int(m.group(1)) if m else None


def ipset_members(name: str) -> set[str]:
    lines = run("ipset", "save", name).splitlines()
    return {line.split()[2] for line in lines if line.startswith("add ")}


def bound() -> set[str]:
    out = run("ip", "-o", "-4", "addr", "show", "dev", IPVS_INTERFACE)
    return {line.split()[3].split("/")[0] for line in out.splitlines()}


def add_virtual_servers(*addrs: str) -> None:
    sock = _core.IpvsSocket()
    ops = [
        {"add_service": {"addr": a, "protocol": 6, "port": 80, "scheduler": "rr"}} for a in addrs
    ]
    assert sock.apply(json.dumps(ops)) == []


@pytest.fixture
def backend() -> Iterator[IpvsBackend]:
    IpvsBackend.cleanup_static()
    run("ipvsadm", "-C")
    subprocess.run(["ip", "link", "del", NODE_DEV], capture_output=True, check=False)
    run("ip", "link", "add", NODE_DEV, "type", "dummy")
    run("ip", "addr", "add", f"{NODE_IP}/24", "dev", NODE_DEV)
    run("ip", "link", "set", NODE_DEV, "up")
    cfg = dataclasses.replace(ProxyConfig(), mode="ipvs", ipvs_exclude_cidrs=(EXCLUDED,))
    try:
        yield IpvsBackend(cfg, NodeInfo(name="n1"))
    finally:
        IpvsBackend.cleanup_static()
        run("ipvsadm", "-C")
        subprocess.run(["ip", "link", "del", NODE_DEV], capture_output=True, check=False)


def test_partial_syncs_program_only_the_change(backend: IpvsBackend) -> None:
    m = _core.Model()
    for i in range(20):
        m.set_service(f"t/s{i}", service(i))
        m.set_endpoint_slice(f"t/s{i}-x", endpoint_slice(i, [f"10.244.{i}.1", f"10.244.{i}.2"]))
    r = backend.sync(m, True)
    assert r.full and r.changed
    assert ipvsadm().count("TCP  10.96.3.") == 20
    assert bound() == {cluster_ip(i) for i in range(20)}
    assert len(ipset_members("KUBE-CLUSTER-IP")) == 20
    add_virtual_servers(FOREIGN)

    # One endpoint replaced: one Service planned, two messages, no dump.
    m.set_endpoint_slice("t/s7-x", endpoint_slice(7, ["10.244.7.1", "10.244.7.9"]))
    r = backend.sync(m, False)
    st = r.stats["ipvs"]
    assert not r.full
    assert (st["replanned"], st["ops"], st["dumps"]) == (1, 2, 0), st
    out = ipvsadm()
    assert real_server(out, "10.244.7.9:8080") == 1, out
    assert real_server(out, "10.244.7.2:8080") == 0, out  # draining
    loop = ipset_members("KUBE-LOOP-BACK")
    assert "10.244.7.9,tcp:8080,10.244.7.9" in loop
    assert "10.244.7.2,tcp:8080,10.244.7.2" not in loop

    # No connections: a sync without any change (the periodic one) deletes it.
    r = backend.sync(m, False)
    st = r.stats["ipvs"]
    assert (st["replanned"], st["ops"], st["dumps"], st["terminating"]) == (0, 1, 1, 0), st
    assert real_server(ipvsadm(), "10.244.7.2:8080") is None

    # A Service removed, one added: its virtual server, address and ipset member.
    m.set_service("t/s3", None)
    m.set_service("t/s20", service(20, node_port=30080))
    m.set_endpoint_slice("t/s20-x", endpoint_slice(20, ["10.244.20.1"]))
    r = backend.sync(m, False)
    assert r.stats["ipvs"]["replanned"] == 1  # s20 planned; s3 only unplanned
    out = ipvsadm()
    assert f"{cluster_ip(3)}:80 " not in out and f"TCP  {cluster_ip(20)}:80 rr" in out, out
    assert f"TCP  {NODE_IP}:30080 rr" in out, out
    assert cluster_ip(3) not in bound() and cluster_ip(20) in bound()
    cluster = ipset_members("KUBE-CLUSTER-IP")
    assert f"{cluster_ip(3)},tcp:80" not in cluster and f"{cluster_ip(20)},tcp:80" in cluster
    assert ipset_members("KUBE-NODE-PORT-TCP") == {"30080"}

    # A full sync reads the kernel: a leftover virtual server on an address bound to
    # kube-ipvs0 is kproxy's and goes, unless inside --ipvs-exclude-cidrs; the rest
    # already matches.
    run("ip", "addr", "add", "10.96.8.8/32", "dev", IPVS_INTERFACE)
    run("ip", "addr", "add", "10.96.9.9/32", "dev", IPVS_INTERFACE)
    add_virtual_servers("10.96.8.8", "10.96.9.9")
    r = backend.sync(m, True)
    assert r.full and r.stats["ipvs"]["ops"] == 1, r.stats
    out = ipvsadm()
    assert "10.96.8.8:80" not in out and "TCP  10.96.9.9:80 rr" in out, out
    assert f"TCP  {FOREIGN}:80 rr" in out, out
    assert bound() == {cluster_ip(i) for i in range(21) if i != 3}


def test_cleanup_removes_kproxys_state_only(backend: IpvsBackend) -> None:
    m = _core.Model()
    for i in range(3):
        m.set_service(f"t/s{i}", service(i, node_port=30080 + i))
        m.set_endpoint_slice(f"t/s{i}-x", endpoint_slice(i, [f"10.244.{i}.1"]))
    backend.sync(m, True)
    add_virtual_servers(FOREIGN)
    run("ip", "addr", "add", "10.96.9.9/32", "dev", IPVS_INTERFACE)
    add_virtual_servers("10.96.9.9")
    out = ipvsadm()
    assert f"TCP  {NODE_IP}:30081 rr" in out and f"TCP  {cluster_ip(2)}:80 rr" in out, out
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kproxy",
            "--cleanup",
            "--proxy-mode",
            "ipvs",
            "--ipvs-exclude-cidrs",
            EXCLUDED,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = ipvsadm()
    assert "10.96.3." not in out and f"{NODE_IP}:" not in out, out
    assert f"TCP  {FOREIGN}:80 rr" in out and "TCP  10.96.9.9:80 rr" in out, out
    links = run("ip", "-o", "link", "show")
    assert IPVS_INTERFACE not in links
    sets = set(run("ipset", "list", "-n").split())
    assert not sets & set(IPSETS), sets
    saved = run_save(backend.tools[4])
    for chain in (*NAT_CHAINS, *FILTER_CHAINS):
        assert f":{chain} " not in saved, saved


SERVER_NS = "kpsrv"
V6_SERVER = "fd00:1::2"
V6_CLUSTER_IP = "fd00:96::10"
SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 8080))
s.listen(8)
print("ready", flush=True)
for _ in range(8):
    c, peer = s.accept()
    c.sendall(f"hello {peer[0]}".encode())
    c.close()
"""


@pytest.fixture
def v6_server() -> Iterator[None]:
    """A TCP server on [fd00:1::2]:8080 in its own namespace, reached over a veth."""
    subprocess.run(["ip", "netns", "del", SERVER_NS], capture_output=True, check=False)
    run("ip", "netns", "add", SERVER_NS)
    proc = None
    try:
        run("ip", "link", "add", "kpv0", "type", "veth", "peer", "name", "kpv1")
        run("ip", "link", "set", "kpv1", "netns", SERVER_NS)
        run("ip", "addr", "add", "fd00:1::1/64", "dev", "kpv0", "nodad")
        run("ip", "link", "set", "kpv0", "up")
        ns = ("ip", "netns", "exec", SERVER_NS)
        run(*ns, "ip", "addr", "add", f"{V6_SERVER}/64", "dev", "kpv1", "nodad")
        run(*ns, "ip", "link", "set", "kpv1", "up")
        run(*ns, "ip", "link", "set", "lo", "up")
        proc = subprocess.Popen(
            [*ns, sys.executable, "-c", SERVER, V6_SERVER], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=30)
        subprocess.run(["ip", "link", "del", "kpv0"], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", SERVER_NS], capture_output=True, check=False)


def test_dual_stack_service_over_ipv6(backend: IpvsBackend, v6_server: None) -> None:
    """A dual-stack ClusterIP Service: the IPv6 virtual server, the KUBE-6-* sets
    and the ip6tables companion chains are programmed, and a real IPv6 connection
    to the ClusterIP reaches the endpoint through IPVS, masqueraded by ip6tables."""
    # masquerade-all: the server has no route back to the ClusterIP (the source
    # the node picks), so the reply only comes back through the ip6tables MASQUERADE.
    b = IpvsBackend(dataclasses.replace(backend.cfg, masquerade_all=True), backend.node, (4, 6))
    svc = json.loads(service(40))
    svc["spec"]["clusterIPs"] = [cluster_ip(40), V6_CLUSTER_IP]
    svc["spec"]["ipFamilies"] = ["IPv4", "IPv6"]
    svc["spec"]["ipFamilyPolicy"] = "RequireDualStack"
    v6_slice = json.loads(endpoint_slice(40, [V6_SERVER]))
    v6_slice["metadata"]["name"] = "s40-v6"
    v6_slice["addressType"] = "IPv6"
    m = _core.Model()
    m.set_service("t/s40", json.dumps(svc))
    m.set_endpoint_slice("t/s40-x", endpoint_slice(40, ["10.244.40.1"]))
    m.set_endpoint_slice("t/s40-v6", json.dumps(v6_slice))
    r = b.sync(m, True)
    assert r.full
    out = ipvsadm()
    assert f"TCP  [{V6_CLUSTER_IP}]:80 rr" in out, out
    assert real_server(out, f"[{V6_SERVER}]:8080") == 1, out
    assert real_server(out, "10.244.40.1:8080") == 1, out
    assert ipset_members("KUBE-6-CLUSTER-IP") == {f"{V6_CLUSTER_IP},tcp:80"}
    assert ipset_members("KUBE-6-IPVS-IPS") == {V6_CLUSTER_IP}
    assert ipset_members("KUBE-CLUSTER-IP") == {f"{cluster_ip(40)},tcp:80"}
    saved6 = run_save(b.tools[6])
    assert "--match-set KUBE-6-IPVS-IPS dst -j REJECT" in saved6, saved6
    assert "-j KUBE-IPVS-FILTER" in saved6, saved6
    with socket.create_connection((V6_CLUSTER_IP, 80), timeout=10) as c:
        c.settimeout(10)
        assert c.recv(100).decode().startswith("hello fd00:1::1")
    # The IPv6 endpoint goes: a partial sync of the IPv6 side only.
    m.set_endpoint_slice("t/s40-v6", None)
    r = b.sync(m, False)
    assert not r.full and r.stats["ipvs"]["ops"] == 1, r.stats
    assert real_server(ipvsadm(), f"[{V6_SERVER}]:8080") == 0  # draining
    assert IpvsBackend.cleanup_static() is False
    assert "fd00:96::10" not in ipvsadm()
    assert "KUBE-6-CLUSTER-IP" not in run("ipset", "list", "-n")
