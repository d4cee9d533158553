"""nftables mode: the Rust core renders upstream's `kube-proxy` tables (families ip
and ip6) in a rule shape whose kernel cost stays linear (see rust/core/src/nftables.rs);
one `nft -f` transaction per family applies a sync.

Incremental syncs write only the changed map elements and the changed Services' own
chains; nothing is listed on that path. The programmed state lives in the renderer; on
the sync period a small probe (`nft list chain <family> kube-proxy services`, one chain
of two rules) checks that nobody deleted or flushed the table, and a full sync (an
atomic replacement of the table) repairs it. A transaction the kernel refuses is logged
with the offending line, counted in
kubeproxy_sync_proxy_rules_nftables_sync_failures_total and retried as a full sync.

A full sync replaces the table, which would empty the ClientIP affinity sets (upstream
flushes its table instead, which keeps set elements): when the new state declares
affinity sets, the entries of those that already exist are read first (`nft -j list
sets`) and re-added in the same transaction with the time they had left."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from kproxy import _core, conntrack, metrics
from kproxy.dataplane import SyncResult, local_detector
from kproxy.errors import SyncError
from kproxy.node import NodeInfo, nodeport_ips

log = logging.getLogger("kproxy.nftables")

TCP_BE_LIBERAL = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")
#: nft error output can quote a whole 30k-element command: keep logs bounded.
MAX_ERROR_CHARS = 600
NFT_TIMEOUT = 600.0
#: the renderer's ClientIP affinity sets (rust/core/src/nftables.rs AFFINITY_PREFIX)
AFFINITY_PREFIX = "affinity-"


def nft_path() -> str:
    path = shutil.which("nft")
    if path is None:
        raise SyncError("nft not found: install the nftables package")
    return path


def _clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def explain_nft_error(stderr: str, text: str) -> str:
    """nft names `/dev/stdin:LINE:COL`; quote the line (clipped) and the object it
    belongs to (the chain, set or map it writes)."""
    first = next((ln for ln in stderr.splitlines() if "Error" in ln), stderr.strip())
    msg = _clip(first.strip(), 300)
    m = re.search(r":(\d+):\d+(?:-\d+)?: Error", stderr)
    if m:
        lines = text.splitlines()
        n = int(m.group(1))
        if 0 < n <= len(lines):
            line = lines[n - 1]
            words = line.split()
            obj = words[4] if len(words) > 4 and words[0] in ("add", "delete", "flush") else ""
            msg += f" (line {n}, object {obj!r}: {_clip(line, 240)!r})"
    return msg


def run_nft(text: str, *, check_only: bool = False) -> None:
    """Apply `text` as one nft transaction (all or nothing)."""
    argv = [nft_path(), "-f", "-"]
    if check_only:
        argv.insert(1, "-c")
    proc = subprocess.run(
        argv, input=text, capture_output=True, text=True, timeout=NFT_TIMEOUT, check=False
    )
    if proc.returncode != 0:
        raise SyncError(f"nft -f failed: {explain_nft_error(proc.stderr, text)}")


def _sysctl_read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


class NftablesBackend:
    mode = "nftables"

    def __init__(self, cfg: Any, node: NodeInfo, families: tuple[int, ...] = (4,)) -> None:
        self.cfg = cfg
        self.node = node
        self.families = families
        nft_path()
        self.renderers: dict[int, Any] = {
            f: _core.NftablesRenderer(json.dumps(self.render_config(f))) for f in families
        }
        #: when each family's table was last checked for drift
        self._checked: dict[int, float] = {f: time.monotonic() for f in families}
        self._warned_algorithms: set[tuple[str, str]] = set()
        log.info(
            "nftables mode, families %s, NodePorts on %s",
            families,
            self.nodeport_addresses() or "every local address",
        )
        self._remove_iptables_leftovers()

    @staticmethod
    def _remove_iptables_leftovers() -> None:
        # A node moving from iptables mode: its KUBE-* chains would DNAT first.
        try:
            from kproxy.dataplane.iptables import IptablesBackend

            IptablesBackend.cleanup_static()
        except Exception as e:  # never fatal: the tools may be missing
            log.debug("iptables leftovers not removed: %s", e)

    def nodeport_addresses(self) -> list[str] | None:
        """NodePort IPs: upstream's nftables default for nodePortAddresses is `primary`."""
        spec = tuple(self.cfg.nodeport_addresses) or ("primary",)
        return nodeport_ips(spec, self.node)

    def render_config(self, family: int) -> dict[str, Any]:
        return {
            "family": "v4" if family == 4 else "v6",
            "node_name": self.node.name,
            "node_zone": self.node.zone,
            "node_ips": list(self.node.ips),
            "masquerade_bit": self.cfg.masquerade_bit,
            "masquerade_all": self.cfg.masquerade_all,
            "local_detector": local_detector(self.cfg, self.node),
            "nodeport_addresses": self.nodeport_addresses(),
            "conntrack_tcp_liberal": _sysctl_read(TCP_BE_LIBERAL) not in (None, "0"),
        }

    def set_node(self, node: NodeInfo) -> None:
        if node == self.node:
            return
        self.node = node
        for f, r in self.renderers.items():
            r.set_config(json.dumps(self.render_config(f)))

    def drifted(self, family: int) -> bool:
        """True when the table is not what we programmed (deleted or flushed)."""
        where, expect = self.renderers[family].drift_probe()
        proc = subprocess.run(
            [nft_path(), "list", "chain", *where.split()],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            log.warning("nftables table %s is gone: %s", where, _clip(proc.stderr.strip(), 200))
            return True
        missing = [e for e in expect if e not in proc.stdout]
        if missing:
            log.warning("nftables chain %s lost its rules %s", where, missing)
            return True
        return False

    def affinity_carried(self, family: int, text: str) -> str:
        """`add element` lines that put back, into the affinity sets that full-sync
        `text` declares again, the entries they hold now, each with the time it had
        left. Empty when `text` has no affinity sets or there is nothing to carry."""
        where, _ = self.renderers[family].drift_probe()
        fam, table = where.split()[:2]
        prefix = f"add set {fam} {table} {AFFINITY_PREFIX}"
        if prefix not in text:
            return ""
        # One pass for the names (not one scan of the whole text per set in the kernel).
        declared = {
            AFFINITY_PREFIX + m
            for m in re.findall(rf"^{re.escape(prefix)}(\S+) ", text, flags=re.MULTILINE)
        }
        proc = subprocess.run(
            [nft_path(), "-j", "list", "sets", "table", fam, table],
            capture_output=True,
            text=True,
            timeout=NFT_TIMEOUT,
            check=False,
        )
        if proc.returncode != 0:
            return ""  # no table yet: nothing to carry
        try:
            items = json.loads(proc.stdout)["nftables"]
        except (ValueError, KeyError, TypeError):
            log.warning("nft -j list sets: unreadable output; affinity entries not kept")
            return ""
        lines = []
        for item in items:
            s = item.get("set") if isinstance(item, dict) else None
            if not isinstance(s, dict):
                continue
            name = str(s.get("name", ""))
            if name not in declared:
                continue
            elems = []
            for e in s.get("elem", []):
                d = e.get("elem") if isinstance(e, dict) else None
                if not isinstance(d, dict):
                    continue
                val, left = d.get("val"), d.get("expires")
                timeout = d.get("timeout", s.get("timeout"))
                if isinstance(val, str) and isinstance(left, int) and left > 0 and timeout:
                    elems.append(f"{val} timeout {timeout}s expires {min(left, timeout)}s")
            if elems:
                lines.append(f"add element {fam} {table} {name} {{ {', '.join(elems)} }}\n")
        return "".join(lines)

    def sync(self, model: Any, full: bool) -> SyncResult:
        result = SyncResult(full=full, changed=False)
        now = time.monotonic()
        for family, renderer in self.renderers.items():
            do_full = full or renderer.needs_full
            if not do_full and now - self._checked[family] >= self.cfg.sync_period:
                self._checked[family] = now
                if self.drifted(family):
                    do_full = True
            t0 = time.monotonic()
            text, meta_json = renderer.render(model, do_full)
            meta = json.loads(meta_json)
            render_s = time.monotonic() - t0
            stats = meta["stats"]
            result.full = result.full or stats["full"]
            t1 = time.monotonic()
            carried = self.affinity_carried(family, text) if text and stats["full"] else ""
            if carried:
                text += carried
            if text:
                try:
                    run_nft(text)
                except SyncError:
                    renderer.abort()
                    metrics.NFTABLES_SYNC_FAILURES_TOTAL.inc()
                    raise
                result.changed = True
            renderer.commit()
            if stats["full"]:
                self._checked[family] = time.monotonic()
            stats["render_seconds"] = render_s
            stats["nft_seconds"] = time.monotonic() - t1
            stats["nft_bytes"] = len(text)
            result.stats[f"ipv{family}"] = stats
            metrics.SYNC_PROXY_RULES_NO_LOCAL_ENDPOINTS_TOTAL.labels("internal").set(
                stats["no_local_endpoints_internal"]
            )
            metrics.SYNC_PROXY_RULES_NO_LOCAL_ENDPOINTS_TOTAL.labels("external").set(
                stats["no_local_endpoints_external"]
            )
            for spn, value in meta["unsupported_algorithms"]:
                if (spn, value) not in self._warned_algorithms:
                    self._warned_algorithms.add((spn, value))
                    log.warning(
                        "%s: kproxy.io/lb-algorithm %r cannot be expressed in nftables "
                        "(random, round-robin, source-hash); using random",
                        spn,
                        value,
                    )
            for hc in meta["health_checks"]:
                result.health_checks[hc["port"]] = (hc["service"], hc["local_endpoints"])
            if meta["conntrack"]:
                conntrack.clear(meta["conntrack"])
        return result

    def cleanup(self) -> bool:
        return self.cleanup_static()

    @staticmethod
    def cleanup_static() -> bool:
        """Delete the `kube-proxy` tables of both families (one transaction, no
        listing); True when something failed."""
        if shutil.which("nft") is None:
            return False
        failed = False
        text = _core.nftables_cleanup()
        # One transaction per family: a kernel without IPv6 must not fail the IPv4 one.
        for family in ("ip", "ip6"):
            part = "".join(ln + "\n" for ln in text.splitlines() if ln.split()[2:3] == [family])
            try:
                run_nft(part)
            except SyncError as e:
                if "not supported" in str(e):
                    continue
                log.error("nftables cleanup failed: %s", e)
                metrics.NFTABLES_CLEANUP_FAILURES_TOTAL.inc()
                failed = True
        return failed
