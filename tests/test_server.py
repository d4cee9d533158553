"""HTTP endpoints over real sockets on 127.0.0.1 (ephemeral ports), and proxy health."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator

import pytest

from kproxy import metrics
from kproxy.config import ProxyConfig
from kproxy.errors import KproxyError
from kproxy.healthcheck import ServiceHealthServer
from kproxy.server import (
    ProxyHealthState,
    RunningServer,
    format_go_time,
    parse_bind_address,
    start,
    start_health_server,
    start_metrics_server,
)


class FakeTime:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# -- ProxyHealthState (upstream proxy_health.go semantics) --------------------------------


def test_healthy_while_starting_up_and_nothing_queued() -> None:
    t = FakeTime()
    s = ProxyHealthState(60.0, clock=t)
    t.now += 10_000
    h = s.health()
    assert h.healthy
    assert h.last_updated is None


def test_queued_update_becomes_stale_after_timeout() -> None:
    t = FakeTime()
    s = ProxyHealthState(60.0, clock=t)
    s.updated()
    s.queued_update()
    t.now += 59.9
    assert s.healthy()
    t.now += 0.1
    assert not s.healthy()  # exactly healthTimeout late is unhealthy (upstream uses <)
    s.updated()
    assert s.healthy()


def test_only_oldest_queued_update_counts() -> None:
    t = FakeTime()
    s = ProxyHealthState(60.0, clock=t)
    s.queued_update()
    t.now += 50
    s.queued_update()  # must not reset the clock
    t.now += 20
    assert not s.healthy()


def test_queued_but_never_synced_goes_stale() -> None:
    t = FakeTime()
    s = ProxyHealthState(30.0, clock=t)
    s.queued_update()
    t.now += 31
    assert not s.healthy()


def test_per_family_health() -> None:
    t = FakeTime()
    s = ProxyHealthState(10.0, clock=t)
    s.updated("IPv4")
    s.updated("IPv6")
    s.queued_update("IPv6")
    t.now += 11
    h = s.health()
    assert not h.healthy
    assert h.status["IPv4"].healthy
    assert not h.status["IPv6"].healthy


def test_node_deleting() -> None:
    s = ProxyHealthState(10.0)
    assert s.node_eligible
    s.set_node_deleting(True)
    assert not s.node_eligible
    s.set_node_deleting(False)
    assert s.node_eligible


def test_format_go_time() -> None:
    assert format_go_time(None) == "0001-01-01T00:00:00Z"
    assert format_go_time(0) == "1970-01-01T00:00:00Z"
    assert format_go_time(1.5) == "1970-01-01T00:00:01.5Z"


def test_parse_bind_address() -> None:
    assert parse_bind_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_bind_address("[::1]:10249") == ("::1", 10249)
    for bad in ("localhost:80", "1.2.3.4", "1.2.3.4:x", "1.2.3.4:70000"):
        with pytest.raises(KproxyError):
            parse_bind_address(bad)


# -- the health server --------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeTime:
    return FakeTime()


@pytest.fixture
def state(clock: FakeTime) -> ProxyHealthState:
    return ProxyHealthState(60.0, clock=clock)


@pytest.fixture
def health_server(state: ProxyHealthState) -> Iterator[RunningServer]:
    srv = start_health_server("127.0.0.1:0", state)
    yield srv
    srv.close()


def test_healthz_fresh_returns_200_with_upstream_json(
    health_server: RunningServer, state: ProxyHealthState, clock: FakeTime
) -> None:
    state.updated()
    before = metrics.PROXY_HEALTHZ_TOTAL.value(code="200")
    status, headers, body = get(health_server.port, "/healthz")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    doc = json.loads(body)
    assert doc["nodeEligible"] is True
    assert doc["healthy"] is True
    # healthy: lastUpdated is "now" (upstream compatibility)
    assert doc["lastUpdated"] == doc["currentTime"] == format_go_time(clock.now)
    assert metrics.PROXY_HEALTHZ_TOTAL.value(code="200") == before + 1


def test_healthz_and_livez_503_when_stale(
    health_server: RunningServer, state: ProxyHealthState, clock: FakeTime
) -> None:
    state.updated()
    synced_at = clock.now
    state.queued_update()
    clock.now += 120
    before_h = metrics.PROXY_HEALTHZ_TOTAL.value(code="503")
    before_l = metrics.PROXY_LIVEZ_TOTAL.value(code="503")
    status, _, body = get(health_server.port, "/healthz")
    assert status == 503
    assert json.loads(body)["lastUpdated"] == format_go_time(synced_at)
    status, _, body = get(health_server.port, "/livez")
    assert status == 503
    assert "nodeEligible" not in json.loads(body)
    assert metrics.PROXY_HEALTHZ_TOTAL.value(code="503") == before_h + 1
    assert metrics.PROXY_LIVEZ_TOTAL.value(code="503") == before_l + 1
    state.updated()
    assert get(health_server.port, "/healthz")[0] == 200


def test_healthz_503_but_livez_200_when_node_is_being_deleted(
    health_server: RunningServer, state: ProxyHealthState
) -> None:
    state.set_node_deleting(True)
    status, _, body = get(health_server.port, "/healthz")
    assert status == 503
    assert json.loads(body)["nodeEligible"] is False
    before = metrics.PROXY_LIVEZ_TOTAL.value(code="200")
    assert get(health_server.port, "/livez")[0] == 200
    assert metrics.PROXY_LIVEZ_TOTAL.value(code="200") == before + 1


def test_unknown_path_is_404(health_server: RunningServer) -> None:
    assert get(health_server.port, "/nope")[0] == 404


def test_bind_failure_is_a_clear_kproxy_error(state: ProxyHealthState) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(KproxyError, match=rf"healthz server on 127.0.0.1:{port}"):
            start_health_server(f"127.0.0.1:{port}", state)


def test_close_releases_the_port(state: ProxyHealthState) -> None:
    srv = start_health_server("127.0.0.1:0", state)
    port = srv.port
    srv.close()
    srv.close()  # idempotent
    again = start_health_server(f"127.0.0.1:{port}", state)
    assert again.port == port
    again.close()


# -- the metrics server -------------------------------------------------------------------


def test_metrics_server_endpoints() -> None:
    cfg = {"mode": "ipvs", "kind": "KubeProxyConfiguration"}
    srv = start_metrics_server("127.0.0.1:0", "ipvs", cfg)
    try:
        metrics.ENDPOINT_CHANGES_TOTAL.inc()
        status, headers, body = get(srv.port, "/metrics")
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        assert b"kubeproxy_sync_proxy_rules_endpoint_changes_total " in body
        assert get(srv.port, "/healthz")[:3:2] == (200, b"ok")
        status, headers, body = get(srv.port, "/proxyMode")
        assert (status, body) == (200, b"ipvs")
        assert headers["content-type"].startswith("text/plain")
        status, _, body = get(srv.port, "/configz")
        assert status == 200
        assert json.loads(body) == {"kubeproxy.config.k8s.io": cfg}
    finally:
        srv.close()


def test_start_from_config_and_disabled_servers(state: ProxyHealthState) -> None:
    cfg = ProxyConfig(healthz_bind_address="127.0.0.1:0", metrics_bind_address="", mode="nftables")
    servers = start(cfg, state)
    try:
        assert servers.metrics is None
        assert servers.health is not None
        assert get(servers.health.port, "/livez")[0] == 200
    finally:
        servers.close()
    cfg = ProxyConfig(healthz_bind_address="", metrics_bind_address="127.0.0.1:0", mode="nftables")
    servers = start(cfg, state)
    try:
        assert servers.health is None
        assert servers.metrics is not None
        assert get(servers.metrics.port, "/proxyMode")[2] == b"nftables"
        doc = json.loads(get(servers.metrics.port, "/configz")[2])
        assert doc["kubeproxy.config.k8s.io"]["mode"] == "nftables"
        assert doc["kubeproxy.config.k8s.io"]["kind"] == "KubeProxyConfiguration"
    finally:
        servers.close()


# -- service health check node ports ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def hc(state: ProxyHealthState) -> Iterator[ServiceHealthServer]:
    server = ServiceHealthServer(["127.0.0.1"], state)
    yield server
    server.close()


def test_service_health_503_without_local_endpoints_then_200(
    hc: ServiceHealthServer, state: ProxyHealthState
) -> None:
    port = free_port()
    assert hc.sync_services({port: "default/web"}) == {}
    status, headers, body = get(port, "/")
    assert status == 503
    assert json.loads(body) == {
        "service": {"namespace": "default", "name": "web"},
        "localEndpoints": 0,
        "serviceProxyHealthy": True,
    }
    hc.sync_endpoints({"default/web": 2})
    status, headers, body = get(port, "/anything")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-load-balancing-endpoint-weight"] == "2"
    assert json.loads(body)["localEndpoints"] == 2
    # upstream's exact layout: tab-indented, no trailing newline
    assert body.startswith(b'{\n\t"service": {\n\t\t"namespace": "default",')
    assert body.endswith(b'"serviceProxyHealthy": true\n}')
    # a Service missing from the endpoints map has no local endpoints
    hc.sync_endpoints({})
    assert get(port, "/")[0] == 503


def test_service_health_503_when_proxy_unhealthy(
    hc: ServiceHealthServer, state: ProxyHealthState, clock: FakeTime
) -> None:
    port = free_port()
    hc.sync_services({port: "ns/svc"})
    hc.sync_endpoints({"ns/svc": 1})
    assert get(port, "/")[0] == 200
    state.queued_update()
    clock.now += 61
    status, _, body = get(port, "/")
    assert status == 503
    assert json.loads(body)["serviceProxyHealthy"] is False


def test_sync_services_opens_and_closes_listeners(hc: ServiceHealthServer) -> None:
    p1, p2 = free_port(), free_port()
    hc.sync_services({p1: "ns/a", p2: "ns/b"})
    assert hc.ports() == {p1: "ns/a", p2: "ns/b"}
    hc.sync_endpoints({"ns/a": 1, "ns/b": 1})
    assert get(p1, "/")[0] == 200
    hc.sync_services({p2: "ns/b"})
    assert hc.ports() == {p2: "ns/b"}
    with pytest.raises(OSError):
        get(p1, "/")
    assert get(p2, "/")[0] == 200  # left alone, endpoints kept
    # the same port now belongs to another Service: reopened, counts reset
    hc.sync_services({p2: "ns/c"})
    status, _, body = get(p2, "/")
    assert status == 503
    assert json.loads(body)["service"] == {"namespace": "ns", "name": "c"}


def test_port_that_cannot_be_bound_is_reported_not_fatal(hc: ServiceHealthServer) -> None:
    good = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        failures = hc.sync_services({busy: "ns/busy", good: "ns/good"})
        assert set(failures) == {busy}
        assert str(busy) in failures[busy]
        assert hc.ports() == {good: "ns/good"}
    # retried on the next sync once the port is free
    assert hc.sync_services({busy: "ns/busy", good: "ns/good"}) == {}
    assert set(hc.ports()) == {busy, good}
