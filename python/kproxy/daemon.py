"""The daemon: sources -> change tracking -> the Rust model -> one dataplane backend,
driven by a bounded-frequency sync runner, with upstream's health and metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from kproxy import _core, metrics
from kproxy.config import ProxyConfig
from kproxy.dataplane import Backend
from kproxy.errors import KproxyError, ObjectError
from kproxy.healthcheck import ServiceHealthServer
from kproxy.node import NodeInfo, from_node_object
from kproxy.runner import BoundedFrequencyRunner
from kproxy.server import ProxyHealthState
from kproxy.sources import Event, Kind
from kproxy.tracker import ChangeTracker

log = logging.getLogger("kproxy")

#: Upstream forces a full resync at least this often (proxyutil.FullSyncPeriod).
FULL_SYNC_PERIOD = 3600.0
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"


def _trigger_time(obj: dict[str, Any] | None) -> float | None:
    if not obj:
        return None
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(TRIGGER_TIME_ANNOTATION)
    if not isinstance(raw, str):
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Proxier:
    """Implements the source Handler; owns the model. Only the runner's thread syncs."""

    def __init__(
        self,
        cfg: ProxyConfig,
        backend: Backend,
        node: NodeInfo,
        health: ProxyHealthState,
        service_health: ServiceHealthServer | None = None,
        on_node_change: Callable[[NodeInfo, NodeInfo], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self.node = node
        self.health = health
        self.service_health = service_health
        self.on_node_change = on_node_change
        self.tracker = ChangeTracker()
        self.model = _core.Model()
        self._synced: set[Kind] = set()
        self.initialized = threading.Event()
        self.need_full = True
        self.last_full = -FULL_SYNC_PERIOD
        self.syncs = 0
        self.last_result: Any = None
        self._trigger_times: list[float] = []
        self._lock = threading.Lock()
        self._pending_node: NodeInfo | None = None
        self.runner = BoundedFrequencyRunner(
            "sync-runner",
            self.sync_proxy_rules,
            min_interval=cfg.min_sync_period,
            max_interval=max(cfg.sync_period, cfg.min_sync_period),
            burst=2,
        )

    # -- Handler ------------------------------------------------------------------------

    def on_events(self, events: list[Event]) -> None:
        changed = False
        for ev in events:
            if ev.kind == "Node":
                self._on_node(ev)
                continue
            if self.tracker.update(ev):
                changed = True
                if ev.kind == "Service":
                    metrics.SERVICE_CHANGES_TOTAL.inc()
                else:
                    metrics.ENDPOINT_CHANGES_TOTAL.inc()
                    t = _trigger_time(ev.obj)
                    if t is not None:
                        with self._lock:
                            self._trigger_times.append(t)
        metrics.SERVICE_CHANGES_PENDING.set(self.tracker.pending("Service"))
        metrics.ENDPOINT_CHANGES_PENDING.set(self.tracker.pending("EndpointSlice"))
        if changed and self.initialized.is_set():
            self.queue_sync()

    def on_synced(self, kind: Kind) -> None:
        self._synced.add(kind)
        if {"Service", "EndpointSlice"} <= self._synced and not self.initialized.is_set():
            self.initialized.set()
            self.queue_sync()

    def _on_node(self, ev: Event) -> None:
        if ev.key != self.node.name:
            return
        new = from_node_object(self.node.name, ev.obj, list(self.node.ips))
        self.health.set_node_deleting(new.deleting or ev.obj is None)
        if new == self.node:
            return
        old, self.node = self.node, new
        log.info("node %s changed: zone %s -> %s", new.name, old.zone, new.zone)
        if self.on_node_change is not None:
            self.on_node_change(old, new)
        with self._lock:
            self.need_full = True
            self._pending_node = new
        self.queue_sync()

    # -- syncing ------------------------------------------------------------------------

    def queue_sync(self) -> None:
        self.health.queued_update()
        metrics.SYNC_PROXY_RULES_LAST_QUEUED_TIMESTAMP.set(time.time())
        self.runner.run()

    def _apply_changes(self) -> None:
        for kind, key, text, _obj in self.tracker.drain():
            try:
                if kind == "Service":
                    warnings = self.model.set_service(key, text)
                else:
                    warnings = self.model.set_endpoint_slice(key, text)
            except ObjectError as e:
                # The model keeps the previous state of this object: a bad update never
                # removes the rules of a Service that worked.
                log.error("%s; skipped, its previous rules are kept", e)
                metrics.INVALID_OBJECTS_TOTAL.labels(kind).inc()
                self.tracker.forget(kind, key)
                continue
            for w in warnings:
                log.warning("%s", w)
                metrics.INVALID_OBJECTS_TOTAL.labels(kind).inc()

    def sync_proxy_rules(self) -> None:
        if not self.initialized.is_set():
            log.debug("not syncing until Services and EndpointSlices are received")
            return
        start = time.monotonic()
        self._apply_changes()
        metrics.SERVICE_CHANGES_PENDING.set(self.tracker.pending("Service"))
        metrics.ENDPOINT_CHANGES_PENDING.set(self.tracker.pending("EndpointSlice"))
        with self._lock:
            node = self._pending_node
            self._pending_node = None
            triggers, self._trigger_times = self._trigger_times, []
        if node is not None:
            self.backend.set_node(node)
        full = self.need_full or (time.monotonic() - self.last_full) > FULL_SYNC_PERIOD
        try:
            result = self.backend.sync(self.model, full)
        except (KproxyError, OSError) as e:
            log.error("sync failed, retrying as a full sync: %s", e)
            self.need_full = True
            self.runner.retry_after(self.cfg.sync_period)
            return
        elapsed = time.monotonic() - start
        self.need_full = False
        if result.full:
            self.last_full = time.monotonic()
            metrics.SYNC_FULL_PROXY_RULES_LATENCY.observe(elapsed)
        else:
            metrics.SYNC_PARTIAL_PROXY_RULES_LATENCY.observe(elapsed)
        metrics.SYNC_PROXY_RULES_LATENCY.observe(elapsed)
        metrics.SYNC_PROXY_RULES_LAST_TIMESTAMP.set(time.time())
        now = time.time()
        for t in triggers:
            metrics.NETWORK_PROGRAMMING_LATENCY.observe(max(0.0, now - t))
        self.health.updated()
        self.syncs += 1
        self.last_result = result
        if self.service_health is not None:
            self.service_health.sync_services(
                {port: svc for port, (svc, _) in result.health_checks.items()}
            )
            self.service_health.sync_endpoints(
                {svc: n for _, (svc, n) in result.health_checks.items()}
            )
        log.log(
            logging.INFO if result.changed else logging.DEBUG,
            "sync done in %.1f ms (full=%s changed=%s) %s",
            elapsed * 1000,
            result.full,
            result.changed,
            result.stats,
        )
