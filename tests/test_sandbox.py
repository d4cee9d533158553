"""The sandbox itself, without kproxy: namespaces, links, echo servers, cleanup."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, TEST_PREFIX
from kproxy import echo
from kproxy.sandbox import (
    BRIDGE,
    CLIENT_POD,
    EXTERNAL_IP,
    NODE_IP,
    ConnectResult,
    Sandbox,
    SandboxError,
    _netns_list,
    cleanup_stale,
    load_objects,
    pods_from_objects,
)

# ------------------------------------------------------------------ without the kernel


def test_pods_from_examples() -> None:
    pods = {p.name: p for p in pods_from_objects(load_objects([EXAMPLES]))}
    assert pods["web-1"].ip == "10.244.0.11"
    assert pods["web-1"].node_name == "node1"
    assert pods["web-2"].node_name == "node2"
    assert pods["dns-1"].tcp == {53} and pods["dns-1"].udp == {53}
    assert pods["web-1"].tcp == {8080} and not pods["web-1"].udp
    assert "headless-1" in pods  # headless Services still have pods
    assert len({p.ip for p in pods.values()}) == len(pods)


def test_pods_named_by_ip_without_target_ref_and_outside_cidr_skipped() -> None:
    slice_ = {
        "kind": "EndpointSlice",
        "addressType": "IPv4",
        "ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}],
        "endpoints": [{"addresses": ["10.244.0.7"]}, {"addresses": ["192.0.2.1"]}],
    }
    (pod,) = pods_from_objects([slice_])
    assert (pod.name, pod.ip, pod.tcp, pod.udp) == ("pod-10-244-0-7", "10.244.0.7", {80}, {53})


def test_load_objects_accepts_list_and_json(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(
        json.dumps({"kind": "List", "items": [{"kind": "Service"}, {"kind": "Node"}]})
    )
    (tmp_path / "b.yaml").write_text("kind: Service\n---\n---\nkind: EndpointSlice\n")
    (tmp_path / "c.txt").write_text("kind: Service\n")
    kinds = [o["kind"] for o in load_objects([tmp_path])]
    assert kinds == ["Service", "Node", "Service", "EndpointSlice"]


def test_connect_result_verdicts() -> None:
    seen = ConnectResult("answer", pod="p", peer="10.244.0.1:5", local="172.18.0.2:5")
    assert seen.verdict == "p" and seen.masqueraded is True
    same = ConnectResult("answer", pod="p", peer="10.0.0.1:5", local="10.0.0.1:5")
    assert same.masqueraded is False
    assert ConnectResult("refused").verdict == "REJECT"
    assert ConnectResult("timeout").verdict == "DROP"
    assert ConnectResult("timeout").masqueraded is None


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_echo_server_and_client_on_loopback() -> None:
    tcp, udp = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_DGRAM)
    proc = subprocess.Popen(
        [sys.executable, echo.__file__, "serve", "--name", "pod-x", "--tcp", str(tcp),
         "--udp", str(udp)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        for proto, port in (("tcp", tcp), ("udp", udp)):
            res = echo.probe(proto, "127.0.0.1", port, timeout=2.0)
            assert res["outcome"] == "answer", res
            assert res["pod"] == "pod-x"
            assert res["peer"] == res["local"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    # Nothing listens any more: TCP and UDP are refused.
    assert echo.probe("tcp", "127.0.0.1", tcp, timeout=2.0)["outcome"] == "refused"
    assert echo.probe("udp", "127.0.0.1", udp, timeout=2.0)["outcome"] == "refused"


def test_echo_client_cli_prints_one_json_line_per_attempt() -> None:
    port = _free_port(socket.SOCK_STREAM)
    out = subprocess.run(
        [sys.executable, echo.__file__, "client", "--ip", "127.0.0.1", "--port", str(port),
         "--count", "3", "--timeout", "1"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["outcome"] for r in lines] == ["refused"] * 3


def test_prefix_is_validated() -> None:
    with pytest.raises(SandboxError):
        Sandbox([EXAMPLES], prefix="Bad-Prefix")


# ------------------------------------------------------------------ with the kernel


@pytest.mark.kernel
def test_every_pod_answers_from_the_node_with_its_name(sandbox: Sandbox) -> None:
    for pod in sandbox.pods.values():
        for proto, ports in (("tcp", pod.tcp_ports), ("udp", pod.udp_ports)):
            for port in ports:
                res = sandbox.connect("node", proto, pod.ip, port, timeout=2.0)
                assert res.pod == pod.name, (pod, proto, port, res)
                # Straight to the pod over the bridge: the node's bridge address, unchanged.
                assert res.masqueraded is False
                assert res.local_ip == "10.244.0.1"


@pytest.mark.kernel
def test_pod_to_pod_and_external_to_node(sandbox: Sandbox) -> None:
    res = sandbox.connect(f"pod:{CLIENT_POD}", "tcp", sandbox.pods["web-2"].ip, 8080)
    assert (res.pod, res.masqueraded) == ("web-2", False)
    assert res.local_ip == sandbox.pods[CLIENT_POD].ip
    # Nothing listens on the node: the node itself refuses.
    res = sandbox.connect("external", "tcp", NODE_IP, 30080)
    assert res.outcome == "refused" and res.local_ip == EXTERNAL_IP
    res = sandbox.connect("external", "udp", NODE_IP, 30053)
    assert res.outcome == "refused"


@pytest.mark.kernel
def test_unhandled_service_ip_times_out_without_kproxy(sandbox: Sandbox) -> None:
    # No rules: the node routes 10.96.0.0/16 to its uplink, where nothing forwards it.
    res = sandbox.connect(f"pod:{CLIENT_POD}", "tcp", "10.96.0.10", 80, timeout=0.5)
    assert res.verdict == "DROP"


@pytest.mark.kernel
def test_bridge_ports_hairpin_and_sysctls(sandbox: Sandbox) -> None:
    links = json.loads(sandbox.run_in("node", ["ip", "-j", "-d", "link", "show", "master", BRIDGE]))
    assert len(links) == len(sandbox.pods)
    for link in links:
        assert link["linkinfo"]["info_slave_data"]["hairpin"] is True, link["ifname"]
    for key in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"):
        assert sandbox.run_in("node", ["cat", f"/proc/sys/{key}"]).strip() == "1", key


@pytest.mark.kernel
def test_watched_manifest_copy_is_editable(sandbox: Sandbox) -> None:
    path = sandbox.write_manifest("zz-test.yaml", [{"kind": "Service", "metadata": {}}])
    assert path.parent == sandbox.manifest_dir and path.exists()
    assert not list(sandbox.manifest_dir.glob(".*.tmp"))
    sandbox.remove_manifest("zz-test.yaml")
    assert not path.exists()
    assert (EXAMPLES / "web.yaml").exists()  # the source was never touched


def _ns_gone(names: list[str]) -> bool:
    existing = set(_netns_list())
    return not any(n in existing for n in names)


@pytest.mark.kernel
def test_close_removes_namespaces_processes_and_workdir() -> None:
    with Sandbox.from_manifests([EXAMPLES / "web.yaml"], prefix=TEST_PREFIX) as sb:
        names = list(sb.iter_namespaces())
        procs = list(sb._procs)
        workdir = sb.workdir
        assert set(names) <= set(_netns_list())
        assert procs and all(p.poll() is None for p in procs)
    assert _ns_gone(names)
    assert all(p.poll() is not None for p in procs)
    assert not workdir.exists()
    sb.close()  # idempotent


@pytest.mark.kernel
def test_cleanup_on_error_inside_the_block() -> None:
    names: list[str] = []
    with pytest.raises(RuntimeError, match="boom"):
        with Sandbox.from_manifests([EXAMPLES / "web.yaml"], prefix=TEST_PREFIX) as sb:
            names = list(sb.iter_namespaces())
            raise RuntimeError("boom")
    assert names and _ns_gone(names)


@pytest.mark.kernel
def test_cleanup_when_setup_fails_half_way(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[str] = []

    def failing_start(self: Sandbox, timeout: float = 0) -> None:
        created.extend(self.iter_namespaces())
        assert set(created) <= set(_netns_list())
        raise SandboxError("echo servers failed")

    monkeypatch.setattr(Sandbox, "_start_echo_servers", failing_start)
    with pytest.raises(SandboxError, match="echo servers failed"):
        with Sandbox.from_manifests([EXAMPLES / "web.yaml"], prefix=TEST_PREFIX):
            pass
    assert created and _ns_gone(created)


@pytest.mark.kernel
def test_cleanup_stale_removes_only_dead_owners() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{TEST_PREFIX}-{dead.pid}-dead00-node"
    live = f"{TEST_PREFIX}-{os.getpid()}-live00-node"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        removed = cleanup_stale(TEST_PREFIX)
        assert stale in removed and live not in removed
        assert stale not in _netns_list() and live in _netns_list()
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.kernel
def test_keyboard_interrupt_in_child_run_cleans_up(tmp_path: Path) -> None:
    # A run interrupted by SIGINT (Ctrl-C) still deletes everything it created.
    script = (
        "import os, signal, sys, time\n"
        "from kproxy.sandbox import Sandbox\n"
        f"with Sandbox.from_manifests([{str(EXAMPLES / 'web.yaml')!r}], prefix='kpi') as sb:\n"
        "    print(' '.join(sb.iter_namespaces()), flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        names = proc.stdout.readline().split()
        assert names, "child did not build its sandbox"
        proc.send_signal(2)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 5
    while not _ns_gone(names) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ns_gone(names)
