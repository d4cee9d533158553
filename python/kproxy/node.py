"""This node's identity: name, IPs, pod CIDRs and topology zone."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kproxy.node")

ZONE_LABEL = "topology.kubernetes.io/zone"


@dataclass(frozen=True)
class NodeInfo:
    name: str
    ips: tuple[str, ...] = ()
    pod_cidrs: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict, compare=True, hash=False)
    deleting: bool = False

    @property
    def zone(self) -> str | None:
        return self.labels.get(ZONE_LABEL) or None

    def ips_of(self, version: int) -> list[str]:
        return [ip for ip in self.ips if ipaddress.ip_address(ip).version == version]


def from_node_object(name: str, obj: dict[str, Any] | None, fallback_ips: list[str]) -> NodeInfo:
    """Node object -> NodeInfo (InternalIP first, then ExternalIP, as upstream)."""
    if obj is None:
        return NodeInfo(name=name, ips=tuple(fallback_ips))
    status = obj.get("status") or {}
    spec = obj.get("spec") or {}
    meta = obj.get("metadata") or {}
    ips: list[str] = []
    for kind in ("InternalIP", "ExternalIP"):
        for a in status.get("addresses") or []:
            if a.get("type") == kind:
                try:
                    ip = str(ipaddress.ip_address(str(a.get("address"))))
                except ValueError:
                    log.error("Node %s: status.addresses: invalid IP %r ignored", name, a)
                    continue
                if ip not in ips:
                    ips.append(ip)
    cidrs = list(spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []))
    taints = spec.get("taints") or []
    deleting = bool(meta.get("deletionTimestamp")) or any(
        t.get("key") == "ToBeDeletedByClusterAutoscaler" for t in taints
    )
    return NodeInfo(
        name=name,
        ips=tuple(ips or fallback_ips),
        pod_cidrs=tuple(str(c) for c in cidrs),
        labels={str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
        deleting=deleting,
    )


def local_addresses() -> list[tuple[str, int, str]]:
    """(ip, prefixlen, interface) of every address in this network namespace."""
    from pyroute2 import IPRoute

    out: list[tuple[str, int, str]] = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for a in ipr.get_addr():
            ip = a.get_attr("IFA_ADDRESS")
            if ip is None:
                continue
            out.append((str(ip), int(a["prefixlen"]), str(names.get(a["index"], ""))))
    return out


def local_ips() -> list[str]:
    """Non-loopback, non-link-local addresses of this namespace (the node IP fallback)."""
    out = []
    for ip, _, _ in local_addresses():
        addr = ipaddress.ip_address(ip)
        if addr.is_loopback or addr.is_link_local:
            continue
        out.append(ip)
    return out


def nodeport_ips(spec: tuple[str, ...], node: NodeInfo) -> list[str] | None:
    """Resolve --nodeport-addresses: None = all local addresses; 'primary' = the node
    IPs; CIDRs = the local addresses inside them."""
    if not spec:
        return None
    out: list[str] = []
    nets = []
    for s in spec:
        if s == "primary":
            out.extend(node.ips)
        else:
            nets.append(ipaddress.ip_network(s, strict=False))
    if nets:
        for ip, _, _ in local_addresses():
            addr = ipaddress.ip_address(ip)
            if any(addr.version == n.version and addr in n for n in nets):
                out.append(ip)
    return sorted(set(out))
