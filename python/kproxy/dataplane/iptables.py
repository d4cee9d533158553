"""iptables mode: the Rust core renders upstream's chain layout, one
`iptables-restore --noflush` per family applies a sync.

Both iptables backends work: the one the host already uses is detected the way
upstream's iptables-wrapper does (whichever holds more rules, preferring nft on a
tie), or forced with KPROXY_IPTABLES_BACKEND=legacy|nft."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kproxy import _core, conntrack, metrics
from kproxy.dataplane import SyncResult, local_detector
from kproxy.errors import ConfigError, SyncError
from kproxy.node import NodeInfo, nodeport_ips

log = logging.getLogger("kproxy.iptables")

ROUTE_LOCALNET = Path("/proc/sys/net/ipv4/conf/all/route_localnet")
CANARY = "KUBE-PROXY-CANARY"
TCP_BE_LIBERAL = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")


@dataclass(frozen=True)
class Tools:
    """The iptables commands of one family on the chosen backend."""

    family: int
    backend: str  # "legacy" or "nft"

    def _cmd(self, what: str) -> str:
        base = "iptables" if self.family == 4 else "ip6tables"
        name = f"{base}-{self.backend}{what}"
        path = shutil.which(name)
        if path is None:
            raise SyncError(f"{name} not found: install the iptables package")
        return path

    @property
    def restore(self) -> str:
        return self._cmd("-restore")

    @property
    def save(self) -> str:
        return self._cmd("-save")

    @property
    def iptables(self) -> str:
        return self._cmd("")


def _count_rules(cmd: str) -> int:
    path = shutil.which(cmd)
    if path is None:
        return -1
    try:
        out = subprocess.run([path], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return -1
    if out.returncode != 0:
        return -1
    return sum(1 for line in out.stdout.splitlines() if line.startswith("-A ") or "KUBE-" in line)


def detect_backend() -> str:
    forced = os.environ.get("KPROXY_IPTABLES_BACKEND", "").strip()
    if forced:
        if forced not in ("legacy", "nft"):
            raise ConfigError(f"KPROXY_IPTABLES_BACKEND: {forced!r} is not legacy or nft")
        return forced
    legacy = _count_rules("iptables-legacy-save") + _count_rules("ip6tables-legacy-save")
    nft = _count_rules("iptables-nft-save") + _count_rules("ip6tables-nft-save")
    if nft < 0 and legacy >= 0:
        return "legacy"
    return "legacy" if legacy > nft else "nft"


def run_restore(tools: Tools, text: str) -> None:
    proc = subprocess.run(
        [tools.restore, "--noflush", "-w", "5"],
        input=text,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise SyncError(f"{Path(tools.restore).name} failed: {_explain(proc.stderr, text)}")


def _explain(stderr: str, text: str) -> str:
    """iptables-restore names a line number; quote the line."""
    msg = stderr.strip()
    import re

    m = re.search(r"line:? (\d+)", msg)
    if m:
        lines = text.splitlines()
        n = int(m.group(1))
        if 0 < n <= len(lines):
            msg += f" (line {n}: {lines[n - 1]!r})"
    return msg


def run_save(tools: Tools) -> str:
    proc = subprocess.run([tools.save], capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise SyncError(f"{Path(tools.save).name} failed: {proc.stderr.strip()}")
    return proc.stdout


def _sysctl_read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def ensure_sysctl(path: Path, value: str) -> None:
    if _sysctl_read(path) == value:
        return
    try:
        path.write_text(value)
        log.info("set %s=%s", path, value)
    except OSError as e:
        log.error("cannot set %s=%s: %s", path, value, e)


class IptablesBackend:
    mode = "iptables"

    def __init__(self, cfg: Any, node: NodeInfo, families: tuple[int, ...] = (4,)) -> None:
        self.cfg = cfg
        self.node = node
        self.backend = detect_backend()
        self.families = families
        self.tools = {f: Tools(f, self.backend) for f in families}
        self.renderers: dict[int, Any] = {}
        self._last_drift_check = time.monotonic()
        for f in families:
            self.renderers[f] = _core.IptablesRenderer(json.dumps(self.render_config(f)))
        log.info("iptables mode on the %s backend, families %s", self.backend, families)
        if self.renderers.get(4) is not None and self.localhost_nodeports():
            ensure_sysctl(ROUTE_LOCALNET, "1")

    def localhost_nodeports(self) -> bool:
        if not self.cfg.iptables_localhost_nodeports:
            return False
        spec = self.cfg.nodeport_addresses
        if not spec:
            return True
        ips = nodeport_ips(tuple(spec), self.node) or []
        return any(ip.startswith("127.") for ip in ips)

    def render_config(self, family: int) -> dict[str, Any]:
        spec = tuple(self.cfg.nodeport_addresses)
        return {
            "family": "v4" if family == 4 else "v6",
            "node_name": self.node.name,
            "node_zone": self.node.zone,
            "node_ips": list(self.node.ips),
            "masquerade_bit": self.cfg.iptables_masquerade_bit,
            "masquerade_all": self.cfg.masquerade_all,
            "local_detector": local_detector(self.cfg, self.node),
            "nodeport_addresses": nodeport_ips(spec, self.node) if spec else None,
            "localhost_nodeports": self.cfg.iptables_localhost_nodeports,
            "conntrack_tcp_liberal": _sysctl_read(TCP_BE_LIBERAL) not in (None, "0"),
            "random_fully": True,
        }

    def set_node(self, node: NodeInfo) -> None:
        if node == self.node:
            return
        self.node = node
        for f, r in self.renderers.items():
            r.set_config(json.dumps(self.render_config(f)))

    def canary_present(self, family: int) -> bool:
        """False when someone flushed our tables since the last full sync."""
        tools = self.tools[family]
        for table in ("nat", "filter"):
            proc = subprocess.run(
                [tools.iptables, "-w", "5", "-t", table, "-S", CANARY],
                capture_output=True,
                timeout=60,
                check=False,
            )
            if proc.returncode != 0:
                return False
        return True

    def sync(self, model: Any, full: bool) -> SyncResult:
        result = SyncResult(full=full, changed=False)
        check_drift = time.monotonic() - self._last_drift_check >= self.cfg.sync_period
        if check_drift:
            self._last_drift_check = time.monotonic()
        for family, renderer in self.renderers.items():
            tools = self.tools[family]
            do_full = full or renderer.needs_full
            if not do_full and check_drift and not self.canary_present(family):
                log.warning("KUBE-PROXY-CANARY is gone (tables flushed?): full sync")
                do_full = True
            saved = run_save(tools) if do_full else None
            t0 = time.monotonic()
            text, meta_json = renderer.render(model, do_full, saved)
            meta = json.loads(meta_json)
            render_s = time.monotonic() - t0
            stats = meta["stats"]
            result.full = result.full or stats["full"]
            if text:
                try:
                    run_restore(tools, text)
                except SyncError:
                    renderer.abort()
                    metrics.IPTABLES_RESTORE_FAILURES_TOTAL.inc()
                    if not stats["full"]:
                        metrics.IPTABLES_PARTIAL_RESTORE_FAILURES_TOTAL.inc()
                    raise
                result.changed = True
            renderer.commit()
            stats["render_seconds"] = render_s
            stats["restore_bytes"] = len(text)
            result.stats[f"ipv{family}"] = stats
            metrics.IPTABLES_RULES_TOTAL.labels("filter").set(stats["filter_rules"])
            metrics.IPTABLES_RULES_TOTAL.labels("nat").set(stats["nat_rules"])
            metrics.SYNC_PROXY_RULES_NO_LOCAL_ENDPOINTS_TOTAL.labels("internal").set(
                stats["no_local_endpoints_internal"]
            )
            metrics.SYNC_PROXY_RULES_NO_LOCAL_ENDPOINTS_TOTAL.labels("external").set(
                stats["no_local_endpoints_external"]
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
        """Remove kproxy's (and kube-proxy's) iptables chains and jumps on both backends
        and families; True when something failed."""
        failed = False
        for family in (4, 6):
            for backend in ("legacy", "nft"):
                tools = Tools(family, backend)
                try:
                    saved = run_save(tools)
                except SyncError as e:
                    log.debug("skip cleanup on %s/%s: %s", backend, family, e)
                    continue
                text = _core.iptables_cleanup(saved)
                if not text:
                    continue
                try:
                    run_restore(tools, text)
                except SyncError as e:
                    log.error("cleanup failed: %s", e)
                    failed = True
        return failed
