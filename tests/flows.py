"""The packet-flow table: what must happen to a connection in the example cluster.

In the spirit of upstream kube-proxy's ``packetFlowTest``: each :class:`Flow` names a
source (``pod:<name>``, ``node`` or ``external``), a protocol and a destination, and the
expected outcome: the set of pods that may answer, or ``REJECT`` / ``DROP``, and whether
the answering pod sees a masqueraded source. The table is mode-agnostic: every proxy mode
(iptables with either backend, nftables, ipvs, userspace) must pass it. See
``examples/`` for the Services, and :mod:`kproxy.sandbox` for the addresses.

Masquerade expectations follow upstream iptables mode with ``--cluster-cidr`` set:
pod -> ClusterIP is not masqueraded; node -> anything is (the node's own source address
172.18.0.2 is outside the cluster CIDR, so the pod sees the bridge IP); off-cluster ->
ClusterIP is; a pod reaching itself (hairpin) is; external traffic with
externalTrafficPolicy Cluster is; with Local it is not. Pods and the node reaching an
ETP-Local NodePort are treated as internal traffic (all endpoints, short-circuit).

A mode with other semantics (userspace proxies every flow from the node) may override
single rows with :func:`override`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kproxy.sandbox import EXTERNAL_IP, NODE_IP, REFUSED, TIMEOUT, ConnectResult, Sandbox

REJECT = "REJECT"
DROP = "DROP"

# (mode, iptables backend) pairs each packet-flow run is made for; new modes add rows
# here, e.g. ("nftables", None).
PROXY_CONFIGS: list[tuple[str, str | None]] = [
    ("iptables", "legacy"),
    ("iptables", "nft"),
    ("nftables", None),
    ("userspace", None),
]
# ipvs needs a kernel with IPVS, which the host's lacks: its row exists only inside the
# qemu guest that tests/test_ipvs_guest.py starts (KPROXY_IN_GUEST=1).
if os.environ.get("KPROXY_IN_GUEST"):
    PROXY_CONFIGS.append(("ipvs", None))
MODES = sorted({mode for mode, _ in PROXY_CONFIGS})


@dataclass(frozen=True)
class Flow:
    name: str
    source: str  # "pod:<name>", "node" or "external"
    protocol: str  # "tcp" or "udp"
    dst_ip: str
    dst_port: int
    expect: frozenset[str] | str  # pods that may answer, or REJECT / DROP
    masquerade: bool | None = None  # None when nothing answers
    affinity: bool = False  # every answer must come from one pod
    sport: int = 0  # fixed client source port (0: ephemeral)

    @property
    def pods(self) -> frozenset[str]:
        return self.expect if isinstance(self.expect, frozenset) else frozenset()


def pods(*names: str) -> frozenset[str]:
    return frozenset(names)


WEB = pods("web-1", "web-2", "web-3")
WEB12 = pods("web-1", "web-2")
ETP_LOCAL_ALL = pods("etp-local-1", "etp-remote-1")
DNS = pods("dns-1", "dns-2")

POD = "pod:client"
NODE = "node"
EXT = "external"

FLOWS: list[Flow] = [
    # --- plain ClusterIP (10.96.0.10:80 -> 8080), endpoints local and remote
    Flow("clusterip-from-pod", POD, "tcp", "10.96.0.10", 80, WEB, False),
    Flow("clusterip-from-node", NODE, "tcp", "10.96.0.10", 80, WEB, True),
    Flow("clusterip-from-external", EXT, "tcp", "10.96.0.10", 80, WEB, True),
    # --- NodePort, externalTrafficPolicy Cluster
    Flow("nodeport-etp-cluster-from-external", EXT, "tcp", NODE_IP, 30080, WEB12, True),
    Flow("nodeport-etp-cluster-from-node", NODE, "tcp", NODE_IP, 30080, WEB12, True),
    Flow("nodeport-etp-cluster-from-pod", POD, "tcp", NODE_IP, 30080, WEB12, True),
    Flow("nodeport-svc-clusterip-from-pod", POD, "tcp", "10.96.0.11", 80, WEB12, False),
    # --- LoadBalancer, externalTrafficPolicy Local, one local + one remote endpoint
    Flow(
        "nodeport-etp-local-from-external",
        EXT,
        "tcp",
        NODE_IP,
        30081,
        pods("etp-local-1"),
        False,
    ),
    Flow(
        "lb-ip-etp-local-from-external",
        EXT,
        "tcp",
        "192.168.100.12",
        80,
        pods("etp-local-1"),
        False,
    ),
    Flow("etp-local-clusterip-from-pod", POD, "tcp", "10.96.0.12", 80, ETP_LOCAL_ALL, False),
    Flow("nodeport-etp-local-from-pod", POD, "tcp", NODE_IP, 30081, ETP_LOCAL_ALL, False),
    Flow("nodeport-etp-local-from-node", NODE, "tcp", NODE_IP, 30081, ETP_LOCAL_ALL, True),
    # --- externalTrafficPolicy Local with only a remote endpoint
    Flow("nodeport-etp-local-no-local-from-external", EXT, "tcp", NODE_IP, 30082, DROP),
    Flow(
        "etp-local-no-local-clusterip-from-pod",
        POD,
        "tcp",
        "10.96.0.13",
        80,
        pods("remote-only-1"),
        False,
    ),
    Flow(
        "nodeport-etp-local-no-local-from-pod",
        POD,
        "tcp",
        NODE_IP,
        30082,
        pods("remote-only-1"),
        False,
    ),
    Flow(
        "nodeport-etp-local-no-local-from-node",
        NODE,
        "tcp",
        NODE_IP,
        30082,
        pods("remote-only-1"),
        True,
    ),
    # --- internalTrafficPolicy Local
    Flow("itp-local-from-pod", POD, "tcp", "10.96.0.14", 80, pods("itp-local-1"), False),
    Flow("itp-local-from-node", NODE, "tcp", "10.96.0.14", 80, pods("itp-local-1"), True),
    # --- externalIPs
    Flow("external-ip-from-external", EXT, "tcp", "192.168.50.10", 80, WEB12, True),
    Flow("external-ip-from-pod", POD, "tcp", "192.168.50.10", 80, WEB12, True),
    Flow("external-ip-from-node", NODE, "tcp", "192.168.50.10", 80, WEB12, True),
    # --- loadBalancerSourceRanges
    Flow("lb-source-range-allowed", EXT, "tcp", "192.168.100.16", 80, WEB12, True),
    Flow("lb-source-range-blocked", EXT, "tcp", "192.168.100.17", 80, DROP),
    Flow(
        "lb-source-range-blocked-nodeport-still-open",
        EXT,
        "tcp",
        NODE_IP,
        30084,
        pods("web-1"),
        True,
    ),
    Flow("lb-blocked-clusterip-from-pod", POD, "tcp", "10.96.0.17", 80, pods("web-1"), False),
    # --- sessionAffinity ClientIP
    Flow(
        "affinity-from-pod",
        POD,
        "tcp",
        "10.96.0.18",
        80,
        pods("aff-1", "aff-2"),
        False,
        affinity=True,
    ),
    Flow(
        "affinity-from-node",
        NODE,
        "tcp",
        "10.96.0.18",
        80,
        pods("aff-1", "aff-2"),
        True,
        affinity=True,
    ),
    # --- no endpoints
    Flow("no-endpoints-from-pod", POD, "tcp", "10.96.0.19", 80, REJECT),
    Flow("no-endpoints-from-node", NODE, "tcp", "10.96.0.19", 80, REJECT),
    Flow("no-endpoints-from-external", EXT, "tcp", "10.96.0.19", 80, REJECT),
    Flow("udp-no-endpoints-from-pod", POD, "udp", "10.96.0.54", 5353, REJECT),
    Flow("udp-no-endpoints-nodeport-from-external", EXT, "udp", NODE_IP, 30053, REJECT),
    # --- terminating endpoints: fall back to the serving ones, never the others
    Flow("terminating-fallback", POD, "tcp", "10.96.0.20", 80, pods("term-1", "term-2"), False),
    # --- topology hints: only endpoints hinted for zone-a
    Flow(
        "topology-hints-zone-a",
        POD,
        "tcp",
        "10.96.0.21",
        80,
        pods("topo-a-1", "topo-a-2"),
        False,
    ),
    # --- hairpin: a pod reaching itself through its Service must be masqueraded
    Flow("hairpin", "pod:hair-1", "tcp", "10.96.0.22", 80, pods("hair-1"), True),
    # --- UDP and TCP on the same port number (kube-dns shape)
    Flow("udp-clusterip-from-pod", POD, "udp", "10.96.0.53", 53, DNS, False),
    Flow("udp-clusterip-from-node", NODE, "udp", "10.96.0.53", 53, DNS, True),
    Flow("tcp-same-port-as-udp-from-pod", POD, "tcp", "10.96.0.53", 53, DNS, False),
]


def override(flows: Iterable[Flow], **changes: Mapping[str, Any]) -> list[Flow]:
    """The table with some rows changed, e.g. ``override(FLOWS, hairpin={"masquerade": x})``."""
    out = []
    for f in flows:
        out.append(dataclasses.replace(f, **changes[f.name]) if f.name in changes else f)
    return out


def for_mode(mode: str | None, flow: Flow) -> Flow:
    """``flow`` with the changes ``mode`` documents in MODE_OVERRIDES."""
    changes = MODE_OVERRIDES.get(mode or "", {}).get(flow.name)
    return dataclasses.replace(flow, **changes) if changes else flow


# ------------------------------------------------------------------------ checking

# Attempts per flow: with 2 equally likely endpoints, 20 attempts all landing on one
# of them happens with probability 2**-19, so "more than one pod seen" cannot flake.
SPREAD_ATTEMPTS = 20
SINGLE_ATTEMPTS = 3
DROP_TIMEOUT = 1.0


def describe(results: Sequence[ConnectResult]) -> str:
    return "; ".join(
        f"{r.verdict} peer={r.peer} local={r.local}" + (f" ({r.detail})" if r.detail else "")
        for r in results
    )


def check_flow(sb: Sandbox, flow: Flow, timeout: float = 1.0) -> list[ConnectResult]:
    """Send the flow (several times when it may reach several pods) and check it."""
    flow = for_mode(sb.kproxy.mode if sb.kproxy is not None else None, flow)
    if flow.expect == DROP:
        res = sb.connect_many(
            flow.source, flow.protocol, flow.dst_ip, flow.dst_port,
            count=1, timeout=DROP_TIMEOUT, sport=flow.sport,
        )  # fmt: skip
        if any(r.outcome != TIMEOUT for r in res):
            raise AssertionError(f"{flow.name}: expected DROP, got {describe(res)}")
        return res
    if flow.expect == REJECT:
        res = sb.connect_many(
            flow.source, flow.protocol, flow.dst_ip, flow.dst_port,
            count=2, timeout=timeout, sport=flow.sport,
        )  # fmt: skip
        if any(r.outcome != REFUSED for r in res):
            raise AssertionError(f"{flow.name}: expected REJECT, got {describe(res)}")
        return res
    allowed = flow.pods
    count = SPREAD_ATTEMPTS if len(allowed) > 1 else SINGLE_ATTEMPTS
    res = sb.connect_many(
        flow.source, flow.protocol, flow.dst_ip, flow.dst_port,
        count=count, timeout=timeout, sport=flow.sport,
    )  # fmt: skip
    problems = []
    if any(not r.answered or r.pod not in allowed for r in res):
        problems.append(f"expected answers from {sorted(allowed)}")
    if flow.masquerade is not None and any(r.masqueraded != flow.masquerade for r in res):
        problems.append(f"expected masquerade={flow.masquerade}")
    seen = {r.pod for r in res}
    if flow.affinity and len(seen) != 1:
        problems.append(f"expected session affinity (one pod), saw {sorted(map(str, seen))}")
    if not flow.affinity and len(allowed) > 1 and len(seen) < 2:
        problems.append(f"expected several of {sorted(allowed)} over {count} attempts")
    if problems:
        raise AssertionError(f"{flow.name}: {', '.join(problems)}; got {describe(res)}")
    return res


# ------------------------------------------------------------------------ runtime flows


def _slice(
    service: str, name: str, ip: str, pod: str, port: int, port_name: str, proto: str
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "demo",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": port_name, "protocol": proto, "port": port}],
        "endpoints": [
            {
                "addresses": [ip],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": "node1",
                "targetRef": {"kind": "Pod", "namespace": "demo", "name": pod},
            }
        ],
    }


@dataclass(frozen=True)
class RuntimeChange:
    """A manifest written while clients keep sending from fixed source ports.

    Each probe is sent before the change (it must not be answered), then resent from the
    same source port until it is answered (bounded): a stale conntrack entry left from
    before the change must not blackhole it.
    """

    name: str
    manifest: str  # file name written into the sandbox's watched manifest copy
    objects: Sequence[Mapping[str, Any]]
    probes: Sequence[Flow] = field(default_factory=tuple)


RUNTIME_CHANGES: list[RuntimeChange] = [
    RuntimeChange(
        # udp-late (10.96.0.54:5353 -> 53, nodePort 30053) had no endpoints (REJECT).
        name="udp-service-gains-first-endpoint",
        manifest="zz-udp-late-slice.yaml",
        objects=[_slice("udp-late", "udp-late-x1", "10.244.0.81", "dns-1", 53, "dns", "UDP")],
        probes=(
            Flow(
                "udp-late-clusterip",
                POD,
                "udp",
                "10.96.0.54",
                5353,
                pods("dns-1"),
                False,
                sport=40054,
            ),
            Flow("udp-late-nodeport", EXT, "udp", NODE_IP, 30053, pods("dns-1"), True, sport=40055),
        ),
    ),
    RuntimeChange(
        # A Service that did not exist: earlier datagrams to its ClusterIP were routed off
        # the node and to its NodePort hit a closed local port, both leaving conntrack
        # entries without DNAT behind.
        name="udp-service-created",
        manifest="zz-udp-new.yaml",
        objects=[
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "udp-new", "namespace": "demo"},
                "spec": {
                    "type": "NodePort",
                    "clusterIP": "10.96.0.55",
                    "clusterIPs": ["10.96.0.55"],
                    "ports": [
                        {
                            "name": "dns",
                            "protocol": "UDP",
                            "port": 5353,
                            "targetPort": 53,
                            "nodePort": 30055,
                        }
                    ],
                },
            },
            _slice("udp-new", "udp-new-x1", "10.244.0.82", "dns-2", 53, "dns", "UDP"),
        ],
        probes=(
            Flow(
                "udp-new-clusterip",
                POD,
                "udp",
                "10.96.0.55",
                5353,
                pods("dns-2"),
                False,
                sport=40056,
            ),
            Flow("udp-new-nodeport", EXT, "udp", NODE_IP, 30055, pods("dns-2"), True, sport=40057),
        ),
    ),
]

# Rows whose expectation differs per mode (flow name -> changed fields), applied by
# check_flow and for_mode. userspace: the forwarder opens a new connection from the
# node to the endpoint, so the endpoint never sees the client's source IP (as in
# upstream's userspace mode): every answered flow is "masqueraded". Everything else
# (which pods answer, REJECT, DROP, affinity) is as in iptables mode.
MODE_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "userspace": {
        f.name: {"masquerade": True}
        for f in [*FLOWS, *(p for c in RUNTIME_CHANGES for p in c.probes)]
        if f.masquerade is False and f.pods
    },
}

# ipvs (as upstream's IPVS proxier): a NodePort is one virtual server per node address,
# and with externalTrafficPolicy Local it has only the local endpoints for every client
# (no short-circuit of pod and node traffic to all endpoints); a virtual server without
# real servers answers ICMP port unreachable, so "no local endpoint" is REJECT, not DROP.
MODE_OVERRIDES["ipvs"] = {
    "nodeport-etp-local-from-pod": {"expect": pods("etp-local-1")},
    "nodeport-etp-local-from-node": {"expect": pods("etp-local-1"), "masquerade": False},
    "nodeport-etp-local-no-local-from-external": {"expect": REJECT},
    "nodeport-etp-local-no-local-from-pod": {"expect": REJECT, "masquerade": None},
    "nodeport-etp-local-no-local-from-node": {"expect": REJECT, "masquerade": None},
}

__all__ = [
    "DROP",
    "EXTERNAL_IP",
    "FLOWS",
    "MODES",
    "PROXY_CONFIGS",
    "REJECT",
    "RUNTIME_CHANGES",
    "Flow",
    "RuntimeChange",
    "check_flow",
    "for_mode",
    "override",
]
