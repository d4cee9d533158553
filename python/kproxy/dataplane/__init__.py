"""Dataplane backends: one per proxy mode, all behind `Backend`.

A backend takes the full desired state (the Rust model plus node facts) and programs
only what changed; `cleanup` removes everything it could ever have created."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kproxy import _core
from kproxy.node import NodeInfo


@dataclass
class SyncResult:
    full: bool
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    #: hc node port -> (service "ns/name", local ready endpoint count)
    health_checks: dict[int, tuple[str, int]] = field(default_factory=dict)


class Backend(Protocol):
    mode: str

    def set_node(self, node: NodeInfo) -> None:
        """Node facts changed (labels, IPs): the next sync is full."""

    def sync(self, model: _core.Model, full: bool) -> SyncResult:
        """Program the desired state; raises SyncError on failure (retried as full)."""

    def cleanup(self) -> bool:
        """Remove everything this mode creates; True when something failed."""


def local_detector(cfg: Any, node: NodeInfo) -> dict[str, Any]:
    """--detect-local-mode resolved for the Rust renderers: how pod traffic is told
    from other traffic (upstream's LocalTrafficDetector). ClusterCIDR without a
    cluster CIDR, or NodeCIDR without pod CIDRs, detects nothing, as upstream."""
    mode = cfg.detect_local_mode
    if mode == "ClusterCIDR":
        if not cfg.cluster_cidrs:
            return {"kind": "none"}
        return {"kind": "cidr", "cidrs": list(cfg.cluster_cidrs)}
    if mode == "NodeCIDR":
        if not node.pod_cidrs:
            return {"kind": "none"}
        return {"kind": "cidr", "cidrs": list(node.pod_cidrs)}
    if mode == "BridgeInterface":
        return {"kind": "interface", "name": cfg.pod_bridge_interface}
    if mode == "InterfaceNamePrefix":
        return {"kind": "prefix", "prefix": cfg.pod_interface_name_prefix}
    return {"kind": "none"}


#: proxy mode -> factory(cfg, node, families) -> Backend. Each mode's module
#: registers itself here; `create_backend` is the only place the daemon picks one.
BackendFactory = Callable[[Any, NodeInfo, tuple[int, ...]], Backend]


def _iptables(cfg: Any, node: NodeInfo, families: tuple[int, ...]) -> Backend:
    from kproxy.dataplane.iptables import IptablesBackend

    return IptablesBackend(cfg, node, families)


def _userspace(cfg: Any, node: NodeInfo, families: tuple[int, ...]) -> Backend:
    from kproxy.dataplane.userspace import UserspaceBackend

    return UserspaceBackend(cfg, node, families)


def _nftables(cfg: Any, node: NodeInfo, families: tuple[int, ...]) -> Backend:
    from kproxy.dataplane.nftables import NftablesBackend

    return NftablesBackend(cfg, node, families)


def _ipvs(cfg: Any, node: NodeInfo, families: tuple[int, ...]) -> Backend:
    from kproxy.dataplane.ipvs import IpvsBackend

    return IpvsBackend(cfg, node, families)


FACTORIES: dict[str, BackendFactory] = {
    "iptables": _iptables,
    "ipvs": _ipvs,
    "nftables": _nftables,
    "userspace": _userspace,
}


def create_backend(cfg: Any, node: NodeInfo, families: tuple[int, ...]) -> Backend:
    from kproxy.errors import KproxyError

    factory = FACTORIES.get(cfg.mode)
    if factory is None:
        raise KproxyError(f"--proxy-mode {cfg.mode}: not available in this build yet")
    return factory(cfg, node, families)
