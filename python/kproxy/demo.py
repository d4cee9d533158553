"""The main job: run kproxy on the bundled example cluster and show where traffic goes.

``python -m kproxy.demo [--mode iptables] [--manifests examples/]`` (as root) builds the
network-namespace sandbox (see :mod:`kproxy.sandbox`), starts kproxy in the node
namespace, sends traffic to every example Service by every path it offers (ClusterIP
from a pod and from the node; NodePort, externalIPs and LoadBalancer IPs from the
external client), prints what answered, and tears everything down.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from kproxy.sandbox import (
    CLIENT_POD,
    NODE_IP,
    ConnectResult,
    KproxyStartError,
    Sandbox,
    SandboxError,
    cleanup_stale,
)

DEFAULT_MANIFESTS = Path(__file__).resolve().parents[2] / "examples"
PREFIX = "kpdemo"
ATTEMPTS = 4


@dataclass(frozen=True)
class Probe:
    service: str  # namespace/name
    port: str  # "name/PROTO port"
    path: str  # ClusterIP, NodePort, externalIP, LoadBalancer
    source: str  # sandbox source: pod:client, node, external
    protocol: str
    ip: str
    dst_port: int


@dataclass(frozen=True)
class Row:
    probe: Probe | None
    service: str
    note: str = ""
    results: tuple[ConnectResult, ...] = ()


def _service_probes(svc: Mapping[str, Any]) -> tuple[str, list[Probe], str]:
    meta = svc.get("metadata") or {}
    spec = svc.get("spec") or {}
    name = f"{meta.get('namespace', 'default')}/{meta.get('name', '?')}"
    if spec.get("type") == "ExternalName":
        return name, [], "ExternalName: ignored by kproxy"
    cluster_ip = spec.get("clusterIP")
    if not cluster_ip or cluster_ip == "None":
        return name, [], "headless: ignored by kproxy"
    lb_ips = [
        i["ip"]
        for i in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        if isinstance(i, dict) and i.get("ip")
    ]
    probes: list[Probe] = []
    for port in spec.get("ports") or []:
        proto = str(port.get("protocol") or "TCP").lower()
        number = int(port["port"])
        label = f"{port.get('name') or '-'}/{proto.upper()} {number}"

        def add(
            path: str, source: str, ip: str, dst: int, label: str = label, proto: str = proto
        ) -> None:
            probes.append(Probe(name, label, path, source, proto, ip, dst))

        add("ClusterIP", f"pod:{CLIENT_POD}", cluster_ip, number)
        add("ClusterIP", "node", cluster_ip, number)
        if port.get("nodePort") and spec.get("type") in ("NodePort", "LoadBalancer"):
            add("NodePort", "external", NODE_IP, int(port["nodePort"]))
        for ip in spec.get("externalIPs") or []:
            add("externalIP", "external", ip, number)
        for ip in lb_ips:
            add("LoadBalancer", "external", ip, number)
    return name, probes, ""


def run_probes(sb: Sandbox) -> Iterator[Row]:
    services = [o for o in sb.objects if o.get("kind") == "Service"]
    services.sort(key=lambda s: (s["metadata"].get("namespace", ""), s["metadata"]["name"]))
    for svc in services:
        name, probes, note = _service_probes(svc)
        if note:
            yield Row(None, name, note)
        for p in probes:
            first = sb.connect(p.source, p.protocol, p.ip, p.dst_port, timeout=1.0)
            results = [first]
            if first.answered:  # more attempts show load balancing (or affinity)
                results += sb.connect_many(
                    p.source, p.protocol, p.ip, p.dst_port, count=ATTEMPTS - 1, timeout=1.0
                )
            yield Row(p, name, results=tuple(results))


def _result_text(results: Sequence[ConnectResult]) -> tuple[str, str]:
    verdicts = sorted({r.verdict for r in results})
    masq = {r.masqueraded for r in results if r.answered}
    masq_text = (
        "-" if not masq else ("mixed" if len(masq) > 1 else ("yes" if True in masq else "no"))
    )
    return ", ".join(verdicts), masq_text


SOURCE_LABEL = {f"pod:{CLIENT_POD}": "pod", "node": "node", "external": "external"}


def format_table(rows: Sequence[Row]) -> str:
    header = ("SERVICE", "PORT", "PATH", "SOURCE", "DESTINATION", "ANSWERED BY", "MASQ")
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        if row.probe is None:
            lines.append((row.service, "", "", "", "", row.note, ""))
            continue
        p = row.probe
        answered, masq = _result_text(row.results)
        dest = f"{p.ip}:{p.dst_port}"
        lines.append((row.service, p.port, p.path, SOURCE_LABEL[p.source], dest, answered, masq))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


LEGEND = (
    "ANSWERED BY: the pods that answered {n} attempts; REJECT = refused (ICMP/RST), "
    "DROP = no answer in time.\nMASQ: yes when the pod saw another source address than "
    "the client's own (SNAT by the node)."
)


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kproxy.demo", description=__doc__)
    parser.add_argument(
        "--mode", default="iptables", choices=("iptables", "nftables", "ipvs", "userspace")
    )
    parser.add_argument(
        "--manifests", action="append", type=Path, help=f"default: {DEFAULT_MANIFESTS}"
    )
    parser.add_argument(
        "--iptables-backend", choices=("legacy", "nft"), help="sets KPROXY_IPTABLES_BACKEND"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the work directory")
    parser.add_argument("--start-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    if sys.platform != "linux" or os.geteuid() != 0:
        print(
            "kproxy.demo must run as root on Linux: it creates network namespaces and "
            "programs the kernel inside them (try: sudo python -m kproxy.demo).",
            file=sys.stderr,
        )
        return 1
    manifests = args.manifests or [DEFAULT_MANIFESTS]
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    cleanup_stale(PREFIX)
    try:
        with Sandbox.from_manifests(manifests, prefix=PREFIX, keep_workdir=args.keep_logs) as sb:
            print(
                f"sandbox {sb.run_id}: node {NODE_IP}, {len(sb.pods)} pods "
                f"(manifests: {', '.join(map(str, manifests))})"
            )
            print(f"starting kproxy --proxy-mode {args.mode} in namespace {sb.node_ns} ...")
            try:
                sb.start_kproxy(
                    args.mode,
                    iptables_backend=args.iptables_backend,
                    timeout=args.start_timeout,
                )
            except KproxyStartError as exc:
                print(f"kproxy failed to start: {exc}", file=sys.stderr)
                return 1
            print("kproxy is healthy; probing every Service ...\n")
            rows = []
            for row in run_probes(sb):
                rows.append(row)
            print(format_table(rows))
            print()
            print(LEGEND.format(n=ATTEMPTS))
            if any(r.verdict == "ERROR" for row in rows for r in row.results):
                print("some probes failed locally (ERROR rows)", file=sys.stderr)
            if not sb.kproxy or not sb.kproxy.running():
                print("kproxy exited during the demo", file=sys.stderr)
                return 1
            if args.keep_logs and sb.kproxy:
                print(f"kproxy log: {sb.kproxy.log_path}")
    except SandboxError as exc:
        print(f"sandbox error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; sandbox removed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
