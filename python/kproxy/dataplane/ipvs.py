"""ipvs mode, with upstream kube-proxy's layout: the Rust core plans the virtual
servers and programs them over generic netlink (batched, diffed against what it
programmed); this module keeps the ``kube-ipvs0`` dummy interface holding the service
addresses (pyroute2), loads upstream's ipsets with one ``ipset restore`` per sync,
writes the companion iptables chains (masquerade, NodePorts, source ranges, filtering
of service IPs on non-service ports) and the IPVS sysctls and timeouts."""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

from kproxy import _core, conntrack
from kproxy.dataplane import SyncResult
from kproxy.dataplane.iptables import (
    IptablesBackend,
    Tools,
    detect_backend,
    ensure_sysctl,
    run_restore,
    run_save,
)
from kproxy.errors import KproxyError, SyncError
from kproxy.node import NodeInfo, local_addresses, nodeport_ips

log = logging.getLogger("kproxy.ipvs")

IPVS_INTERFACE = "kube-ipvs0"
SYSCTL = Path("/proc/sys")
SYSCTLS = {
    "net/ipv4/vs/conntrack": "1",  # netfilter NAT (masquerade) of IPVS traffic
    "net/ipv4/vs/conn_reuse_mode": "0",
    "net/ipv4/vs/expire_nodest_conn": "1",
    "net/ipv4/vs/expire_quiescent_template": "1",
    "net/ipv4/ip_forward": "1",
}
STRICT_ARP = {"net/ipv4/conf/all/arp_ignore": "1", "net/ipv4/conf/all/arp_announce": "2"}

#: upstream's ipsets (pkg/proxy/ipvs/ipset.go) -> type
IPSETS: dict[str, str] = {
    "KUBE-LOOP-BACK": "hash:ip,port,ip",
    "KUBE-CLUSTER-IP": "hash:ip,port",
    "KUBE-EXTERNAL-IP": "hash:ip,port",
    "KUBE-EXTERNAL-IP-LOCAL": "hash:ip,port",
    "KUBE-LOAD-BALANCER": "hash:ip,port",
    "KUBE-LOAD-BALANCER-LOCAL": "hash:ip,port",
    "KUBE-LOAD-BALANCER-FW": "hash:ip,port",
    "KUBE-LOAD-BALANCER-SOURCE-IP": "hash:ip,port,ip",
    "KUBE-LOAD-BALANCER-SOURCE-CIDR": "hash:ip,port,net",
    "KUBE-NODE-PORT-TCP": "bitmap:port",
    "KUBE-NODE-PORT-LOCAL-TCP": "bitmap:port",
    "KUBE-NODE-PORT-UDP": "bitmap:port",
    "KUBE-NODE-PORT-LOCAL-UDP": "bitmap:port",
    "KUBE-NODE-PORT-SCTP-HASH": "hash:ip,port",
    "KUBE-NODE-PORT-LOCAL-SCTP-HASH": "hash:ip,port",
    "KUBE-HEALTH-CHECK-NODE-PORT": "bitmap:port",
    "KUBE-IPVS-IPS": "hash:ip",
}

NAT_CHAINS = ("KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER")
FILTER_CHAINS = (
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-IPVS-FILTER",
)
#: (table, built-in chain, rule spec after "-A CHAIN")
JUMPS = (
    ("nat", "PREROUTING", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    ("nat", "OUTPUT", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
    (
        "nat",
        "POSTROUTING",
        '-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
    ),
    ("filter", "INPUT", "-m conntrack --ctstate NEW -j KUBE-PROXY-FIREWALL"),
    ("filter", "INPUT", '-m comment --comment "kubernetes ipvs filter" -j KUBE-IPVS-FILTER'),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW -j KUBE-PROXY-FIREWALL"),
    ("filter", "FORWARD", '-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD'),
    ("filter", "OUTPUT", "-m conntrack --ctstate NEW -j KUBE-PROXY-FIREWALL"),
    (
        "filter",
        "OUTPUT",
        '-m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER',
    ),
)


def _sysctl(name: str, value: str) -> None:
    ensure_sysctl(SYSCTL / name, value)


def _seconds(v: float) -> int:
    return int(v) if v and v > 0 else 0


def _ipset(text: str) -> None:
    ipset = shutil.which("ipset")
    if ipset is None:
        raise SyncError("ipset not found: install the ipset package")
    proc = subprocess.run(
        [ipset, "restore"], input=text, capture_output=True, text=True, timeout=300, check=False
    )
    if proc.returncode != 0:
        raise SyncError(f"ipset restore failed: {proc.stderr.strip()}")


def _create_line(name: str, kind: str) -> str:
    if kind == "bitmap:port":
        return f"create {name} bitmap:port range 0-65535 -exist"
    return f"create {name} {kind} family inet hashsize 1024 maxelem 65536 -exist"


class IpvsBackend:
    mode = "ipvs"

    def __init__(self, cfg: Any, node: NodeInfo, families: tuple[int, ...] = (4,)) -> None:
        self.cfg = cfg
        self.node = node
        # IPv4 first: ipsets and the companion rules are IPv4 here (see README).
        self.families = tuple(f for f in families if f == 4) or (4,)
        try:
            self.sock = _core.IpvsSocket()
        except FileNotFoundError as e:
            raise KproxyError(f"--proxy-mode ipvs: the kernel has no IPVS (load ip_vs): {e}") from e
        self.reconciler = _core.IpvsReconciler()
        self.backend = detect_backend()
        self.tools = Tools(4, self.backend)
        self._ipsets: dict[str, set[str]] | None = None
        self._rules: str | None = None
        #: UDP virtual server (addr, port) -> its real servers "ip:port", last sync
        self._udp: dict[tuple[str, int], set[tuple[str, int]]] = {}
        for k, v in SYSCTLS.items():
            _sysctl(k, v)
        if cfg.ipvs_strict_arp:
            for k, v in STRICT_ARP.items():
                _sysctl(k, v)
        t = (
            _seconds(cfg.ipvs_tcp_timeout),
            _seconds(cfg.ipvs_tcpfin_timeout),
            _seconds(cfg.ipvs_udp_timeout),
        )
        if any(t):
            self.sock.set_timeouts(*t)
        # Leftovers of iptables mode (its KUBE-SVC-* chains would catch our traffic).
        IptablesBackend.cleanup_static()
        log.info("ipvs mode, scheduler %s, iptables %s", cfg.ipvs_scheduler, self.backend)

    # -- plan --------------------------------------------------------------------------

    def nodeport_addresses(self, family: int) -> list[str]:
        spec = tuple(self.cfg.nodeport_addresses)
        ips = nodeport_ips(spec, self.node) if spec else None
        if ips is None:
            # All local addresses except loopback and our own service addresses.
            ips = [ip for ip, _, dev in local_addresses() if dev not in ("lo", IPVS_INTERFACE)]
        return [
            ip
            for ip in ips
            if ipaddress.ip_address(ip).version == family
            and not ipaddress.ip_address(ip).is_loopback
            and not ipaddress.ip_address(ip).is_link_local
        ]

    def plan(self, model: _core.Model, family: int) -> dict[str, Any]:
        config = {
            "family": "v4" if family == 4 else "v6",
            "node_name": self.node.name,
            "zone": self.node.zone,
            "scheduler": self.cfg.ipvs_scheduler or "rr",
            "nodeport_ips": self.nodeport_addresses(family),
        }
        plan: dict[str, Any] = json.loads(_core.ipvs_plan(model, json.dumps(config)))
        return plan

    def set_node(self, node: NodeInfo) -> None:
        self.node = node

    # -- sync --------------------------------------------------------------------------

    def sync(self, model: _core.Model, full: bool) -> SyncResult:
        result = SyncResult(full=full, changed=False)
        plans = [self.plan(model, f) for f in self.families]
        services = [s for p in plans for s in p["services"]]
        bind = sorted({a for p in plans for a in p["bind_addrs"]})
        for p in plans:
            for w in p["warnings"]:
                log.warning("%s", w)
            for port, (svc, n) in p["health_checks"].items():
                result.health_checks[int(port)] = (svc, n)
        bound_before = self.sync_interface(bind)
        nodeports = {a for f in self.families for a in self.nodeport_addresses(f)}
        owned = sorted(set(bound_before) | set(bind) | nodeports)
        report = json.loads(
            self.reconciler.sync(
                self.sock,
                json.dumps({"services": services}),
                owned,
                list(self.cfg.ipvs_exclude_cidrs),
                full,
            )
        )
        result.full = bool(report["full"])
        result.changed = report["ops"] > 0
        self.clear_udp_conntrack(services)
        self.sync_ipsets(plans[0]["ipsets"], result.full)
        self.sync_rules(result.full)
        result.stats["ipvs"] = {k: v for k, v in report.items() if k != "errors"}
        if report["errors"]:
            for e in report["errors"]:
                log.error("ipvs: %s", e)
            # Everything else is applied; the runner retries (the reconciler re-reads
            # the kernel on that sync).
            raise SyncError(
                f"{len(report['errors'])} IPVS change(s) failed, first: {report['errors'][0]}"
            )
        return result

    def clear_udp_conntrack(self, services: list[Any]) -> None:
        """As upstream: a UDP virtual server that gained its first real server, and a
        UDP real server that went away, get their stale conntrack entries cleared (a
        client resending from the same port would otherwise stay blackholed)."""
        now: dict[tuple[str, int], set[tuple[str, int]]] = {}
        for vs, dests in services:
            if vs["protocol"] == 17:
                now[(vs["addr"], vs["port"])] = {(d["addr"], d["port"]) for d in dests}
        entries: list[dict[str, Any]] = []
        for (ip, port), dests in now.items():
            old = self._udp.get((ip, port), set())
            if dests and not old:
                entries.append({"kind": "service-ip", "ip": ip, "port": port, "protocol": "udp"})
            for eip, _ in old - dests:
                entries.append(
                    {
                        "kind": "endpoint",
                        "ip": ip,
                        "port": port,
                        "endpoint_ip": eip,
                        "protocol": "udp",
                    }
                )
        self._udp = now
        if entries:
            conntrack.clear(entries)

    def sync_interface(self, want: list[str]) -> list[str]:
        """kube-ipvs0 holds exactly `want` (added only when missing); returns what it
        held before."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=IPVS_INTERFACE)
            if not idx:
                ipr.link("add", ifname=IPVS_INTERFACE, kind="dummy")
                idx = ipr.link_lookup(ifname=IPVS_INTERFACE)
                log.info("created %s", IPVS_INTERFACE)
            index = idx[0]
            have = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)]
            for ip in sorted(set(want) - set(have)):
                plen = 32 if ipaddress.ip_address(ip).version == 4 else 128
                ipr.addr("add", index=index, address=ip, prefixlen=plen)
            for ip in sorted(set(have) - set(want)):
                plen = 32 if ipaddress.ip_address(ip).version == 4 else 128
                try:
                    ipr.addr("del", index=index, address=ip, prefixlen=plen)
                except Exception as e:  # already gone
                    log.debug("unbind %s: %s", ip, e)
        return [str(a) for a in have]

    def sync_ipsets(self, sets: dict[str, list[str]], full: bool) -> None:
        want = {name: set(sets.get(name, ())) for name in IPSETS}
        lines = [_create_line(n, k) for n, k in IPSETS.items()] if full or not self._ipsets else []
        prev = None if full else self._ipsets
        for name, members in want.items():
            if prev is None:
                lines.append(f"flush {name}")
                lines.extend(f"add {name} {m} -exist" for m in sorted(members))
                continue
            old = prev.get(name, set())
            lines.extend(f"del {name} {m} -exist" for m in sorted(old - members))
            lines.extend(f"add {name} {m} -exist" for m in sorted(members - old))
        if lines:
            _ipset("\n".join(lines) + "\n")
        self._ipsets = want

    def render_rules(self) -> dict[str, list[str]]:
        cfg = self.cfg
        mark = 1 << cfg.iptables_masquerade_bit
        m = f"{mark:#x}/{mark:#x}"
        nat = [f":{c} - [0:0]" for c in NAT_CHAINS] + [":KUBE-MARK-MASQ - [0:0]"]
        nat += [
            "-A KUBE-POSTROUTING -m comment --comment "
            '"Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose" '
            "-m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE",
            f"-A KUBE-POSTROUTING -m mark ! --mark {m} -j RETURN",
            f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark:#x}",
            '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT"'
            " -j MASQUERADE --random-fully",
            f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark:#x}",
        ]
        cluster = "-m set --match-set KUBE-CLUSTER-IP dst,dst"
        if cfg.masquerade_all:
            nat.append(f"-A KUBE-SERVICES {cluster} -j KUBE-MARK-MASQ")
        else:
            for cidr in cfg.cluster_cidrs:
                if ipaddress.ip_network(cidr, strict=False).version == 4:
                    nat.append(f"-A KUBE-SERVICES {cluster} ! -s {cidr} -j KUBE-MARK-MASQ")
        nat += [
            "-A KUBE-SERVICES -m set --match-set KUBE-EXTERNAL-IP dst,dst "
            "-m set ! --match-set KUBE-EXTERNAL-IP-LOCAL dst,dst -j KUBE-MARK-MASQ",
            '-A KUBE-SERVICES -m comment --comment "Kubernetes service lb portal" '
            "-m set --match-set KUBE-LOAD-BALANCER dst,dst -j KUBE-LOAD-BALANCER",
            "-A KUBE-LOAD-BALANCER -m set --match-set KUBE-LOAD-BALANCER-LOCAL dst,dst -j RETURN",
            "-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ",
            "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
        ]
        for proto in ("tcp", "udp"):
            up = proto.upper()
            nat += [
                f"-A KUBE-NODE-PORT -p {proto} -m set --match-set KUBE-NODE-PORT-LOCAL-{up} dst"
                " -j RETURN",
                f"-A KUBE-NODE-PORT -p {proto} -m set --match-set KUBE-NODE-PORT-{up} dst"
                " -j KUBE-MARK-MASQ",
            ]
        nat += [
            "-A KUBE-NODE-PORT -p sctp -m set --match-set KUBE-NODE-PORT-LOCAL-SCTP-HASH dst,dst"
            " -j RETURN",
            "-A KUBE-NODE-PORT -p sctp -m set --match-set KUBE-NODE-PORT-SCTP-HASH dst,dst"
            " -j KUBE-MARK-MASQ",
            "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT",
            "-A KUBE-SERVICES -m set --match-set KUBE-LOAD-BALANCER dst,dst -j ACCEPT",
        ]
        flt = [f":{c} - [0:0]" for c in FILTER_CHAINS]
        flt += [
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
            f"-A KUBE-FORWARD -m mark --mark {m} -j ACCEPT",
            "-A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-A KUBE-PROXY-FIREWALL -m set --match-set KUBE-LOAD-BALANCER-FW dst,dst "
            "-j KUBE-SOURCE-RANGES-FIREWALL",
            "-A KUBE-SOURCE-RANGES-FIREWALL -m set --match-set KUBE-LOAD-BALANCER-SOURCE-CIDR "
            "dst,dst,src -j RETURN",
            "-A KUBE-SOURCE-RANGES-FIREWALL -m set --match-set KUBE-LOAD-BALANCER-SOURCE-IP "
            "dst,dst,src -j RETURN",
            "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP",
        ]
        for s in ("KUBE-LOAD-BALANCER", "KUBE-CLUSTER-IP", "KUBE-EXTERNAL-IP"):
            flt.append(f"-A KUBE-IPVS-FILTER -m set --match-set {s} dst,dst -j RETURN")
        flt += [
            "-A KUBE-IPVS-FILTER -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j RETURN",
            "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW "
            "-m set --match-set KUBE-IPVS-IPS dst -j REJECT",
        ]
        return {"nat": nat, "filter": flt}

    def sync_rules(self, full: bool) -> None:
        """One iptables-restore of our chains, when they changed (or on a full sync),
        plus the jumps from the built-in chains that are missing."""
        rules = self.render_rules()
        key = json.dumps(rules)
        if not full and key == self._rules:
            return
        saved = run_save(self.tools)
        text = ""
        for table, lines in rules.items():
            jumps = [
                f"-I {chain} 1 {spec}" if chain != "POSTROUTING" else f"-A {chain} {spec}"
                for t, chain, spec in JUMPS
                if t == table and f"-A {chain} {spec}" not in saved
            ]
            text += f"*{table}\n" + "\n".join([*lines, *jumps]) + "\nCOMMIT\n"
        try:
            run_restore(self.tools, text)
        except SyncError:
            self._rules = None
            raise
        self._rules = key

    # -- cleanup -----------------------------------------------------------------------

    def cleanup(self) -> bool:
        return self.cleanup_static()

    @staticmethod
    def cleanup_static() -> bool:
        """Remove IPVS virtual servers on kube-ipvs0's addresses and NodePorts, our
        iptables chains and jumps, our ipsets and kube-ipvs0; True when something
        failed. Virtual servers of others are kept."""
        from kproxy.dataplane import leftovers

        failed = False
        bound = _interface_addresses()
        nodeports = _ipset_ports()
        try:
            sock = _core.IpvsSocket()
        except OSError:
            sock = None
        if sock is not None:
            local = {ip for ip, _, _ in local_addresses()}
            doomed = []
            for vs in json.loads(sock.services()):
                if vs["addr"] in bound or (
                    vs["addr"] in local and (vs["protocol"], vs["port"]) in nodeports
                ):
                    doomed.append({"del_service": vs})
            for _, errno in sock.apply(json.dumps(doomed)) if doomed else []:
                log.error("cleanup: cannot delete a virtual server (errno %d)", errno)
                failed = True
        for family in (4, 6):
            for backend in ("legacy", "nft"):
                try:
                    failed |= _cleanup_rules(Tools(family, backend))
                except SyncError as e:
                    log.debug("skip ipvs rule cleanup on %s/%s: %s", backend, family, e)
        if shutil.which("ipset"):
            for name in IPSETS:
                subprocess.run(
                    ["ipset", "destroy", name], capture_output=True, timeout=60, check=False
                )
        failed |= leftovers.remove_ipvs_interface()
        return failed


def _interface_addresses() -> set[str]:
    try:
        from pyroute2 import IPRoute
    except ImportError:  # pragma: no cover - a dependency
        return set()
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=IPVS_INTERFACE)
        if not idx:
            return set()
        return {str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(index=idx[0])}


def _ipset_ports() -> set[tuple[int, int]]:
    out: set[tuple[int, int]] = set()
    if shutil.which("ipset") is None:
        return out
    for proto, num in (("TCP", 6), ("UDP", 17)):
        for name in (f"KUBE-NODE-PORT-{proto}", f"KUBE-NODE-PORT-LOCAL-{proto}"):
            p = subprocess.run(
                ["ipset", "save", name], capture_output=True, text=True, timeout=60, check=False
            )
            for line in p.stdout.splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == "add" and parts[2].isdigit():
                    out.add((num, int(parts[2])))
    return out


def _cleanup_rules(tools: Tools) -> bool:
    saved = run_save(tools)
    ours = {"nat": set(NAT_CHAINS), "filter": set(FILTER_CHAINS)}
    text = ""
    table = ""
    deletes: dict[str, list[str]] = {"nat": [], "filter": []}
    present: dict[str, set[str]] = {"nat": set(), "filter": set()}
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif table in ours and line.startswith(":"):
            name = line[1:].split()[0]
            if name in ours[table]:
                present[table].add(name)
        elif table in ours and line.startswith("-A "):
            chain = line.split()[1]
            target = line.rsplit(" -j ", 1)[-1].split()[0] if " -j " in line else ""
            if chain not in ours[table] and target in ours[table]:
                deletes[table].append("-D " + line[3:])
    for t in ("nat", "filter"):
        if not present[t]:
            continue
        text += f"*{t}\n" + "".join(d + "\n" for d in deletes[t])
        text += "".join(f":{c} - [0:0]\n" for c in sorted(present[t]))
        text += "".join(f"-X {c}\n" for c in sorted(present[t])) + "COMMIT\n"
    if not text:
        return False
    try:
        run_restore(tools, text)
    except SyncError as e:
        log.error("ipvs rule cleanup failed: %s", e)
        return True
    return False
