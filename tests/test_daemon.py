"""The daemon as a process: exit codes, SIGTERM, --cleanup, bad input and restore
failures, against a real kernel in a network namespace of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOOD_SVC = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "good", "namespace": "t"},
    "spec": {"clusterIP": "10.96.1.1", "ports": [{"name": "http", "port": 80}]},
}
GOOD_SLICE = {
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {
        "name": "good-1",
        "namespace": "t",
        "labels": {"kubernetes.io/service-name": "good"},
    },
    "addressType": "IPv4",
    "ports": [{"name": "http", "port": 8080}],
    "endpoints": [{"addresses": ["10.244.0.10"], "nodeName": "node1"}],
}


def test_bad_flag_exits_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kproxy", "--iptables-masquerade-bit", "40"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "masquerade-bit" in proc.stderr


def test_no_source_exits_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kproxy", "--hostname-override", "n1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "--manifests" in proc.stderr


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, *argv: str, check: bool = True, env: dict[str, str] | None = None) -> str:
        proc = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv}: {proc.stderr}")
        return proc.stdout

    def save(self, backend: str = "nft") -> str:
        return self.run(f"iptables-{backend}-save")

    def get(self, url: str) -> tuple[int, str]:
        code = (
            "import sys,urllib.request,urllib.error\n"
            "try:\n"
            " r = urllib.request.urlopen(sys.argv[1], timeout=2)\n"
            " print(r.status); print(r.read().decode())\n"
            "except urllib.error.HTTPError as e: print(e.code); print(e.read().decode())\n"
        )
        out = self.run(sys.executable, "-c", code, url)
        status, _, body = out.partition("\n")
        return int(status), body


@pytest.fixture
def netns() -> Iterator[Netns]:
    name = f"kpt-d{os.getpid()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield Netns(name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def write(dir: Path, name: str, docs: list[object] | str) -> Path:
    import yaml

    path = dir / name
    if isinstance(docs, str):
        path.write_text(docs)
    else:
        path.write_text(yaml.safe_dump_all(docs))
    return path


def start(
    ns: Netns,
    manifests: Path,
    log: Path,
    env: dict[str, str] | None = None,
    extra: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    argv = [
        "ip", "netns", "exec", ns.name, sys.executable, "-m", "kproxy",
        "--manifests", str(manifests), "--hostname-override", "node1",
        "--cluster-cidr", "10.244.0.0/16",
        "--healthz-bind-address", "127.0.0.1:10256",
        "--metrics-bind-address", "127.0.0.1:10249", "-v", "2", *(extra or []),
    ]  # fmt: skip
    full_env = dict(os.environ, KPROXY_IPTABLES_BACKEND="nft", **(env or {}))
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=full_env)
    return proc


def wait_for(pred: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.2) + 1):
        if pred():  # type: ignore[operator]
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def synced(ns: Netns) -> bool:
    try:
        status, body = ns.get("http://127.0.0.1:10256/healthz")
    except AssertionError:
        return False
    return status == 200 and not json.loads(body)["lastUpdated"].startswith("0001")


@pytest.mark.kernel
def test_sigterm_exits_0_and_keeps_rules(netns: Netns, tmp_path: Path) -> None:
    write(tmp_path, "svc.yaml", [GOOD_SVC, GOOD_SLICE])
    proc = start(netns, tmp_path, tmp_path / "log")
    try:
        wait_for(lambda: "10.96.1.1" in netns.save(), "rules for t/good")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        assert rc == 0, (tmp_path / "log").read_text()
        assert time.monotonic() - t0 < 5.0
        assert "10.96.1.1" in netns.save(), "rules must stay after SIGTERM"
    finally:
        proc.kill()


@pytest.mark.kernel
def test_cleanup_removes_ours_and_nothing_else(netns: Netns, tmp_path: Path) -> None:
    write(tmp_path, "svc.yaml", [GOOD_SVC, GOOD_SLICE])
    netns.run("iptables-nft", "-t", "nat", "-N", "USER-CHAIN")
    netns.run("iptables-nft", "-t", "nat", "-A", "PREROUTING", "-j", "USER-CHAIN")
    netns.run("iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
    proc = start(netns, tmp_path, tmp_path / "log")
    try:
        wait_for(lambda: "KUBE-SVC-" in netns.save(), "rules")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    netns.run(sys.executable, "-m", "kproxy", "--cleanup")
    saved = netns.save()
    for chain in (
        "KUBE-SERVICES",
        "KUBE-SVC-",
        "KUBE-SEP-",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-FORWARD",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-PROXY-FIREWALL",
    ):
        assert chain not in saved, f"{chain} left behind:\n{saved}"
    assert "-A PREROUTING -j USER-CHAIN" in saved
    assert "--dport 22 -j ACCEPT" in saved


@pytest.mark.kernel
def test_bad_input_applies_the_rest_and_names_it(netns: Netns, tmp_path: Path) -> None:
    bad_ip = json.loads(json.dumps(GOOD_SVC))
    bad_ip["metadata"]["name"] = "bad-ip"
    bad_ip["spec"]["clusterIP"] = "10.96.1.300"
    bad_port = json.loads(json.dumps(GOOD_SVC))
    bad_port["metadata"]["name"] = "bad-port"
    bad_port["spec"]["clusterIP"] = "10.96.1.2"
    bad_port["spec"]["ports"] = [
        {"name": "a", "port": 0},
        {"name": "b", "port": 81, "protocol": "UDP"},
    ]
    zero_slice = json.loads(json.dumps(GOOD_SLICE))
    zero_slice["metadata"]["name"] = "good-2"
    zero_slice["endpoints"] = [{"addresses": ["010.244.0.11"]}, {"addresses": ["10.244.0.12"]}]
    write(tmp_path, "good.yaml", [GOOD_SVC, GOOD_SLICE, zero_slice])
    write(tmp_path, "bad.yaml", [bad_ip, bad_port])
    write(
        tmp_path,
        "broken.yaml",
        "kind: Service\nmetadata: {name: x\n---\n"
        + json.dumps(
            GOOD_SVC
            | {
                "metadata": {"name": "after-broken", "namespace": "t"},
                "spec": {"clusterIP": "10.96.1.3", "ports": [{"port": 80}]},
            }
        ),
    )
    log = tmp_path / "log"
    proc = start(netns, tmp_path, log)
    try:
        wait_for(lambda: synced(netns), "first sync")
        saved = netns.save()
        assert "-d 10.96.1.1/32" in saved  # the good service
        assert "10.244.0.12:8080" in saved  # the good endpoint of the slice with a bad one
        assert "10.96.1.3/32" in saved  # the document after a broken one
        assert "udp --dport 81" in saved  # the good port of bad-port
        text = log.read_text()
        assert "Service t/bad-ip: spec.clusterIPs[0]" in text
        assert "Service t/bad-port: spec.ports[0].port" in text
        assert "EndpointSlice t/good-2: endpoints[0].addresses[0]" in text
        assert "broken.yaml" in text
        assert proc.poll() is None, "bad input must not stop the proxy"
        _, metrics = netns.get("http://127.0.0.1:10249/metrics")
        assert 'kproxy_invalid_objects_total{kind="Service"}' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


@pytest.mark.kernel
def test_bad_update_keeps_previous_rules(netns: Netns, tmp_path: Path) -> None:
    write(tmp_path, "svc.yaml", [GOOD_SVC, GOOD_SLICE])
    proc = start(netns, tmp_path, tmp_path / "log")
    try:
        wait_for(lambda: "10.244.0.10:8080" in netns.save(), "rules")
        broken = json.loads(json.dumps(GOOD_SVC))
        broken["spec"]["clusterIP"] = "not-an-ip"
        other = json.loads(json.dumps(GOOD_SVC))
        other["metadata"]["name"] = "other"
        other["spec"]["clusterIP"] = "10.96.1.9"
        write(tmp_path, "svc.yaml", [broken, GOOD_SLICE, other])
        wait_for(lambda: "10.96.1.9/32" in netns.save(), "the other service")
        assert "10.244.0.10:8080" in netns.save(), "rules of t/good must survive its bad update"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


@pytest.mark.kernel
def test_restore_failure_is_counted_and_retried_full(netns: Netns, tmp_path: Path) -> None:
    # A wrapper that makes the first iptables-nft-restore fail, then behaves.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    marker = tmp_path / "failed-once"
    real = subprocess.run(
        ["which", "iptables-nft-restore"], capture_output=True, text=True, check=True
    ).stdout.strip()
    wrapper = bindir / "iptables-nft-restore"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"if [ ! -e {marker} ]; then touch {marker}; cat >/dev/null;"
        " echo 'iptables-restore: line 3 failed' >&2; exit 1; fi\n"
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    manifests = tmp_path / "m"
    manifests.mkdir()
    write(manifests, "svc.yaml", [GOOD_SVC, GOOD_SLICE])
    env = {"PATH": f"{bindir}:{os.environ['PATH']}"}
    proc = start(netns, manifests, tmp_path / "log", env=env)
    try:
        wait_for(lambda: "10.244.0.10:8080" in netns.save(), "rules after the retry", timeout=60)
        assert marker.exists()
        _, metrics = netns.get("http://127.0.0.1:10249/metrics")
        assert "kubeproxy_sync_proxy_rules_iptables_restore_failures_total 1" in metrics, metrics
        assert "retrying as a full sync" in (tmp_path / "log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


@pytest.mark.kernel
def test_flushed_tables_are_repaired(netns: Netns, tmp_path: Path) -> None:
    write(tmp_path, "svc.yaml", [GOOD_SVC, GOOD_SLICE])
    log = tmp_path / "log"
    argv_extra = ["--iptables-sync-period", "2s"]
    proc = start(netns, tmp_path, log, extra=argv_extra)
    try:
        wait_for(lambda: "10.244.0.10:8080" in netns.save(), "rules")
        netns.run("iptables-nft", "-t", "nat", "-F")
        netns.run("iptables-nft", "-t", "nat", "-X")
        assert "KUBE-SERVICES" not in netns.run("iptables-nft-save", "-t", "nat")
        wait_for(lambda: "10.244.0.10:8080" in netns.save(), "rules restored", timeout=30)
        assert "-A PREROUTING -m comment --comment" in netns.save()
        assert "KUBE-PROXY-CANARY is gone" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
