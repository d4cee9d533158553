"""userspace mode: the Rust forwarder (`rust/core/src/forwarder/`) relays every
Service flow through a socket of this process, and an nftables table (``inet
kproxy-userspace``) captures the flows in the kernel.

Supported: ClusterIP, NodePort (any local address, loopback included), externalIPs,
LoadBalancer IPs, TCP and UDP, round robin by default and ``kproxy.io/lb-algorithm``,
ClientIP session affinity, internal/external traffic policy Local (off-cluster clients
of an ETP Local Service reach only local endpoints; pods and the node short-circuit
to all), terminating fallback and topology hints (the core's categorisation),
loadBalancerSourceRanges, REJECT for Services without endpoints (TCP RST, ICMP port
unreachable for UDP), health check node ports, per-Service connection/byte/failure
counters in /metrics.

Not supported, by design of a proxy: the endpoint never sees the client's source IP
(it sees the node's address, as with upstream's userspace mode), so masquerade
settings have no effect; SCTP is not forwarded; a connection's endpoint is fixed at
connect time (no conntrack-level failover)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from typing import Any

from kproxy import _core, conntrack, metrics
from kproxy.dataplane import SyncResult
from kproxy.errors import SyncError
from kproxy.node import NodeInfo

log = logging.getLogger("kproxy.userspace")

TABLE = ("inet", "kproxy-userspace")


def run_nft(script: str) -> None:
    nft = shutil.which("nft")
    if nft is None:
        raise SyncError("nft not found: install the nftables package")
    proc = subprocess.run(
        [nft, "-f", "-"], input=script, capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise SyncError(f"nft -f failed: {proc.stderr.strip()}")


class ForwarderMetrics(metrics.Counter):
    """/metrics families read from the forwarder's atomics at scrape time (no copy
    kept in Python): per service port connections, bytes, active connections and
    failures by kind, plus global accept errors and unknown destinations."""

    def __init__(self, forwarder: _core.Forwarder) -> None:
        super().__init__(
            "kproxy_userspace_connections_total",
            "Connections (TCP) and sessions (UDP) the userspace forwarder accepted",
            ("service", "protocol", "family"),
        )
        self.forwarder = forwarder

    def render(self) -> str:
        try:
            snap = json.loads(self.forwarder.stats_json())
        except Exception:  # stopped: nothing to report
            return ""
        ports = snap["ports"]
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, rows: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} [ALPHA] {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {metrics.format_value(v)}" for labels, v in rows)

        def lab(p: dict[str, Any], **extra: str) -> str:
            items = {"service": p["service"], "protocol": p["protocol"], "family": p["family"]}
            items.update(extra)
            inner = ",".join(f'{k}="{metrics._escape(str(v))}"' for k, v in items.items())
            return "{" + inner + "}"

        family(
            self.name,
            "counter",
            self.help,
            [(lab(p), p["connections"]) for p in ports],
        )
        family(
            "kproxy_userspace_active_connections",
            "gauge",
            "Open connections (TCP) and sessions (UDP) of the userspace forwarder",
            [(lab(p), p["active"]) for p in ports],
        )
        family(
            "kproxy_userspace_bytes_total",
            "counter",
            "Bytes the userspace forwarder moved, by direction",
            [(lab(p, direction="to_endpoint"), p["bytes_to_endpoints"]) for p in ports]
            + [(lab(p, direction="from_endpoint"), p["bytes_from_endpoints"]) for p in ports],
        )
        family(
            "kproxy_userspace_failures_total",
            "counter",
            "Userspace forwarder failures by kind (connect_failed: retried on another "
            "endpoint; no_endpoint: refused; reset: a peer reset or vanished; "
            "udp_dropped: datagram dropped)",
            [
                (lab(p, reason=reason), p[key])
                for p in ports
                for reason, key in (
                    ("connect_failed", "connect_failures"),
                    ("no_endpoint", "no_endpoint"),
                    ("reset", "resets"),
                    ("udp_dropped", "udp_dropped"),
                )
            ],
        )
        g = snap["global"]
        family(
            "kproxy_userspace_global_failures_total",
            "counter",
            "Userspace forwarder failures outside any Service (accept errors, connections "
            "to no known Service address)",
            [
                ('{reason="accept_error"}', g["accept_errors"]),
                ('{reason="unknown_destination"}', g["unknown_destination"]),
            ],
        )
        return "\n".join(lines) + "\n"


class UserspaceBackend:
    mode = "userspace"

    def __init__(
        self,
        cfg: Any,
        node: NodeInfo,
        families: tuple[int, ...] = (4,),
        forwarder_config: dict[str, Any] | None = None,
        register_metrics: bool = True,
    ) -> None:
        self.cfg = cfg
        self.node = node
        self.families = families
        fcfg: dict[str, Any] = {"families": [f"v{f}" for f in families]}
        fcfg.update(forwarder_config or {})
        self.forwarder = _core.Forwarder(json.dumps(fcfg))
        self.applied: str | None = None
        self.udp_captured: set[str] = set()
        log.info(
            "userspace mode: forwarder on TCP port %d, families %s",
            self.forwarder.tcp_port,
            families,
        )
        self.metric: ForwarderMetrics | None = None
        if register_metrics:
            self.metric = ForwarderMetrics(self.forwarder)
            try:
                metrics.REGISTRY.register(self.metric)
            except ValueError:  # a second backend in one process (tests): keep the first
                self.metric = None
        # Kernel-mode Service rules would DNAT before (or instead of) our capture.
        from kproxy.dataplane.iptables import IptablesBackend

        IptablesBackend.cleanup_static()

    def table_config(self) -> dict[str, Any]:
        cidrs = list(getattr(self.cfg, "cluster_cidrs", ()) or ())
        if getattr(self.cfg, "detect_local_mode", "ClusterCIDR") == "NodeCIDR":
            cidrs = list(self.node.pod_cidrs)
        return {
            "node_name": self.node.name,
            "node_zone": self.node.zone,
            "cluster_cidrs": cidrs,
            "node_ips": list(self.node.ips),
            "families": [f"v{f}" for f in self.families],
        }

    def set_node(self, node: NodeInfo) -> None:
        self.node = node
        self.applied = None

    def sync(self, model: _core.Model, full: bool) -> SyncResult:
        out = json.loads(self.forwarder.sync(model, json.dumps(self.table_config())))
        for w in out["warnings"]:
            log.warning("%s", w)
        result = SyncResult(full=full or self.applied is None, changed=False)
        script = out["nft"]
        if full or script != self.applied:
            try:
                run_nft(script)
            except SyncError:
                metrics.NFTABLES_SYNC_FAILURES_TOTAL.inc()
                self.applied = None
                raise
            self.applied = script
            result.changed = True
        # Flows to a UDP address sent before it was captured (no endpoints, no Service)
        # left conntrack entries without NAT that would keep bypassing the redirect.
        captured = {json.dumps(t, sort_keys=True) for t in out["udp_captured"]}
        fresh = captured - self.udp_captured  # everything on the first sync
        if fresh:
            conntrack.clear([json.loads(t) for t in sorted(fresh)])
        self.udp_captured = captured
        result.stats["service_ports"] = out["service_ports"]
        for hc in out["health_checks"]:
            result.health_checks[hc["port"]] = (hc["service"], hc["local_endpoints"])
        return result

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.forwarder.stats_json())
        return data

    def close(self) -> None:
        """Stop the forwarder (the capture rules stay, as other modes' rules do)."""
        self.forwarder.stop()

    def cleanup(self) -> bool:
        return self.cleanup_static()

    @staticmethod
    def cleanup_static() -> bool:
        """Remove the capture table; True when something failed."""
        nft = shutil.which("nft")
        if nft is None:
            return False
        probe = subprocess.run(
            [nft, "list", "table", *TABLE],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if probe.returncode != 0:
            return False
        try:
            run_nft(_core.userspace_cleanup_script())
        except SyncError as e:
            log.error("cleanup: %s", e)
            return True
        return False
