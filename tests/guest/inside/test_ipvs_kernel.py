"""The Rust IPVS client against a real IPVS (runs inside the guest kernel): what it
programs is read back with ``ipvsadm -Ln`` and with pyroute2."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2 import IPVS

from kproxy import _core

TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP


def vs(addr: str, port: int, proto: int = TCP, sched: str = "rr", **kw: Any) -> dict[str, Any]:
    return {"addr": addr, "protocol": proto, "port": port, "scheduler": sched, **kw}


def rs(addr: str, port: int, weight: int = 1) -> dict[str, Any]:
    return {"addr": addr, "port": port, "weight": weight}


def ipvsadm() -> str:
    return subprocess.run(
        ["ipvsadm", "-Ln"], capture_output=True, text=True, check=True, timeout=60
    ).stdout


@pytest.fixture
def sock() -> Iterator[_core.IpvsSocket]:
    s = _core.IpvsSocket()
    s.apply('["flush"]')
    yield s
    s.apply('["flush"]')


def sync(
    r: _core.IpvsReconciler,
    s: _core.IpvsSocket,
    services: list[tuple[dict[str, Any], list[dict[str, Any]]]],
    owned: list[str],
    full: bool = False,
) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(
        r.sync(s, json.dumps({"services": services}), owned, [], full)
    )
    return report


def test_program_v4_v6_read_back_with_ipvsadm_and_pyroute2(sock: _core.IpvsSocket) -> None:
    r = _core.IpvsReconciler()
    want = [
        (vs("10.96.0.10", 80), [rs("10.244.1.5", 8080), rs("10.244.2.5", 8080)]),
        (
            vs("10.96.0.11", 53, UDP, "mh", flags=0x1 | 0x8 | 0x10, timeout=600),
            [rs("10.244.1.6", 53, 2)],
        ),
        (vs("fd00::10", 443, TCP, "wlc"), [rs("fd00:1::5", 8443)]),
    ]
    report = sync(r, sock, want, ["10.96.0.10", "10.96.0.11", "fd00::10"])
    assert report["errors"] == [], report
    assert report["ops"] == 7
    out = ipvsadm()
    assert "TCP  10.96.0.10:80 rr" in out, out
    assert "-> 10.244.1.5:8080              Masq    1" in out, out
    assert "UDP  10.96.0.11:53 mh (mh-fallback,mh-port) persistent 600" in out, out
    assert "-> 10.244.1.6:53                Masq    2" in out, out
    assert "TCP  [fd00::10]:443 wlc" in out, out
    assert "-> [fd00:1::5]:8443" in out, out
    with IPVS() as ipvs:
        services = {
            (s.get_attr("IPVS_SVC_ATTR_ADDR"), s.get_attr("IPVS_SVC_ATTR_PORT"))
            for s in (m.get_attr("IPVS_CMD_ATTR_SERVICE") for m in ipvs.service("dump"))
        }
    assert services == {("10.96.0.10", 80), ("10.96.0.11", 53), ("fd00::10", 443)}
    # Our own dump agrees, and a second sync changes nothing.
    dumped = {(v["addr"], v["port"]): v for v in json.loads(sock.services())}
    assert dumped[("10.96.0.11", 53)]["flags"] == 0x1 | 0x8 | 0x10
    assert sync(r, sock, want, [], full=True)["ops"] == 0


def test_graceful_termination_and_ownership(sock: _core.IpvsSocket) -> None:
    r = _core.IpvsReconciler()
    foreign = vs("192.168.77.1", 80)
    sock.apply(json.dumps([{"add_service": foreign}]))
    want = [
        (vs("10.96.0.20", 80), [rs("10.244.1.5", 80), rs("10.244.1.6", 80)]),
        (vs("10.96.0.20", 53, UDP), [rs("10.244.1.5", 53), rs("10.244.1.6", 53)]),
    ]
    sync(r, sock, want, ["10.96.0.20"])
    want[0][1].pop()
    want[1][1].pop()
    report = sync(r, sock, want, ["10.96.0.20"])
    assert report["terminating"] == 1
    out = ipvsadm()
    assert "-> 10.244.1.6:80                Masq    0" in out, out  # draining
    assert "10.244.1.6:53" not in out, out  # UDP: at once
    # No connections: the next sync deletes it. A full sync never touches 192.168.77.1.
    report = sync(r, sock, [], ["10.96.0.20"], full=True)
    assert report["errors"] == []
    out = ipvsadm()
    assert "10.96.0.20" not in out, out
    assert "TCP  192.168.77.1:80 rr" in out, out


def test_kernel_errors_name_the_object_and_the_rest_is_applied(sock: _core.IpvsSocket) -> None:
    r = _core.IpvsReconciler()
    want = [
        (vs("10.96.0.30", 80, sched="nosuchsched"), [rs("10.244.1.5", 80)]),
        (vs("10.96.0.31", 80), [rs("10.244.1.5", 80)]),
    ]
    report = sync(r, sock, want, [])
    assert any("TCP 10.96.0.30:80 (nosuchsched)" in e for e in report["errors"]), report
    assert "TCP  10.96.0.31:80 rr" in ipvsadm()
    assert r.needs_full
    want[0] = (vs("10.96.0.30", 80), [rs("10.244.1.5", 80)])
    report = sync(r, sock, want, [])
    assert report["errors"] == [] and report["full"], report
    assert "TCP  10.96.0.30:80 rr" in ipvsadm()


def test_timeouts(sock: _core.IpvsSocket) -> None:
    before = sock.timeouts()
    try:
        sock.set_timeouts(901, 121, 301)
        assert sock.timeouts() == (901, 121, 301)
        out = subprocess.run(
            ["ipvsadm", "-L", "--timeout"], capture_output=True, text=True, check=True
        ).stdout
        assert "901 121 301" in out, out
    finally:
        sock.set_timeouts(*before)


def test_thousand_services_in_batches(sock: _core.IpvsSocket) -> None:
    r = _core.IpvsReconciler()
    want = [
        (vs(f"10.97.{i // 250}.{i % 250 + 1}", 80), [rs("10.244.1.5", 80), rs("10.244.1.6", 80)])
        for i in range(1000)
    ]
    report = sync(r, sock, want, [])
    assert report["errors"] == [] and report["ops"] == 3000
    assert len(json.loads(sock.services())) == 1000
    want[500][1].append(rs("10.244.1.7", 80))
    report = sync(r, sock, want, [])
    assert (report["ops"], report["dumps"]) == (1, 0)
