"""The public routing API: build a table of Services from manifests or Kubernetes
objects and ask where a flow goes, without running the daemon.

Lookups follow the iptables mode's rules (ClusterIP, NodePort on the node IPs,
externalIPs, load balancer IPs, traffic policies, source ranges, terminating fallback,
topology hints and masquerading); the decision tree lives in the Rust core
(``rust/core/src/lookup.rs``). See ``docs/api.md``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kproxy import _core
from kproxy.errors import ConfigError, KproxyError, NoRouteError, ObjectError

log = logging.getLogger("kproxy.table")

Origin = Literal["pod", "node", "external"]
Verdict = Literal["forward", "reject", "drop", "not-handled"]
Algorithm = Literal["random", "round-robin", "least-conn", "source-hash", "maglev"]
#: A flow as ``lookup_many`` takes it: (protocol, dst_ip, dst_port, src_ip, origin).
FlowTuple = tuple[str, str, int, str, Origin]

_KINDS = ("Service", "EndpointSlice", "Node")
#: kubernetes client model class name -> kind (list responses leave ``kind`` unset).
_MODEL_KINDS = {"V1Service": "Service", "V1EndpointSlice": "EndpointSlice", "V1Node": "Node"}
_ZONE_LABEL = "topology.kubernetes.io/zone"


@dataclass(frozen=True)
class Route:
    """Where a flow goes.

    ``verdict`` is "forward" (DNAT to one of ``endpoints``), "reject" (the Service has
    no endpoints), "drop" (no local endpoints under a Local traffic policy, or a source
    outside loadBalancerSourceRanges) or "not-handled" (no Service matches; kproxy
    leaves the packet alone). ``masquerade`` says whether the source is rewritten to the
    node's IP, except for hairpin traffic, which only the chosen endpoint reveals: use
    :meth:`masquerade_for` once an endpoint is chosen.
    """

    verdict: Verdict
    endpoints: list[str]
    masquerade: bool
    reason: str
    #: The service port that matched, "namespace/name:port", or None.
    service: str | None = None
    #: The flow's source IP (for the hairpin check).
    source: str = field(default="", repr=False)

    def masquerade_for(self, endpoint: str) -> bool:
        """Whether the flow is masqueraded when it goes to ``endpoint`` ("ip:port"):
        ``masquerade``, or hairpin (the endpoint is the client itself)."""
        if self.masquerade:
            return True
        host = endpoint.rsplit(":", 1)[0].strip("[]")
        try:
            return bool(self.source) and ipaddress.ip_address(host) == ipaddress.ip_address(
                self.source
            )
        except ValueError:
            return False


def _route(t: tuple[str, list[str], bool, str, str | None], source: str) -> Route:
    verdict, endpoints, masquerade, reason, service = t
    return Route(verdict, endpoints, masquerade, reason, service, source)  # type: ignore[arg-type]


def _to_dict(obj: Any) -> dict[str, Any]:
    """A Kubernetes object as API JSON: dicts pass, client models are serialised."""
    if isinstance(obj, Mapping):
        return dict(obj)
    try:
        from kubernetes.client import ApiClient
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ObjectError(
            f"{type(obj).__name__} is not a dict and the kubernetes package is not installed"
        ) from e
    data = ApiClient().sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
    if not isinstance(data, dict):
        raise ObjectError(f"{type(obj).__name__} is not a Kubernetes object")
    if not data.get("kind") and type(obj).__name__ in _MODEL_KINDS:
        data["kind"] = _MODEL_KINDS[type(obj).__name__]
    return data


def _flatten(obj: dict[str, Any]) -> Iterable[dict[str, Any]]:
    if str(obj.get("kind", "")).endswith("List") and isinstance(obj.get("items"), list):
        for item in obj["items"]:
            yield from _flatten(_to_dict(item))
    else:
        yield obj


def _key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    name = str(meta.get("name") or "")
    if obj.get("kind") == "Node":
        return name
    return f"{meta.get('namespace') or 'default'}/{name}"


def _node_facts(node: dict[str, Any] | None) -> tuple[list[str], str | None]:
    """(InternalIPs then ExternalIPs, zone label) of a Node object, as the daemon reads it."""
    if node is None:
        return [], None
    ips: list[str] = []
    addresses = (node.get("status") or {}).get("addresses") or []
    for kind in ("InternalIP", "ExternalIP"):
        for a in addresses:
            if a.get("type") == kind:
                try:
                    ip = str(ipaddress.ip_address(str(a.get("address"))))
                except ValueError:
                    continue
                if ip not in ips:
                    ips.append(ip)
    labels = (node.get("metadata") or {}).get("labels") or {}
    zone = labels.get(_ZONE_LABEL)
    return ips, str(zone) if zone else None


class ServiceTable:
    """Services, EndpointSlices and this node's facts; answers where flows go.

    Build it with :meth:`from_manifests` or :meth:`from_objects`. Invalid objects are
    skipped as the daemon skips them (logged, listed in :attr:`errors`); a
    ``kproxy.io/lb-algorithm`` value that is unknown is logged and the default used
    (listed in :attr:`warnings`).
    """

    def __init__(
        self,
        node_name: str,
        *,
        cluster_cidrs: Sequence[str] = (),
        node_ips: Sequence[str] | None = None,
        zone: str | None = None,
        masquerade_all: bool = False,
        default_algorithm: Algorithm = "random",
    ) -> None:
        if isinstance(cluster_cidrs, str):
            cluster_cidrs = (cluster_cidrs,)
        self.node_name = node_name
        self.cluster_cidrs: tuple[str, ...] = tuple(cluster_cidrs)
        self.node_ips: tuple[str, ...] = tuple(node_ips or ())
        self.zone = zone
        self.masquerade_all = masquerade_all
        self.default_algorithm = default_algorithm
        self.warnings: list[str] = []
        self.errors: list[str] = []
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._core = _core.RouteTable(
            node_name,
            zone=zone,
            cluster_cidrs=list(self.cluster_cidrs),
            node_ips=list(self.node_ips),
            masquerade_all=masquerade_all,
            default_algorithm=default_algorithm,
        )

    @classmethod
    def from_manifests(
        cls,
        *paths: str | os.PathLike[str],
        node_name: str,
        cluster_cidrs: Sequence[str] = (),
        node_ips: Sequence[str] | None = None,
        **options: Any,
    ) -> ServiceTable:
        """A table from YAML/JSON files or directories (as ``--manifests``)."""
        from kproxy.sources.manifests import load_objects

        objects = load_objects(paths)
        return cls.from_objects(
            objects.values(),
            node_name=node_name,
            cluster_cidrs=cluster_cidrs,
            node_ips=node_ips,
            **options,
        )

    @classmethod
    def from_objects(
        cls,
        objects: Iterable[Any],
        *,
        node_name: str,
        cluster_cidrs: Sequence[str] = (),
        node_ips: Sequence[str] | None = None,
        **options: Any,
    ) -> ServiceTable:
        """A table from Services, EndpointSlices and Nodes: API JSON dicts or
        ``kubernetes`` client models (``V1Service``, ``V1EndpointSlice``, ``V1Node``
        and their lists). ``node_ips`` (None) and the zone default to this node's Node
        object, when there is one."""
        flat: list[dict[str, Any]] = []
        for obj in objects:
            flat.extend(_flatten(_to_dict(obj)))
        node = next((o for o in flat if o.get("kind") == "Node" and _key(o) == node_name), None)
        ips, zone = _node_facts(node)
        options.setdefault("zone", zone)
        table = cls(
            node_name,
            cluster_cidrs=cluster_cidrs,
            node_ips=ips if node_ips is None else node_ips,
            **options,
        )
        for obj in flat:
            table.apply(obj)
        return table

    def apply(self, obj: Any) -> None:
        """Add or replace one Service or EndpointSlice (dict or client model); other
        kinds are ignored. An invalid object is logged, listed in ``errors`` and
        leaves the previous state."""
        data = _to_dict(obj)
        kind = str(data.get("kind") or "")
        if kind not in _KINDS or kind == "Node":
            return
        self._set(kind, _key(data), data)

    def delete(self, kind: Literal["Service", "EndpointSlice"], key: str) -> None:
        """Remove a Service or EndpointSlice by "namespace/name"."""
        self._set(kind, key, None)

    def _set(self, kind: str, key: str, data: dict[str, Any] | None) -> None:
        text = None if data is None else json.dumps(data)
        setter = self._core.set_service if kind == "Service" else self._core.set_endpoint_slice
        try:
            warnings = setter(key, text)
        except ObjectError as e:
            log.error("%s %s skipped: %s", kind, key, e)
            self.errors.append(str(e))
            return
        for w in warnings:
            log.warning("%s", w)
        self.warnings.extend(warnings)
        if data is None:
            self._objects.pop((kind, key), None)
        else:
            self._objects[(kind, key)] = data

    def __len__(self) -> int:
        """The number of Services the table routes."""
        return len(self._core)

    def objects(self) -> list[dict[str, Any]]:
        """The Services and EndpointSlices in the table, as API JSON."""
        return list(self._objects.values())

    def algorithms(self) -> dict[str, str]:
        """{"namespace/name:port": algorithm} for every service port."""
        return self._core.algorithms()

    def lookup(
        self, protocol: str, dst_ip: str, dst_port: int, src_ip: str, origin: Origin
    ) -> Route:
        """Where a new flow goes. ``protocol`` is TCP, UDP or SCTP (any case); raises
        ConfigError for a malformed flow (bad IP or port, families mixed, unknown
        origin)."""
        return _route(self._core.lookup(protocol, dst_ip, dst_port, src_ip, origin), src_ip)

    def lookup_many(self, flows: Sequence[FlowTuple]) -> list[Route]:
        """:meth:`lookup` for many flows in one call (the Rust side runs without the GIL)."""
        out = self._core.lookup_many(list(flows))
        return [_route(t, f[3]) for t, f in zip(out, flows, strict=True)]

    def pick(
        self,
        protocol: str,
        dst_ip: str,
        dst_port: int,
        src_ip: str,
        origin: Origin,
        now: float | None = None,
    ) -> str:
        """One endpoint ("ip:port") for a new flow, chosen with the Service's algorithm
        and session affinity (``now``: seconds on any monotonic clock, default the
        process's). Raises NoRouteError (with the route's reason) unless the verdict is
        forward."""
        t, endpoint = self._core.pick(protocol, dst_ip, dst_port, src_ip, origin, now)
        if endpoint is None:
            route = _route(t, src_ip)
            raise NoRouteError(f"{route.verdict}: {route.reason}")
        return endpoint


def _render_config(table: ServiceTable, cfg: Any, family: int) -> dict[str, Any]:
    """The iptables renderer's config, as the daemon's iptables backend builds it
    (without touching the kernel: no sysctl or address lookups)."""
    cidrs = list(cfg.cluster_cidrs) or list(table.cluster_cidrs)
    mode = cfg.detect_local_mode
    if mode == "ClusterCIDR":
        detector: dict[str, Any] = {"kind": "cidr", "cidrs": cidrs} if cidrs else {"kind": "none"}
    elif mode == "BridgeInterface":
        detector = {"kind": "interface", "name": cfg.pod_bridge_interface}
    elif mode == "InterfaceNamePrefix":
        detector = {"kind": "prefix", "prefix": cfg.pod_interface_name_prefix}
    else:
        detector = {"kind": "none"}
    nodeports = [a for a in cfg.nodeport_addresses if a != "primary"]
    return {
        "family": "v4" if family == 4 else "v6",
        "node_name": table.node_name,
        "node_zone": table.zone,
        "node_ips": list(table.node_ips),
        "masquerade_bit": cfg.iptables_masquerade_bit,
        "masquerade_all": cfg.masquerade_all or table.masquerade_all,
        "local_detector": detector,
        "nodeport_addresses": (
            list(table.node_ips) if "primary" in cfg.nodeport_addresses else None
        )
        if not nodeports
        else [
            ip
            for ip in table.node_ips
            if any(
                ipaddress.ip_address(ip) in ipaddress.ip_network(c, strict=False) for c in nodeports
            )
        ],
        "localhost_nodeports": cfg.iptables_localhost_nodeports,
        "conntrack_tcp_liberal": False,
        "random_fully": True,
    }


def render(mode: str, table: ServiceTable, config: Any = None) -> str:
    """The rules ``mode`` would program for ``table``, as text, without touching the
    kernel. ``config`` is a :class:`kproxy.config.ProxyConfig` (default: upstream's
    defaults with the table's cluster CIDRs). For "iptables" this is
    ``iptables-restore`` input (IPv4; the IPv6 part follows a ``# IPv6`` comment when
    the table has IPv6 Services). Other modes raise KproxyError until they exist."""
    from kproxy.config import ProxyConfig

    if mode in ("nftables", "ipvs", "userspace"):
        raise KproxyError(f"mode {mode!r}: rendering is not available yet")
    if mode != "iptables":
        raise ConfigError(f"unknown mode {mode!r} (valid: iptables, nftables, ipvs, userspace)")
    cfg = config if config is not None else ProxyConfig()
    model = _core.Model()
    families = {4}
    for (kind, key), obj in table._objects.items():
        if kind == "Service":
            model.set_service(key, json.dumps(obj))
            spec = obj.get("spec") or {}
            for ip in spec.get("clusterIPs") or [spec.get("clusterIP")]:
                try:
                    families.add(ipaddress.ip_address(str(ip)).version)
                except ValueError:
                    pass
        else:
            model.set_endpoint_slice(key, json.dumps(obj))
    parts = []
    for family in sorted(families):
        renderer = _core.IptablesRenderer(json.dumps(_render_config(table, cfg, family)))
        text, _meta = renderer.render(model, full=True)
        parts.append(text if family == 4 else f"# IPv6 (ip6tables-restore)\n{text}")
    return "".join(parts)
