"""The daemon's HTTP endpoints: the health server and the metrics server.

Both follow upstream kube-proxy (``pkg/proxy/healthcheck/proxy_health.go`` and
``serveMetrics`` in ``cmd/kube-proxy/app/server.go``):

- healthz address: ``/healthz`` and ``/livez`` answer JSON ``{"lastUpdated",
  "currentTime", "nodeEligible" (healthz only), "healthy", "status"}``; 200 when the
  proxy is fresh, 503 when an update has been queued for longer than the health timeout
  (upstream: 2 x syncPeriod), and ``/healthz`` also 503 while the node is being deleted.
- metrics address: ``/metrics`` (Prometheus text), ``/healthz`` (``ok``), ``/proxyMode``
  (the mode as plain text) and ``/configz`` (the effective configuration as JSON).

Servers are stdlib ``ThreadingHTTPServer``s running in daemon threads.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from kproxy import metrics
from kproxy.errors import KproxyError

if TYPE_CHECKING:
    from kproxy.config import ProxyConfig

__all__ = [
    "ProxyHealth",
    "ProxyHealthState",
    "RunningServer",
    "Servers",
    "format_go_time",
    "parse_bind_address",
    "start",
    "start_health_server",
    "start_metrics_server",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Proxy health
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxierHealth:
    """The health of one IP family's proxier."""

    last_updated: float | None
    healthy: bool


@dataclass(frozen=True)
class ProxyHealth:
    """A snapshot of the proxy's health (upstream ``ProxyHealth``). Times are epoch
    seconds; ``last_updated`` is None before the first successful sync."""

    last_updated: float | None
    current_time: float
    healthy: bool
    status: dict[str, ProxierHealth] = field(default_factory=dict)


class ProxyHealthState:
    """Thread-safe record of queued and finished syncs, and of the node's eligibility.

    The proxier calls :meth:`queued_update` when a change arrives that needs a sync and
    :meth:`updated` when a sync succeeded. The proxy is unhealthy when an update has been
    queued for ``health_timeout`` seconds or more without a successful sync (upstream
    passes 2 x syncPeriod). Before anything is queued, the proxy is healthy (starting up).

    Families (``"IPv4"``, ``"IPv6"``) are optional: a single-stack caller passes nothing
    and gets one unnamed family. The proxy is healthy only when every family is.

    Node eligibility: upstream treats a missing Node as ineligible; kproxy starts
    eligible (``node_eligible=True``) because with ``--manifests`` there may be no Node
    object at all. The daemon calls :meth:`set_node_deleting` when the Node has a
    deletionTimestamp or the ``ToBeDeletedByClusterAutoscaler`` taint.
    """

    def __init__(
        self,
        health_timeout: float,
        clock: Callable[[], float] = time.time,
        node_eligible: bool = True,
    ) -> None:
        self.health_timeout = health_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._last_updated: dict[str, float] = {}
        self._oldest_pending_queued: dict[str, float] = {}
        self._node_eligible = node_eligible

    def now(self) -> float:
        """The state's clock (epoch seconds)."""
        return self._clock()

    def queued_update(self, family: str = "") -> None:
        """A change needs a sync. Only the oldest pending request counts."""
        with self._lock:
            self._oldest_pending_queued.setdefault(family, self._clock())

    def updated(self, family: str = "") -> None:
        """A sync succeeded: nothing is pending any more for ``family``."""
        with self._lock:
            self._oldest_pending_queued.pop(family, None)
            self._last_updated[family] = self._clock()

    @property
    def node_eligible(self) -> bool:
        """False while the node is being deleted (then /healthz answers 503)."""
        with self._lock:
            return self._node_eligible

    def set_node_eligible(self, eligible: bool) -> None:
        with self._lock:
            self._node_eligible = eligible

    def set_node_deleting(self, deleting: bool) -> None:
        """Mark the node as being deleted (or not any more)."""
        self.set_node_eligible(not deleting)

    def health(self) -> ProxyHealth:
        """The current health (upstream ``ProxyHealthServer.Health``)."""
        with self._lock:
            now = self._clock()
            families = set(self._last_updated) | set(self._oldest_pending_queued)
            status: dict[str, ProxierHealth] = {}
            for fam in families:
                queued = self._oldest_pending_queued.get(fam)
                # healthy while starting up / fully synced, or while the queued update
                # is not late yet
                ok = queued is None or now - queued < self.health_timeout
                status[fam] = ProxierHealth(self._last_updated.get(fam), ok)
            last = max(self._last_updated.values(), default=None)
        return ProxyHealth(
            last_updated=last,
            current_time=now,
            healthy=all(s.healthy for s in status.values()),
            status=status,
        )

    def healthy(self) -> bool:
        """Whether the proxy is fresh (the service health check servers use this)."""
        return self.health().healthy


def format_go_time(ts: float | None) -> str:
    """Format epoch seconds as Go's ``time.Time`` JSON (RFC 3339 with nanoseconds, UTC);
    None is Go's zero time."""
    if ts is None:
        return "0001-01-01T00:00:00Z"
    when = dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if when.microsecond:
        text += f".{when.microsecond:06d}".rstrip("0")
    return text + "Z"


def _health_json(
    health: ProxyHealth, last_updated: float | None, node_eligible: bool | None
) -> str:
    body: dict[str, Any] = {
        "lastUpdated": format_go_time(last_updated),
        "currentTime": format_go_time(health.current_time),
    }
    if node_eligible is not None:
        body["nodeEligible"] = node_eligible
    body["healthy"] = health.healthy
    named = {k: v for k, v in health.status.items() if k}
    if named:
        body["status"] = {
            fam: {"lastUpdated": format_go_time(s.last_updated), "healthy": s.healthy}
            for fam, s in sorted(named.items())
        }
    return json.dumps(body, separators=(",", ":"))


# ---------------------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------------------


def parse_bind_address(address: str) -> tuple[str, int]:
    """``ip:port`` or ``[ipv6]:port`` to (ip, port); port 0 picks a free port."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise KproxyError(f"invalid bind address {address!r}: must be IP:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise KproxyError(f"invalid bind address {address!r}: {host!r} is not an IP") from None
    port = int(port_text)
    if port > 65535:
        raise KproxyError(f"invalid bind address {address!r}: port out of range")
    return host, port


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    #: set per server: what the handler serves
    routes: dict[str, Callable[[], tuple[int, str, bytes, dict[str, str]]]]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "kproxy"
    sys_version = ""

    def _serve(self, with_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        route = self.server.routes.get(path)
        if route is None:
            status, ctype, body, headers = (
                404,
                "text/plain; charset=utf-8",
                b"404 page not found\n",
                {"X-Content-Type-Options": "nosniff"},
            )
        else:
            try:
                status, ctype, body, headers = route()
            except Exception:
                log.exception("error serving %s", path)
                status, ctype, body, headers = (
                    500,
                    "text/plain; charset=utf-8",
                    b"internal error\n",
                    {},
                )
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._serve(with_body=True)

    def do_POST(self) -> None:
        self._serve(with_body=True)

    def do_HEAD(self) -> None:
        self._serve(with_body=False)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class RunningServer:
    """An HTTP server serving in a daemon thread; :meth:`close` stops it."""

    def __init__(self, name: str, server: _Server) -> None:
        self.name = name
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name=name, daemon=True
        )
        self._thread.start()
        self._closed = False

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound (useful with port 0)."""
        addr = self._server.server_address
        return str(addr[0]), int(addr[1])

    @property
    def port(self) -> int:
        return self.address[1]

    def close(self) -> None:
        """Stop serving and release the port. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


def _bind(name: str, address: str, routes: Mapping[str, Any]) -> RunningServer:
    host, port = parse_bind_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(_Server):
        address_family = family

    try:
        server = Server((host, port), _Handler)
    except OSError as exc:
        raise KproxyError(
            f"cannot start the {name} server on {address}: {exc.strerror or exc}"
        ) from exc
    server.routes = dict(routes)
    running = RunningServer(name, server)
    log.info("%s server listening on %s", name, address)
    return running


_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"
_NOSNIFF = {"X-Content-Type-Options": "nosniff"}


def start_health_server(address: str, state: ProxyHealthState) -> RunningServer:
    """Serve ``/healthz`` and ``/livez`` on ``address`` (``ip:port``).

    Raises KproxyError when the address is invalid or cannot be bound.
    """

    def healthz() -> tuple[int, str, bytes, dict[str, str]]:
        health = state.health()
        eligible = state.node_eligible
        ok = health.healthy and eligible
        # when healthy, lastUpdated is "now", as upstream keeps for compatibility
        last = state.now() if ok else health.last_updated
        code = 200 if ok else 503
        metrics.PROXY_HEALTHZ_TOTAL.labels(code=str(code)).inc()
        return code, _JSON, _health_json(health, last, eligible).encode(), _NOSNIFF

    def livez() -> tuple[int, str, bytes, dict[str, str]]:
        health = state.health()
        last = state.now() if health.healthy else health.last_updated
        code = 200 if health.healthy else 503
        metrics.PROXY_LIVEZ_TOTAL.labels(code=str(code)).inc()
        return code, _JSON, _health_json(health, last, None).encode(), _NOSNIFF

    return _bind("healthz", address, {"/healthz": healthz, "/livez": livez})


def start_metrics_server(
    address: str,
    proxy_mode: str,
    configz: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    registry: metrics.Registry = metrics.REGISTRY,
) -> RunningServer:
    """Serve ``/metrics``, ``/healthz``, ``/proxyMode`` and ``/configz`` on ``address``.

    ``configz`` is the effective KubeProxyConfiguration (see
    ``config.to_kube_proxy_configuration``), or a function returning it; ``/configz``
    answers ``{"kubeproxy.config.k8s.io": <it>}`` as upstream's configz handler does.
    """

    def metrics_route() -> tuple[int, str, bytes, dict[str, str]]:
        return 200, metrics.CONTENT_TYPE, registry.render().encode(), {}

    def healthz() -> tuple[int, str, bytes, dict[str, str]]:
        return 200, _TEXT, b"ok", _NOSNIFF

    def proxy_mode_route() -> tuple[int, str, bytes, dict[str, str]]:
        return 200, _TEXT, proxy_mode.encode(), _NOSNIFF

    def configz_route() -> tuple[int, str, bytes, dict[str, str]]:
        value = configz() if callable(configz) else (configz or {})
        body = json.dumps({"kubeproxy.config.k8s.io": dict(value)}, sort_keys=True)
        return 200, _JSON, body.encode(), _NOSNIFF

    return _bind(
        "metrics",
        address,
        {
            "/metrics": metrics_route,
            "/healthz": healthz,
            "/proxyMode": proxy_mode_route,
            "/configz": configz_route,
        },
    )


@dataclass
class Servers:
    """The servers :func:`start` opened (None when disabled by an empty address)."""

    health: RunningServer | None = None
    metrics: RunningServer | None = None

    def close(self) -> None:
        for srv in (self.health, self.metrics):
            if srv is not None:
                srv.close()


def start(
    cfg: ProxyConfig,
    state: ProxyHealthState,
    registry: metrics.Registry = metrics.REGISTRY,
) -> Servers:
    """Start the health and metrics servers on the configured addresses (an empty
    address disables that server). On failure, closes what it opened and raises
    KproxyError."""
    from kproxy.config import to_kube_proxy_configuration

    servers = Servers()
    try:
        if cfg.healthz_bind_address:
            servers.health = start_health_server(cfg.healthz_bind_address, state)
        if cfg.metrics_bind_address:
            servers.metrics = start_metrics_server(
                cfg.metrics_bind_address,
                cfg.mode,
                lambda: to_kube_proxy_configuration(cfg),
                registry,
            )
    except BaseException:
        servers.close()
        raise
    return servers
