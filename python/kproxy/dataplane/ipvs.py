"""ipvs mode, with upstream kube-proxy's layout: the Rust core plans the virtual
servers and programs them over generic netlink (batched, diffed against what it
programmed); this module keeps the ``kube-ipvs0`` dummy interface holding the service
addresses (pyroute2), loads upstream's ipsets with one ``ipset restore`` per sync,
writes the companion iptables chains (masquerade, NodePorts, source ranges, filtering
of service IPs on non-service ports) and the IPVS sysctls and timeouts."""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import re
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

IPSET_NAME_MAX = 31

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


def ipset_name(name: str, family: int) -> str:
    """Upstream's IPv6 sets are "KUBE-6-..." cut to ipset's 31 characters."""
    if family == 4:
        return name
    return ("KUBE-6-" + name.removeprefix("KUBE-"))[:IPSET_NAME_MAX]


def _create_line(name: str, kind: str, family: int) -> str:
    if kind == "bitmap:port":
        return f"create {name} bitmap:port range 0-65535 -exist"
    inet = "inet" if family == 4 else "inet6"
    return f"create {name} {kind} family {inet} hashsize 1024 maxelem 65536 -exist"


class IpvsBackend:
    mode = "ipvs"

    def __init__(self, cfg: Any, node: NodeInfo, families: tuple[int, ...] = (4,)) -> None:
        self.cfg = cfg
        self.node = node
        self.families: tuple[int, ...] = tuple(f for f in (4, 6) if f in families) or (4,)
        try:
            self.sock = _core.IpvsSocket()
        except FileNotFoundError as e:
            raise KproxyError(f"--proxy-mode ipvs: the kernel has no IPVS (load ip_vs): {e}") from e
        #: per IP family: the planner and what was programmed (kproxy-core)
        self.proxiers = {f: _core.IpvsProxier() for f in self.families}
        self._nodeports: dict[int, list[str]] | None = None
        self._health_checks: dict[int, tuple[str, int]] = {}
        self.backend = detect_backend()
        self.tools = {f: Tools(f, self.backend) for f in self.families}
        #: False until the first ipset restore (then only changes are written)
        self._ipsets_loaded = False
        #: family -> the companion rules last applied
        self._rules: dict[int, str] = {}
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

    def plan_config(self, family: int, nodeports: list[str]) -> str:
        return json.dumps(
            {
                "family": "v4" if family == 4 else "v6",
                "node_name": self.node.name,
                "zone": self.node.zone,
                "scheduler": self.cfg.ipvs_scheduler or "rr",
                "nodeport_ips": nodeports,
            }
        )

    def set_node(self, node: NodeInfo) -> None:
        self.node = node
        self._nodeports = None

    # -- sync --------------------------------------------------------------------------

    def sync(self, model: _core.Model, full: bool) -> SyncResult:
        """Plan the Services the model's change log names (all of them on a full
        sync), then apply only what changed: kube-ipvs0 addresses, virtual servers,
        ipset members; a full sync reconciles each against one read of the kernel."""
        try:
            return self._sync(model, full)
        except BaseException:
            # Whatever part failed, the next sync starts from the kernel again.
            for p in self.proxiers.values():
                p.invalidate()
            self._ipsets_loaded = False
            self._rules = {}
            raise

    def _sync(self, model: _core.Model, full: bool) -> SyncResult:
        result = SyncResult(full=full, changed=False)
        if full or self._nodeports is None:
            # Listing local addresses walks kube-ipvs0's too (one per service
            # address): done on full syncs and node changes only.
            self._nodeports = {f: self.nodeport_addresses(f) for f in self.families}
        nodeports = self._nodeports
        deltas = {
            f: json.loads(self.proxiers[f].plan(model, self.plan_config(f, nodeports[f]), full))
            for f in self.families
        }
        full = any(d["full"] for d in deltas.values())
        if full and not all(d["full"] for d in deltas.values()):
            deltas = {
                f: json.loads(self.proxiers[f].plan(model, self.plan_config(f, nodeports[f]), True))
                for f in self.families
            }
        for d in deltas.values():
            for w in d["warnings"]:
                log.warning("%s", w)
            if d["health_checks"] is not None:
                self._health_checks = {
                    int(port): (svc, n) for port, (svc, n) in d["health_checks"].items()
                }
        result.health_checks = dict(self._health_checks)
        bind_add = sorted({a for d in deltas.values() for a in d["bind_add"]})
        bind_del = sorted({a for d in deltas.values() for a in d["bind_del"]})
        released = self.sync_interface(bind_add, bind_del, full)
        owned = sorted({*released, *(a for f in self.families for a in nodeports[f])})
        exclude = list(self.cfg.ipvs_exclude_cidrs)
        reports = [
            json.loads(self.proxiers[f].program(self.sock, owned, exclude)) for f in self.families
        ]
        result.full = full or any(r["full"] for r in reports)
        entries = [e for d in deltas.values() for e in d["conntrack"]]
        if entries:
            conntrack.clear(entries)
        ipsets_changed = self.sync_ipsets(deltas, full)
        for f in self.families:
            self.sync_rules(f, full)
        result.changed = (
            any(r["ops"] > 0 for r in reports) or bool(bind_add or bind_del) or ipsets_changed
        )
        errors = [e for r in reports for e in r["errors"]]
        stats = {k: sum(r[k] for r in reports) for k in reports[0] if k not in ("errors", "full")}
        stats["replanned"] = sum(d["replanned"] for d in deltas.values())
        result.stats["ipvs"] = stats
        if errors:
            for e in errors:
                log.error("ipvs: %s", e)
            # Everything else is applied; the runner retries (the reconciler re-reads
            # the kernel on that sync).
            raise SyncError(f"{len(errors)} IPVS change(s) failed, first: {errors[0]}")
        return result

    def sync_interface(self, add: list[str], remove: list[str], full: bool) -> list[str]:
        """kube-ipvs0 gains `add` and loses `remove`; on a full sync `add` is
        everything it must hold and what else it holds goes (read once). Returns the
        addresses it gave up or held before a full sync (their virtual servers are
        kproxy's to delete)."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        def plen(ip: str) -> int:
            return 32 if ipaddress.ip_address(ip).version == 4 else 128

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=IPVS_INTERFACE)
            if not idx:
                ipr.link("add", ifname=IPVS_INTERFACE, kind="dummy")
                idx = ipr.link_lookup(ifname=IPVS_INTERFACE)
                log.info("created %s", IPVS_INTERFACE)
            index = idx[0]
            if 6 in self.families:
                self._ipv6_up(ipr, index)
            have: set[str] = set()
            if full:
                have = {
                    str(a.get_attr("IFA_ADDRESS"))
                    for a in ipr.get_addr(index=index)
                    if not ipaddress.ip_address(a.get_attr("IFA_ADDRESS")).is_link_local
                }
                remove = sorted(have - set(add))
                add = sorted(set(add) - have)
            for ip in add:
                try:
                    ipr.addr("add", index=index, address=ip, prefixlen=plen(ip))
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise
            for ip in remove:
                try:
                    ipr.addr("del", index=index, address=ip, prefixlen=plen(ip))
                except NetlinkError as e:  # already gone
                    log.debug("unbind %s: %s", ip, e)
        return sorted(have | set(remove))

    @staticmethod
    def _ipv6_up(ipr: Any, index: int) -> None:
        """IPv6 service addresses stay tentative (no local route, so no IPVS) on a
        link that is down: kube-ipvs0 is brought up for IPv6, without a link-local
        address (addr_gen_mode none), which it does not need."""
        link = ipr.get_links(index)[0]
        if link["flags"] & 1:  # IFF_UP
            return
        gen_mode = SYSCTL / "net/ipv6/conf" / IPVS_INTERFACE / "addr_gen_mode"
        if gen_mode.exists():
            gen_mode.write_text("1")
        ipr.link("set", index=index, state="up")

    def sync_ipsets(self, deltas: dict[int, dict[str, Any]], full: bool) -> bool:
        """One ``ipset restore`` for all families: on a full sync (or the first) every
        set is created and refilled; otherwise only the members the plans added or
        removed are written. True when something was written."""
        lines: list[str] = []
        refill = full or not self._ipsets_loaded
        for family, delta in deltas.items():
            for base, kind in IPSETS.items():
                name = ipset_name(base, family)
                if refill:
                    lines.append(_create_line(name, kind, family))
                    lines.append(f"flush {name}")
                else:
                    lines.extend(f"del {name} {m} -exist" for m in delta["ipset_del"].get(name, ()))
                lines.extend(f"add {name} {m} -exist" for m in delta["ipset_add"].get(name, ()))
        if lines:
            _ipset("\n".join(lines) + "\n")
        self._ipsets_loaded = True
        return bool(lines)

    def render_rules(self, family: int = 4) -> dict[str, list[str]]:
        """The companion chains of one family (for IPv6: ip6tables, matching the
        KUBE-6-* sets)."""
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
                if ipaddress.ip_network(cidr, strict=False).version == family:
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
        if family == 6:
            nat, flt = _v6_sets(nat), _v6_sets(flt)
        return {"nat": nat, "filter": flt}

    def sync_rules(self, family: int, full: bool) -> None:
        """One iptables-restore (ip6tables for IPv6) of our chains, when they changed
        (or on a full sync), plus the jumps from the built-in chains that are missing."""
        rules = self.render_rules(family)
        key = json.dumps(rules)
        if not full and key == self._rules.get(family):
            return
        tools = self.tools[family]
        saved = run_save(tools)
        text = ""
        for table, lines in rules.items():
            jumps = [
                f"-I {chain} 1 {spec}" if chain != "POSTROUTING" else f"-A {chain} {spec}"
                for t, chain, spec in JUMPS
                if t == table and f"-A {chain} {spec}" not in saved
            ]
            text += f"*{table}\n" + "\n".join([*lines, *jumps]) + "\nCOMMIT\n"
        try:
            run_restore(tools, text)
        except SyncError:
            self._rules.pop(family, None)
            raise
        self._rules[family] = key

    # -- cleanup -----------------------------------------------------------------------

    def cleanup(self) -> bool:
        return self.cleanup_static(tuple(self.cfg.ipvs_exclude_cidrs))

    @staticmethod
    def cleanup_static(exclude_cidrs: tuple[str, ...] = ()) -> bool:
        """Remove IPVS virtual servers on kube-ipvs0's addresses and NodePorts, our
        iptables chains and jumps, our ipsets and kube-ipvs0; True when something
        failed. Virtual servers of others, and those inside `exclude_cidrs`
        (--ipvs-exclude-cidrs), are kept."""
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
            excluded = [ipaddress.ip_network(c, strict=False) for c in exclude_cidrs]
            doomed = []
            for vs in json.loads(sock.services()):
                addr = ipaddress.ip_address(vs["addr"])
                if any(addr.version == n.version and addr in n for n in excluded):
                    continue
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
                for family in (4, 6):
                    subprocess.run(
                        ["ipset", "destroy", ipset_name(name, family)],
                        capture_output=True,
                        timeout=60,
                        check=False,
                    )
        failed |= leftovers.remove_ipvs_interface()
        return failed


def _v6_sets(lines: list[str]) -> list[str]:
    return [
        re.sub(r"--match-set (KUBE-[A-Z0-9-]+)", lambda m: "--match-set " + ipset_name(m[1], 6), x)
        for x in lines
    ]


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
        bases = (f"KUBE-NODE-PORT-{proto}", f"KUBE-NODE-PORT-LOCAL-{proto}")
        for name in (ipset_name(b, f) for b in bases for f in (4, 6)):
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
