"""`python -m kproxy` / `kproxy`: the daemon's entry point (a drop-in for kube-proxy).

Exit codes (SPEC): 0 clean exit or cleanup done; 2 usage or configuration error;
1 any other fatal error."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

from kproxy.errors import ConfigError, KproxyError

if TYPE_CHECKING:
    from kproxy.sources.apiserver import ApiServerSource

log = logging.getLogger("kproxy")


def setup_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity >= 4 else logging.INFO if verbosity >= 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname).1s %(name)s] %(message)s",
        stream=sys.stderr,
    )


def cleanup_all(ipvs_exclude_cidrs: tuple[str, ...] = ()) -> int:
    from kproxy.dataplane import leftovers
    from kproxy.dataplane.iptables import IptablesBackend
    from kproxy.dataplane.ipvs import IpvsBackend
    from kproxy.dataplane.nftables import NftablesBackend

    failed = IptablesBackend.cleanup_static()
    failed |= NftablesBackend.cleanup_static()
    failed |= leftovers.remove_nft_tables()
    failed |= IpvsBackend.cleanup_static(ipvs_exclude_cidrs)
    failed |= leftovers.remove_ipvs_interface()
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    from kproxy import config

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config.load_config(args)
    except ConfigError as e:
        print(f"kproxy: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.verbosity)
    if cfg.write_config_to:
        try:
            config.write_config(cfg, cfg.write_config_to)
        except (OSError, KproxyError) as e:
            print(f"kproxy: --write-config-to: {e}", file=sys.stderr)
            return 1
        return 0
    if not sys.platform.startswith("linux"):
        print("kproxy: the daemon runs on Linux only", file=sys.stderr)
        return 1
    if cfg.cleanup:
        return cleanup_all(tuple(cfg.ipvs_exclude_cidrs))
    try:
        return run(cfg)
    except ConfigError as e:
        print(f"kproxy: {e}", file=sys.stderr)
        return 2
    except KproxyError as e:
        log.error("fatal: %s", e)
        return 1


def run(cfg: object) -> int:
    from kproxy import server
    from kproxy.config import ProxyConfig
    from kproxy.daemon import Proxier
    from kproxy.dataplane import create_backend, leftovers
    from kproxy.healthcheck import ServiceHealthServer
    from kproxy.node import NodeInfo, from_node_object, local_ips, nodeport_ips
    from kproxy.sources import create_source

    assert isinstance(cfg, ProxyConfig)
    source = create_source(cfg)
    node_name = cfg.node_name
    node = from_node_object(node_name, source.node_object(node_name), local_ips())
    log.info(
        "node %s: IPs %s, pod CIDRs %s, zone %s", node.name, node.ips, node.pod_cidrs, node.zone
    )
    families = (4, 6) if node.ips_of(6) or any(":" in c for c in cfg.cluster_cidrs) else (4,)
    backend = create_backend(cfg, node, families)
    leftovers.remove_other_modes(cfg.mode)

    api_source = _api_source(source)
    health = server.ProxyHealthState(health_timeout=cfg.health_timeout)
    if api_source is not None:
        from kproxy.sources.apiserver import ApiHealthState

        health = api_source.health = ApiHealthState(health_timeout=cfg.health_timeout)
    servers = server.start(cfg, health)
    hc_ips = nodeport_ips(tuple(cfg.nodeport_addresses), node) or []
    stop = threading.Event()
    restart = threading.Event()
    service_health = ServiceHealthServer(hc_ips, health)
    if api_source is not None:
        from kproxy.sources.apiserver import RecordingServiceHealthServer

        recorder = api_source.recorder
        service_health = RecordingServiceHealthServer(hc_ips, health, recorder)
        recorder.event(recorder.node_ref(), "Normal", "Starting", "StartKubeProxy")

    def on_node_change(old: NodeInfo, new: NodeInfo) -> None:
        # Upstream's NodeManager: node IPs (and, with detect-local-mode NodeCIDR, pod
        # CIDRs) are fixed for the process's life; a change exits so that the kubelet
        # restarts kube-proxy with the new values. A deleted Node keeps its old IPs here.
        watch_cidrs = cfg.detect_local_mode == "NodeCIDR"
        if new.ips != old.ips or (watch_cidrs and new.pod_cidrs and new.pod_cidrs != old.pod_cidrs):
            log.error(
                "node %s: IPs %s -> %s, pod CIDRs %s -> %s; exiting to restart",
                new.name, old.ips, new.ips, old.pod_cidrs, new.pod_cidrs,
            )  # fmt: skip
            restart.set()
            stop.set()

    proxier = Proxier(cfg, backend, node, health, service_health, on_node_change)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received signal %d, exiting (rules stay in place)", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    health.updated()  # as upstream's SyncLoop: healthy until a queued update goes stale
    threads = [
        threading.Thread(target=proxier.runner.loop, args=(stop,), name="sync", daemon=True),
        threading.Thread(target=source.run, args=(proxier, stop), name="source", daemon=True),
    ]
    for t in threads:
        t.start()
    while not stop.wait(0.5):
        if not all(t.is_alive() for t in threads):
            log.error("a worker thread died; exiting")
            servers.close()
            service_health.close()
            return 1
    for t in threads:
        t.join(timeout=4.0)
    servers.close()
    service_health.close()
    return 1 if restart.is_set() else 0


def _api_source(source: object) -> ApiServerSource | None:
    from kproxy.sources.apiserver import ApiServerSource

    return source if isinstance(source, ApiServerSource) else None
