"""The API-server source through the official client, against the in-repo API server
(tests/apiserver): paging, selectors, watch, bookmarks, 410 relists, dropped and garbled
streams, 5xx, slow answers, an API server that goes away, events, client config."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from apiserver import FakeApiServer
from kproxy import metrics
from kproxy.config import ProxyConfig
from kproxy.errors import ConfigError
from kproxy.server import ProxyHealthState
from kproxy.sources import Event, Kind, create_source
from kproxy.sources.apiserver import (
    LABEL_SELECTOR,
    ApiHealthState,
    ApiServerSource,
    Backoff,
    RateLimiter,
    RecordingServiceHealthServer,
    build_api_client,
)


def svc(name: str, ip: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "t", "labels": labels or {}},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]},
    }


def eps(name: str, service: str, ip: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "t",
            "labels": {"kubernetes.io/service-name": service, **(labels or {})},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": [ip]}],
    }


NODE = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": "z1"}},
    "spec": {"podCIDRs": ["10.244.0.0/24"]},
    "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]},
}


class Recorder:
    """A Handler that records what it is told and keeps the resulting state."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, Any]] = []
        self.state: dict[tuple[Kind, str], dict[str, Any]] = {}

    def on_events(self, events: list[Event]) -> None:
        with self.lock:
            for ev in events:
                self.log.append(("event", ev))
                if ev.obj is None:
                    self.state.pop((ev.kind, ev.key), None)
                else:
                    self.state[(ev.kind, ev.key)] = ev.obj

    def on_synced(self, kind: Kind) -> None:
        with self.lock:
            self.log.append(("synced", kind))

    def synced(self) -> list[str]:
        with self.lock:
            return [k for what, k in self.log if what == "synced"]

    def events(self) -> list[Event]:
        with self.lock:
            return [e for what, e in self.log if what == "event"]

    def keys(self, kind: Kind) -> set[str]:
        with self.lock:
            return {k for (kd, k) in self.state if kd == kind}

    def mark(self) -> int:
        with self.lock:
            return len(self.log)

    def events_since(self, mark: int) -> list[Event]:
        with self.lock:
            return [e for what, e in self.log[mark:] if what == "event"]


def wait_for(pred: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        if pred():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def fast_backoff() -> Backoff:
    return Backoff(initial=0.05, cap=0.4)


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    srv = FakeApiServer(bookmark_interval=0.3).start()
    try:
        yield srv
    finally:
        srv.stop()


def make_cfg(srv: FakeApiServer, tmp_path: Path, **kw: Any) -> ProxyConfig:
    return ProxyConfig(
        kubeconfig=srv.kubeconfig(tmp_path / "kubeconfig"), hostname_override="node1", **kw
    )


class Running:
    def __init__(self, src: ApiServerSource, rec: Recorder) -> None:
        self.src = src
        self.rec = rec
        self.stop = threading.Event()
        self.thread = threading.Thread(target=src.run, args=(rec, self.stop), daemon=True)

    def reflector(self, kind: Kind) -> Any:
        return next(r for r in self.src.reflectors if r.kind == kind)


@pytest.fixture
def run_source(server: FakeApiServer, tmp_path: Path) -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def start(**kw: Any) -> Running:
        kw.setdefault("page_size", 3)
        kw.setdefault("watch_timeout", 2.0)
        kw.setdefault("backoff", fast_backoff)
        r = Running(ApiServerSource(make_cfg(server, tmp_path), **kw), Recorder())
        running.append(r)
        r.thread.start()
        return r

    yield start
    for r in running:
        r.stop.set()
        r.thread.join(timeout=10)
        assert not r.thread.is_alive()


def populate(srv: FakeApiServer, n: int = 7) -> None:
    for i in range(n):
        srv.apply(svc(f"s{i}", f"10.96.0.{i + 1}"))
        srv.apply(eps(f"s{i}-1", f"s{i}", f"10.244.0.{i + 1}"))
    srv.apply(NODE)
    srv.apply({**NODE, "metadata": {"name": "node2"}})


def lists(srv: FakeApiServer, path: str) -> int:
    """List requests (first pages only) for a path."""
    return sum(
        1
        for r in srv.requests
        if r.path == path
        and r.method == "GET"
        and "watch" not in r.query
        and "continue" not in r.query
    )


SERVICES = "/api/v1/services"
SLICES = "/apis/discovery.k8s.io/v1/endpointslices"


# -- list, selectors, sync --------------------------------------------------------------


def test_lists_in_pages_with_upstream_selectors(
    server: FakeApiServer, run_source: Callable[..., Running]
) -> None:
    populate(server)
    server.apply(svc("other-proxy", "10.96.1.1", {"service.kubernetes.io/service-proxy-name": "x"}))
    server.apply(svc("headless", "None", {"service.kubernetes.io/headless": ""}))
    server.apply(eps("other-1", "other-proxy", "10.244.1.1",
                     {"service.kubernetes.io/service-proxy-name": "x"}))  # fmt: skip
    r = run_source()
    wait_for(lambda: len(r.rec.synced()) == 3, "all kinds synced")
    assert r.rec.keys("Service") == {f"t/s{i}" for i in range(7)}
    assert r.rec.keys("EndpointSlice") == {f"t/s{i}-1" for i in range(7)}
    assert r.rec.keys("Node") == {"node1"}  # the field selector: this node only
    pages = [r for r in server.requests if r.path == SERVICES and "watch" not in r.query]
    assert len(pages) == 3  # 7 objects, pages of 3
    assert all(p.query["limit"] == "3" for p in pages)
    assert [("continue" in p.query) for p in pages] == [False, True, True]
    assert all(p.query["labelSelector"] == LABEL_SELECTOR for p in pages)
    node_req = next(r for r in server.requests if r.path == "/api/v1/nodes")
    assert node_req.query["fieldSelector"] == "metadata.name=node1"
    assert LABEL_SELECTOR == (
        "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"
    )
    # the objects are the API's JSON, fields the client's models do not know included
    obj = r.rec.state[("Service", "t/s0")]
    assert obj["kind"] == "Service" and obj["spec"]["clusterIP"] == "10.96.0.1"


def test_synced_only_after_the_first_list(
    server: FakeApiServer, run_source: Callable[..., Running]
) -> None:
    populate(server)
    server.fail(500, count=3, plural="services", watch=False)
    server.slow(0.5, count=1, plural="endpointslices", watch=False)
    r = run_source()
    wait_for(lambda: {"Service", "EndpointSlice"} <= set(r.rec.synced()), "synced")
    with r.rec.lock:
        log = list(r.rec.log)
    synced_at = log.index(("synced", "Service"))
    service_events = [i for i, (w, e) in enumerate(log) if w == "event" and e.kind == "Service"]
    assert service_events and max(service_events) < synced_at
    assert lists(server, SERVICES) == 4  # three 500s, then the list that worked


def test_watch_delivers_changes_and_selector_transitions(
    server: FakeApiServer, run_source: Callable[..., Running]
) -> None:
    populate(server, 2)
    r = run_source()
    wait_for(lambda: len(r.rec.synced()) == 3, "synced")
    server.apply(svc("s0", "10.96.0.50"))
    server.apply(svc("new", "10.96.0.60"))
    server.delete("EndpointSlice", "t/s1-1")
    # a label that moves the Service to another proxy: it leaves our selector (DELETED)
    server.apply(svc("s1", "10.96.0.2", {"service.kubernetes.io/service-proxy-name": "x"}))
    wait_for(lambda: r.rec.keys("Service") == {"t/s0", "t/new"}, "watch events")
    assert r.rec.state[("Service", "t/s0")]["spec"]["clusterIP"] == "10.96.0.50"
    assert r.rec.keys("EndpointSlice") == {"t/s0-1"}
    # the Node watch sees none of this but moves forward with bookmarks
    node = r.reflector("Node")
    wait_for(lambda: int(node.resource_version) >= server.resource_version, "bookmark")
    assert lists(server, SERVICES) == 1


def test_node_changes_are_delivered(
    server: FakeApiServer, run_source: Callable[..., Running]
) -> None:
    populate(server, 1)
    r = run_source()
    wait_for(lambda: len(r.rec.synced()) == 3, "synced")
    server.apply({**NODE, "spec": {**NODE["spec"], "taints": [
        {"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}})  # fmt: skip
    wait_for(lambda: "taints" in r.rec.state[("Node", "node1")]["spec"], "node update")
    server.delete("Node", "node1")
    wait_for(lambda: not r.rec.keys("Node"), "node deletion")
    assert ("Node", "node1") not in r.rec.state


# -- 410 and relists --------------------------------------------------------------------


@pytest.mark.parametrize("gone_as_http", [False, True], ids=["error-event", "http-410"])
def test_gone_relists_and_delivers_only_the_difference(tmp_path: Path, gone_as_http: bool) -> None:
    srv = FakeApiServer(bookmark_interval=60, gone_as_http=gone_as_http).start()
    stop = threading.Event()
    try:
        populate(srv)
        src = ApiServerSource(
            make_cfg(srv, tmp_path), page_size=3, watch_timeout=30, backoff=fast_backoff
        )
        rec = Recorder()
        t = threading.Thread(target=src.run, args=(rec, stop), daemon=True)
        t.start()
        wait_for(lambda: len(rec.synced()) == 3, "synced")
        srv.down()
        mark = rec.mark()
        srv.apply(svc("s1", "10.96.0.51"))
        srv.delete("Service", "t/s2")
        srv.apply(svc("added", "10.96.0.52"))
        srv.compact()  # the watchers' resourceVersion is now too old
        srv.up()
        wait_for(lambda: "t/added" in rec.keys("Service"), "relist")
        assert lists(srv, SERVICES) == 2
        changed = {(e.key, e.obj is None) for e in rec.events_since(mark) if e.kind == "Service"}
        # unchanged Services are not delivered again: nothing to reprogram for them
        assert changed == {("t/s1", False), ("t/s2", True), ("t/added", False)}
        assert rec.synced().count("Service") == 1
    finally:
        stop.set()
        srv.stop()


def test_expired_watch_error_event_relists(
    server: FakeApiServer, run_source: Callable[..., Running]
) -> None:
    populate(server, 2)
    r = run_source(watch_timeout=30.0)
    wait_for(lambda: len(r.rec.synced()) == 3, "synced")
    server.expire_watches()
    wait_for(lambda: lists(server, SERVICES) == 2 and lists(server, SLICES) == 2, "relists")
    server.apply(svc("after", "10.96.0.70"))
    wait_for(lambda: "t/after" in r.rec.keys("Service"), "watch after relist")
    assert r.rec.state[("Service", "t/after")]["spec"]["clusterIP"] == "10.96.0.70"


def test_expired_continue_token_restarts_the_list(server: FakeApiServer, tmp_path: Path) -> None:
    populate(server)
    src = ApiServerSource(make_cfg(server, tmp_path), page_size=3, backoff=fast_backoff)
    rec = Recorder()
    reflector_calls: list[int] = []
    orig = server._list

    def list_and_expire(plural: str, ns: str | None, q: dict[str, str]) -> tuple[int, Any]:
        out = orig(plural, ns, q)
        if plural == "services" and not reflector_calls:
            reflector_calls.append(1)
            server.compact()  # the continue token handed out just now expires
        return out

    server._list = list_and_expire  # type: ignore[method-assign]
    stop = threading.Event()
    t = threading.Thread(target=src.run, args=(rec, stop), daemon=True)
    t.start()
    try:
        wait_for(lambda: "Service" in rec.synced(), "synced after an expired continue")
        assert rec.keys("Service") == {f"t/s{i}" for i in range(7)}
        assert lists(server, SERVICES) == 2
    finally:
        stop.set()
        t.join(timeout=10)


# -- broken streams ---------------------------------------------------------------------


def test_stream_cut_mid_event_resumes_without_relist(
    server: FakeApiServer, run_source: Callable[..., Running]
) -> None:
    populate(server, 2)
    r = run_source(watch_timeout=30.0)
    wait_for(lambda: len(r.rec.synced()) == 3, "synced")
    server.poison_watch("services", b'{"type":"MODIFIED","object":{"kind":"Serv')
    server.apply(svc("later", "10.96.0.80"))
    wait_for(lambda: "t/later" in r.rec.keys("Service"), "change after the cut")
    server.drop_watches()
    server.apply(svc("later2", "10.96.0.81"))
    wait_for(lambda: "t/later2" in r.rec.keys("Service"), "change after a drop")
    assert lists(server, SERVICES) == 1


def test_undecodable_event_relists_and_invalid_object_is_skipped(
    server: FakeApiServer, run_source: Callable[..., Running]
) -> None:
    populate(server, 2)
    r = run_source(watch_timeout=30.0)
    wait_for(lambda: len(r.rec.synced()) == 3, "synced")
    before = metrics.INVALID_OBJECTS_TOTAL.value("Service")
    server.poison_watch("services", b'{"type":"ADDED","object":{"metadata":{}}}\n')
    wait_for(lambda: metrics.INVALID_OBJECTS_TOTAL.value("Service") == before + 1, "skip")
    assert lists(server, SERVICES) == 1  # a nameless object is skipped, not a relist
    server.poison_watch("services", b"this is not json\n")
    wait_for(lambda: lists(server, SERVICES) == 2, "relist after garbage")
    server.apply(svc("ok", "10.96.0.90"))
    wait_for(lambda: "t/ok" in r.rec.keys("Service"), "still watching")
    assert r.rec.keys("Service") == {"t/s0", "t/s1", "t/ok"}


def test_5xx_and_slow_watches_back_off_and_recover(
    server: FakeApiServer, run_source: Callable[..., Running]
) -> None:
    populate(server, 2)
    server.fail(503, count=4, plural="services", watch=True)
    server.slow(1.0, count=1, plural="endpointslices", watch=True)
    r = run_source()
    wait_for(lambda: len(r.rec.synced()) == 3, "synced")
    server.apply(svc("x", "10.96.0.91"))
    server.apply(eps("x-1", "x", "10.244.0.91"))
    wait_for(lambda: "t/x" in r.rec.keys("Service"), "service after 503s")
    wait_for(lambda: "t/x-1" in r.rec.keys("EndpointSlice"), "slice after a slow answer")
    failed = [q for q in server.requests if q.path == SERVICES and q.status == 503]
    assert len(failed) == 4
    assert lists(server, SERVICES) == 1  # a failed watch resumes; it does not relist


def test_server_down_marks_health_stale_then_converges(
    server: FakeApiServer, run_source: Callable[..., Running]
) -> None:
    populate(server, 2)
    r = run_source(watch_timeout=30.0)
    health = ApiHealthState(health_timeout=0.3)
    r.src.health = health
    wait_for(lambda: len(r.rec.synced()) == 3, "synced")
    assert health.node_eligible
    server.down()
    wait_for(lambda: not health.node_eligible, "stale /healthz while the API server is away")
    assert health.healthy()  # /livez and the service health checks follow syncs only
    server.apply(svc("while-down", "10.96.0.92"))
    time.sleep(1.0)
    server.up()
    wait_for(lambda: "t/while-down" in r.rec.keys("Service"), "converged")
    wait_for(lambda: health.node_eligible, "healthy again")


# -- node, events, config ---------------------------------------------------------------


def test_node_object_waits_for_the_node(server: FakeApiServer, tmp_path: Path) -> None:
    src = ApiServerSource(make_cfg(server, tmp_path), node_wait=10, backoff=fast_backoff)
    timer = threading.Timer(0.5, server.apply, args=(NODE,))
    timer.start()
    node = src.node_object("node1")
    assert node is not None and node["metadata"]["name"] == "node1"
    src.node_wait = 0.2
    assert src.node_object("absent") is None


def test_events_are_recorded_best_effort(server: FakeApiServer, tmp_path: Path) -> None:
    src = ApiServerSource(make_cfg(server, tmp_path))
    src.recorder.event(src.recorder.node_ref(), "Normal", "Starting", "StartKubeProxy")
    wait_for(lambda: server.objects("Event"), "event posted")
    ev = server.objects("Event")[0]
    assert ev["regarding"]["kind"] == "Node" and ev["regarding"]["name"] == "node1"
    assert (ev["reason"], ev["action"], ev["type"]) == ("Starting", "StartKubeProxy", "Normal")
    assert ev["reportingController"] == "kube-proxy"
    # a failing API never reaches the caller
    server.fail(500, count=5, method="POST")
    src.recorder.event(src.recorder.node_ref(), "Normal", "Starting", "StartKubeProxy")
    time.sleep(0.3)
    # a health check port that cannot be bound: upstream's Warning on the Service
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    hc = RecordingServiceHealthServer(["127.0.0.1"], ProxyHealthState(60), src.recorder)
    try:
        server.clear_faults()
        assert port in hc.sync_services({port: "t/lb"})
        assert port in hc.sync_services({port: "t/lb"})  # reported once, not per sync
        wait_for(lambda: len(server.objects("Event")) == 2, "warning posted")
        time.sleep(0.3)
        warn = [e for e in server.objects("Event") if e["type"] == "Warning"]
        assert len(warn) == 1
        assert warn[0]["reason"] == "FailedToStartServiceHealthcheck"
        assert warn[0]["regarding"] == {
            "kind": "Service", "apiVersion": "v1", "namespace": "t", "name": "lb"
        }  # fmt: skip
    finally:
        hc.close()
        busy.close()


def test_client_config_sources(
    server: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg(server, tmp_path)
    assert build_api_client(cfg).configuration.host == server.url
    api = build_api_client(ProxyConfig(kubeconfig=cfg.kubeconfig, master="http://10.9.9.9:1/"))
    assert api.configuration.host == "http://10.9.9.9:1"
    assert build_api_client(ProxyConfig(master="http://127.0.0.2:8080")).configuration.host == (
        "http://127.0.0.2:8080"
    )
    with pytest.raises(ConfigError, match="--kubeconfig"):
        build_api_client(ProxyConfig(kubeconfig=str(tmp_path / "missing")))
    # in-cluster: the service account's token and CA, KUBERNETES_SERVICE_HOST/PORT
    from kubernetes.config import incluster_config

    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("sa-token")
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    src = create_source(ProxyConfig(hostname_override="node1"))
    assert isinstance(src, ApiServerSource)
    assert src.api_client.configuration.host == "https://10.96.0.1:443"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(ConfigError, match="--manifests"):
        create_source(ProxyConfig(hostname_override="node1"))


def test_rate_limiter_and_backoff() -> None:
    now = [0.0]
    lim = RateLimiter(qps=2.0, burst=3, clock=lambda: now[0])
    assert [lim.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert lim.reserve() == pytest.approx(0.5)
    now[0] += 10.0
    assert lim.reserve() == 0.0
    assert RateLimiter(qps=0, burst=0).reserve() == 0.0  # qps 0: unlimited

    t = [0.0]
    b = Backoff(initial=1.0, cap=8.0, reset_after=100.0, clock=lambda: t[0])
    steps = [b.next() for _ in range(6)]
    for got, base in zip(steps, [1, 2, 4, 8, 8, 8], strict=True):
        assert base <= got <= 2 * base  # jitter up to +100%
    t[0] += 1000.0
    assert b.next() <= 2.0  # calm for long enough: back to the start


# -- the daemon end to end, in a network namespace ---------------------------------------

ROOT = Path(__file__).resolve().parent.parent


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, *argv: str) -> str:
        proc = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            raise AssertionError(f"{argv}: {proc.stderr}")
        return proc.stdout

    def rules(self) -> str:
        return self.run("iptables-nft-save")

    def get(self, url: str) -> tuple[int, str]:
        code = (
            "import sys,urllib.request,urllib.error\n"
            "try:\n"
            " r = urllib.request.urlopen(sys.argv[1], timeout=2)\n"
            " print(r.status); print(r.read().decode())\n"
            "except urllib.error.HTTPError as e: print(e.code); print(e.read().decode())\n"
            "except OSError: print(0)\n"
        )
        status, _, body = self.run(sys.executable, "-c", code, url).partition("\n")
        return int(status), body


@pytest.fixture
def netns() -> Iterator[Netns]:
    name = f"kpt-api{os.getpid()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield Netns(name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def metric(ns: Netns, name: str) -> float:
    _, text = ns.get("http://127.0.0.1:10249/metrics")
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def healthz(ns: Netns, path: str = "/healthz") -> tuple[int, dict[str, Any]]:
    status, body = ns.get(f"http://127.0.0.1:10256{path}")
    return status, (json.loads(body) if status else {})


def trigger(obj: dict[str, Any]) -> dict[str, Any]:
    """The EndpointSlice controller's last-change-trigger-time annotation."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    obj["metadata"]["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": stamp}
    return obj


@pytest.mark.kernel
def test_daemon_programs_the_kernel_from_watch_events_through_faults(
    netns: Netns, tmp_path: Path
) -> None:
    srv = FakeApiServer(netns=netns.name, bookmark_interval=1.0).start()
    log_path = tmp_path / "kproxy.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        srv.apply(NODE)
        srv.apply(svc("a", "10.96.1.1"))
        srv.apply(eps("a-1", "a", "10.244.0.10"))
        # nothing is programmed until the EndpointSlice list is in
        srv.fail(500, count=3, plural="endpointslices", watch=False)
        argv = [
            "ip", "netns", "exec", netns.name, sys.executable, "-m", "kproxy",
            "--kubeconfig", srv.kubeconfig(tmp_path / "kubeconfig"),
            "--hostname-override", "node1", "--cluster-cidr", "10.244.0.0/16",
            "--healthz-bind-address", "127.0.0.1:10256",
            "--metrics-bind-address", "127.0.0.1:10249",
            "--iptables-sync-period", "2s", "-v", "2",
        ]  # fmt: skip
        env = dict(os.environ, KPROXY_IPTABLES_BACKEND="nft", KPROXY_WATCH_TIMEOUT_SECONDS="5")
        proc = subprocess.Popen(argv, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=env)

        def logs() -> str:
            return log_path.read_text(errors="replace")

        wait_for(lambda: any(r.path == SERVICES and r.query.get("watch") for r in srv.requests),
                 "the Service watch")  # fmt: skip
        assert "10.96.1.1" not in netns.rules(), "programmed before the EndpointSlice list"
        wait_for(lambda: "10.96.1.1/32" in netns.rules(), "first sync", 60)
        wait_for(lambda: healthz(netns)[0] == 200, "healthy")
        assert any(e["reason"] == "Starting" for e in srv.objects("Event"))

        # a watch event: a new Service and its endpoints
        srv.apply(svc("b", "10.96.1.2"))
        srv.apply(trigger(eps("b-1", "b", "10.244.0.11")))
        wait_for(lambda: "10.96.1.2/32" in netns.rules(), "watched Service programmed")
        wait_for(lambda: metric(netns, "kubeproxy_network_programming_duration_seconds_count") > 0,
                 "network programming latency observed")  # fmt: skip

        # 410 in the stream: relist, only the changed object reprogrammed
        changes = metric(netns, "kubeproxy_sync_proxy_rules_service_changes_total")
        srv.expire_watches()
        srv.apply(svc("b", "10.96.1.3"))
        wait_for(lambda: "10.96.1.3/32" in netns.rules(), "change after 410")
        assert "10.96.1.2/32" not in netns.rules()
        wait_for(lambda: "relisting" in logs(), "relist logged")
        assert metric(netns, "kubeproxy_sync_proxy_rules_service_changes_total") == changes + 1

        # 5xx answers and dropped streams
        srv.fail(503, count=3, watch=True)
        srv.drop_watches()
        srv.apply(svc("c", "10.96.1.4"))
        srv.apply(eps("c-1", "c", "10.244.0.12"))
        wait_for(lambda: "10.96.1.4/32" in netns.rules(), "change after 5xx and drops", 60)

        # the API server is down for a while: rules kept, /livez fine, /healthz stale
        srv.down()
        srv.delete("Service", "t/c")
        srv.apply(svc("d", "10.96.1.5"))
        srv.compact()
        wait_for(lambda: healthz(netns)[0] == 503, "stale /healthz while the API is away", 30)
        assert healthz(netns)[1]["nodeEligible"] is False
        assert healthz(netns, "/livez")[0] == 200
        assert "10.96.1.4/32" in netns.rules() and "10.96.1.1/32" in netns.rules()
        changes = metric(netns, "kubeproxy_sync_proxy_rules_service_changes_total")
        srv.up()
        wait_for(lambda: "10.96.1.5/32" in netns.rules(), "converged after the outage", 90)
        wait_for(lambda: "10.96.1.4/32" not in netns.rules(), "deleted while down")
        wait_for(lambda: healthz(netns)[0] == 200, "healthy again", 30)
        # only the two changed Services went through the tracker, not all of them again
        assert metric(netns, "kubeproxy_sync_proxy_rules_service_changes_total") == changes + 2

        # the Node: the autoscaler's taint makes /healthz 503, /livez stays 200
        tainted = {**NODE, "spec": {**NODE["spec"], "taints": [
            {"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]}}  # fmt: skip
        srv.apply(tainted)
        wait_for(lambda: healthz(netns)[1].get("nodeEligible") is False, "node not eligible")
        assert healthz(netns)[0] == 503 and healthz(netns, "/livez")[0] == 200
        srv.apply(NODE)
        wait_for(lambda: healthz(netns)[0] == 200, "eligible again")

        # new node IPs: exit for a restart, as upstream; the rules stay
        moved = {**NODE, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]}}
        srv.apply(moved)
        assert proc.wait(timeout=30) == 1
        assert "exiting to restart" in logs()
        assert "10.96.1.5/32" in netns.rules()
    except BaseException:
        print(log_path.read_text(errors="replace")[-20000:] if log_path.exists() else "")
        raise
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
        srv.stop()
