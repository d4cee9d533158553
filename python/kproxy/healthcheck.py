"""Health check node ports for Services with ``externalTrafficPolicy: Local``.

Upstream ``pkg/proxy/healthcheck/service_health.go``: for each such Service, kube-proxy
listens on its ``spec.healthCheckNodePort`` and answers 200 when this node has local
endpoints for it and the proxy is healthy, else 503, so that cloud load balancers only
send traffic to nodes that can serve it locally.

A port that cannot be bound is logged and reported, never fatal; the next
:meth:`ServiceHealthServer.sync_services` tries it again (upstream does the same).
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

__all__ = ["ProxyHealthChecker", "ServiceHealthServer"]

log = logging.getLogger(__name__)


class ProxyHealthChecker(Protocol):
    """What the server needs from the proxy's health (``server.ProxyHealthState``)."""

    def healthy(self) -> bool: ...


def _response_body(namespace: str, name: str, count: int, healthy: bool) -> bytes:
    # byte-for-byte upstream's dedented template (tab indentation, no trailing newline)
    text = (
        "{\n"
        '\t"service": {\n'
        f'\t\t"namespace": {json.dumps(namespace)},\n'
        f'\t\t"name": {json.dumps(name)}\n'
        "\t},\n"
        f'\t"localEndpoints": {count},\n'
        f'\t"serviceProxyHealthy": {"true" if healthy else "false"}\n'
        "}"
    )
    return text.encode()


class _HCServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: ServiceHealthServer
    service: str


class _HCHandler(BaseHTTPRequestHandler):
    server: _HCServer
    protocol_version = "HTTP/1.1"
    server_version = "kproxy"
    sys_version = ""

    def _serve(self, with_body: bool) -> None:
        found, count, healthy = self.server.owner._answer(self.server.service)
        namespace, _, name = self.server.service.partition("/")
        if not found:
            body = b""
            status = 503
        else:
            body = _response_body(namespace, name, count, healthy)
            status = 200 if count > 0 and healthy else 503
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Load-Balancing-Endpoint-Weight", str(count))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._serve(True)

    def do_HEAD(self) -> None:
        self._serve(False)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("healthcheck %s: %s", self.server.service, format % args)


class _Instance:
    """The listeners (one per node IP) of one Service's health check port."""

    def __init__(self, service: str, port: int) -> None:
        self.service = service
        self.port = port
        self.endpoints = 0
        self.servers: list[tuple[_HCServer, threading.Thread]] = []

    def close(self) -> None:
        for server, thread in self.servers:
            server.shutdown()
            server.server_close()
            thread.join(5.0)
        self.servers.clear()


class ServiceHealthServer:
    """Opens and closes one HTTP listener per health check node port.

    ``node_port_addresses`` are the IPs to listen on (one listener per IP); empty means
    all addresses (dual-stack when the host has IPv6, else 0.0.0.0).
    """

    def __init__(
        self, node_port_addresses: Sequence[str], health_state: ProxyHealthChecker
    ) -> None:
        self._ips: list[str] = list(node_port_addresses) or [""]
        self._health = health_state
        self._lock = threading.Lock()
        self._by_port: dict[int, _Instance] = {}

    # -- called by the proxier after each sync --------------------------------------------

    def sync_services(self, services: Mapping[int, str]) -> dict[int, str]:
        """Make ``{health check port: "namespace/name"}`` the set of open listeners.

        Listeners no longer wanted (or now for another Service) are closed, new ones
        opened, unchanged ones left alone. Returns ``{port: error}`` for the ports that
        could not be opened (logged; retried by the next call).
        """
        failures: dict[int, str] = {}
        with self._lock:
            for port, inst in list(self._by_port.items()):
                if services.get(port) != inst.service:
                    log.info("closing healthcheck for %s on port %d", inst.service, port)
                    inst.close()
                    del self._by_port[port]
            for port, service in services.items():
                if port in self._by_port:
                    continue
                inst = _Instance(service, port)
                error = self._listen_all(inst)
                if error is not None:
                    log.error(
                        "failed to start healthcheck for %s on port %d: %s", service, port, error
                    )
                    failures[port] = error
                    continue
                log.info("opened healthcheck for %s on port %d", service, port)
                self._by_port[port] = inst
        return failures

    def sync_endpoints(self, endpoints: Mapping[str, int]) -> None:
        """Set the number of local endpoints per ``"namespace/name"``; Services not in
        the mapping have none."""
        with self._lock:
            for inst in self._by_port.values():
                inst.endpoints = endpoints.get(inst.service, 0)

    def ports(self) -> dict[int, str]:
        """The open health check ports: ``{port: "namespace/name"}``."""
        with self._lock:
            return {port: inst.service for port, inst in self._by_port.items()}

    def close(self) -> None:
        """Close every listener."""
        with self._lock:
            for inst in self._by_port.values():
                inst.close()
            self._by_port.clear()

    # -- internals ------------------------------------------------------------------------

    def _answer(self, service: str) -> tuple[bool, int, bool]:
        with self._lock:
            inst = next((i for i in self._by_port.values() if i.service == service), None)
            count = inst.endpoints if inst is not None else 0
        return inst is not None, count, self._health.healthy()

    def _listen_all(self, inst: _Instance) -> str | None:
        for ip in self._ips:
            try:
                server = self._make_server(ip, inst.port)
            except OSError as exc:
                inst.close()  # release what was opened, so a retry can take the port
                where = f"[{ip}]" if ":" in ip else ip or "*"
                return f"{where}:{inst.port}: {exc.strerror or exc}"
            server.owner = self
            server.service = inst.service
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.2},
                name=f"healthcheck-{inst.port}",
                daemon=True,
            )
            thread.start()
            inst.servers.append((server, thread))
        return None

    @staticmethod
    def _make_server(ip: str, port: int) -> _HCServer:
        if ip:
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET

            class Server(_HCServer):
                address_family = family

            return Server((ip, port), _HCHandler)
        # all addresses: "::" is dual-stack on Linux (bindv6only=0); fall back to IPv4
        if socket.has_ipv6:

            class Server6(_HCServer):
                address_family = socket.AF_INET6

                def server_bind(self) -> None:
                    self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                    super().server_bind()

            try:
                return Server6(("::", port), _HCHandler)
            except OSError as exc:
                if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):  # no IPv6 here
                    raise
        return _HCServer(("0.0.0.0", port), _HCHandler)
