"""A small Prometheus text-format registry, and kube-proxy's metrics.

No dependency: kproxy exposes a handful of counters, gauges and histograms, and the
text exposition format (version 0.0.4) is simple. The module-level metrics carry
upstream's names, types, labels and help text (``pkg/proxy/metrics/metrics.go``); as
Kubernetes' component-base does, ALPHA metrics render their help with an ``[ALPHA]``
prefix.

Usage::

    from kproxy import metrics
    metrics.SYNC_PROXY_RULES_LATENCY.observe(0.012)
    metrics.PROXY_HEALTHZ_TOTAL.labels(code="200").inc()
    text = metrics.REGISTRY.render()
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Generic, TypeVar

__all__ = [
    "CONTENT_TYPE",
    "ENDPOINT_CHANGES_PENDING",
    "ENDPOINT_CHANGES_TOTAL",
    "INVALID_OBJECTS_TOTAL",
    "IPTABLES_PARTIAL_RESTORE_FAILURES_TOTAL",
    "IPTABLES_RESTORE_FAILURES_TOTAL",
    "IPTABLES_RULES_LAST_SYNC",
    "IPTABLES_RULES_TOTAL",
    "NETWORK_PROGRAMMING_LATENCY",
    "NFTABLES_CLEANUP_FAILURES_TOTAL",
    "NFTABLES_SYNC_FAILURES_TOTAL",
    "PROXY_HEALTHZ_TOTAL",
    "PROXY_LIVEZ_TOTAL",
    "REGISTRY",
    "SERVICE_CHANGES_PENDING",
    "SERVICE_CHANGES_TOTAL",
    "SYNC_FULL_PROXY_RULES_LATENCY",
    "SYNC_PARTIAL_PROXY_RULES_LATENCY",
    "SYNC_PROXY_RULES_LAST_QUEUED_TIMESTAMP",
    "SYNC_PROXY_RULES_LAST_TIMESTAMP",
    "SYNC_PROXY_RULES_LATENCY",
    "SYNC_PROXY_RULES_NO_LOCAL_ENDPOINTS_TOTAL",
    "Counter",
    "Gauge",
    "Histogram",
    "Registry",
    "exponential_buckets",
    "linear_buckets",
]

#: the Content-Type of :meth:`Registry.render` output
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelValues = tuple[str, ...]


def format_value(value: float) -> str:
    """Format a sample value as Go's Prometheus client does (``1``, ``0.25``, ``+Inf``)."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _labels_text(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


def exponential_buckets(start: float, factor: float, count: int) -> list[float]:
    """``count`` buckets: start, start*factor, ... (Prometheus ExponentialBuckets)."""
    return [start * factor**i for i in range(count)]


def linear_buckets(start: float, width: float, count: int) -> list[float]:
    """``count`` buckets: start, start+width, ... (Prometheus LinearBuckets)."""
    return [start + width * i for i in range(count)]


_C = TypeVar("_C")


class _Metric(Generic[_C]):
    """Common part: name, help, label names and one child per label value tuple."""

    type_name = ""

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        stability: str | None = "ALPHA",
        registry: Registry | None = None,
    ) -> None:
        self.name = name
        self.help = help
        self.labelnames: tuple[str, ...] = tuple(labelnames)
        self.stability = stability
        self._lock = threading.Lock()
        self._children: dict[LabelValues, _C] = {}
        if not self.labelnames:
            # unlabelled metrics exist (with value 0) from the start, as in Go
            self._children[()] = self._new_child()
        if registry is not None:
            registry.register(self)

    def _new_child(self) -> _C:
        raise NotImplementedError

    def labels(self, *values: str, **kw: str) -> _C:
        """The child for these label values (positional, or by label name)."""
        if values and kw:
            raise ValueError("pass label values positionally or by name, not both")
        if kw:
            if set(kw) != set(self.labelnames):
                raise ValueError(f"{self.name}: labels must be {self.labelnames}, got {tuple(kw)}")
            values = tuple(str(kw[n]) for n in self.labelnames)
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
            return child

    def _unlabelled(self) -> _C:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}; use .labels(...)")
        return self._children[()]

    def clear(self) -> None:
        """Forget all children (unlabelled metrics go back to zero)."""
        with self._lock:
            self._children.clear()
            if not self.labelnames:
                self._children[()] = self._new_child()

    def _snapshot(self) -> list[tuple[LabelValues, _C]]:
        with self._lock:
            return sorted(self._children.items())

    def _header(self) -> list[str]:
        help_text = f"[{self.stability}] {self.help}" if self.stability else self.help
        return [
            f"# HELP {self.name} {_escape_help(help_text)}",
            f"# TYPE {self.name} {self.type_name}",
        ]

    def _samples(self) -> list[str]:
        raise NotImplementedError

    def render(self) -> str:
        """This metric in text format; empty when it has no samples (as Go omits it)."""
        samples = self._samples()
        if not samples:
            return ""
        return "\n".join(self._header() + samples) + "\n"


class _Value:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0.0

    def get(self) -> float:
        with self._lock:
            return self._value


class CounterChild(_Value):
    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter can only go up")
        with self._lock:
            self._value += amount


class GaugeChild(_Value):
    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value -= amount


class HistogramChild:
    def __init__(self, bounds: Sequence[float]) -> None:
        self._lock = threading.Lock()
        self._bounds = list(bounds)
        self._counts = [0] * (len(self._bounds) + 1)  # last one is +Inf
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        # a value equal to a bound falls in that bucket (le = less or equal)
        idx = bisect.bisect_left(self._bounds, value)
        with self._lock:
            self._counts[idx] += 1
            self._sum += value
            self._count += 1

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """(cumulative buckets incl. +Inf, sum, count)."""
        with self._lock:
            out: list[tuple[float, int]] = []
            running = 0
            for bound, n in zip([*self._bounds, math.inf], self._counts, strict=True):
                running += n
                out.append((bound, running))
            return out, self._sum, self._count


class Counter(_Metric[CounterChild]):
    """A monotonically increasing count."""

    type_name = "counter"

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled().inc(amount)

    def value(self, *values: str, **kw: str) -> float:
        """The current value (0 for label values never used); for tests and debugging."""
        key = tuple(str(kw[n]) for n in self.labelnames) if kw else tuple(values)
        with self._lock:
            child = self._children.get(key)
        return child.get() if child is not None else 0.0

    def _samples(self) -> list[str]:
        return [
            f"{self.name}{_labels_text(self.labelnames, k)} {format_value(c.get())}"
            for k, c in self._snapshot()
        ]


class Gauge(_Metric[GaugeChild]):
    """A value that can go up and down."""

    type_name = "gauge"

    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def set(self, value: float) -> None:
        self._unlabelled().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._unlabelled().dec(amount)

    def value(self, *values: str, **kw: str) -> float:
        """The current value (0 for label values never used)."""
        key = tuple(str(kw[n]) for n in self.labelnames) if kw else tuple(values)
        with self._lock:
            child = self._children.get(key)
        return child.get() if child is not None else 0.0

    def _samples(self) -> list[str]:
        return [
            f"{self.name}{_labels_text(self.labelnames, k)} {format_value(c.get())}"
            for k, c in self._snapshot()
        ]


class Histogram(_Metric[HistogramChild]):
    """Observations counted in cumulative buckets, with their sum and count."""

    type_name = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Iterable[float] = exponential_buckets(0.005, 2, 12),
        stability: str | None = "ALPHA",
        registry: Registry | None = None,
    ) -> None:
        bounds = sorted({float(b) for b in buckets} - {math.inf})
        if not bounds:
            raise ValueError(f"{name}: a histogram needs at least one bucket")
        self.buckets: tuple[float, ...] = tuple(bounds)
        super().__init__(name, help, labelnames, stability, registry)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.buckets)

    def observe(self, value: float) -> None:
        self._unlabelled().observe(value)

    def count(self, *values: str, **kw: str) -> int:
        """How many observations (0 for label values never used)."""
        key = tuple(str(kw[n]) for n in self.labelnames) if kw else tuple(values)
        with self._lock:
            child = self._children.get(key)
        return child.snapshot()[2] if child is not None else 0

    def _samples(self) -> list[str]:
        lines: list[str] = []
        names = self.labelnames
        for key, child in self._snapshot():
            buckets, total, count = child.snapshot()
            for bound, n in buckets:
                labels = _labels_text((*names, "le"), (*key, format_value(bound)))
                lines.append(f"{self.name}_bucket{labels} {n}")
            lines.append(f"{self.name}_sum{_labels_text(names, key)} {format_value(total)}")
            lines.append(f"{self.name}_count{_labels_text(names, key)} {count}")
        return lines


class Registry:
    """A set of metrics with unique names, rendered together in name order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, _Metric[Any]] = {}

    def register(self, metric: _Metric[Any]) -> None:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is already registered")
            self._metrics[metric.name] = metric

    def get(self, name: str) -> _Metric[Any]:
        with self._lock:
            return self._metrics[name]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._metrics)

    def render(self) -> str:
        """All metrics in the Prometheus text exposition format 0.0.4."""
        with self._lock:
            metrics = [self._metrics[n] for n in sorted(self._metrics)]
        return "".join(m.render() for m in metrics)


# ---------------------------------------------------------------------------------------
# kube-proxy's metrics (names, types, labels and help as upstream pkg/proxy/metrics)
# ---------------------------------------------------------------------------------------

#: the registry served on /metrics
REGISTRY = Registry()

_SYNC_BUCKETS = exponential_buckets(0.001, 2, 15)
# upstream merge() starts from a 0 bucket, then 0.25s, 0.5s, 1..59s, 60..115s, 2..5min
_NETWORK_PROGRAMMING_BUCKETS = [
    0.0,
    *linear_buckets(0.25, 0.25, 2),
    *linear_buckets(1, 1, 59),
    *linear_buckets(60, 5, 12),
    *linear_buckets(120, 30, 7),
]

SYNC_PROXY_RULES_LATENCY = Histogram(
    "kubeproxy_sync_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds",
    buckets=_SYNC_BUCKETS,
    registry=REGISTRY,
)
SYNC_FULL_PROXY_RULES_LATENCY = Histogram(
    "kubeproxy_sync_full_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds for full resyncs",
    buckets=_SYNC_BUCKETS,
    registry=REGISTRY,
)
SYNC_PARTIAL_PROXY_RULES_LATENCY = Histogram(
    "kubeproxy_sync_partial_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds for partial resyncs",
    buckets=_SYNC_BUCKETS,
    registry=REGISTRY,
)
SYNC_PROXY_RULES_LAST_TIMESTAMP = Gauge(
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "The last time proxy rules were successfully synced",
    registry=REGISTRY,
)
SYNC_PROXY_RULES_LAST_QUEUED_TIMESTAMP = Gauge(
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    "The last time a sync of proxy rules was queued",
    registry=REGISTRY,
)
NETWORK_PROGRAMMING_LATENCY = Histogram(
    "kubeproxy_network_programming_duration_seconds",
    "In Cluster Network Programming Latency in seconds",
    buckets=_NETWORK_PROGRAMMING_BUCKETS,
    registry=REGISTRY,
)
ENDPOINT_CHANGES_PENDING = Gauge(
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
    "Pending proxy rules Endpoint changes",
    registry=REGISTRY,
)
ENDPOINT_CHANGES_TOTAL = Counter(
    "kubeproxy_sync_proxy_rules_endpoint_changes_total",
    "Cumulative proxy rules Endpoint changes",
    registry=REGISTRY,
)
SERVICE_CHANGES_PENDING = Gauge(
    "kubeproxy_sync_proxy_rules_service_changes_pending",
    "Pending proxy rules Service changes",
    registry=REGISTRY,
)
SERVICE_CHANGES_TOTAL = Counter(
    "kubeproxy_sync_proxy_rules_service_changes_total",
    "Cumulative proxy rules Service changes",
    registry=REGISTRY,
)
#: a gauge despite the _total suffix, as upstream
IPTABLES_RULES_TOTAL = Gauge(
    "kubeproxy_sync_proxy_rules_iptables_total",
    "Total number of iptables rules owned by kube-proxy",
    ["table"],
    registry=REGISTRY,
)
IPTABLES_RULES_LAST_SYNC = Gauge(
    "kubeproxy_sync_proxy_rules_iptables_last",
    "Number of iptables rules written by kube-proxy in last sync",
    ["table"],
    registry=REGISTRY,
)
IPTABLES_RESTORE_FAILURES_TOTAL = Counter(
    "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
    "Cumulative proxy iptables restore failures",
    registry=REGISTRY,
)
IPTABLES_PARTIAL_RESTORE_FAILURES_TOTAL = Counter(
    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
    "Cumulative proxy iptables partial restore failures",
    registry=REGISTRY,
)
NFTABLES_SYNC_FAILURES_TOTAL = Counter(
    "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
    "Cumulative proxy nftables sync failures",
    registry=REGISTRY,
)
NFTABLES_CLEANUP_FAILURES_TOTAL = Counter(
    "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
    "Cumulative proxy nftables cleanup failures",
    registry=REGISTRY,
)
#: a gauge despite the _total suffix, as upstream; traffic_policy is "internal"/"external"
SYNC_PROXY_RULES_NO_LOCAL_ENDPOINTS_TOTAL = Gauge(
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
    "Number of services with a Local traffic policy and no endpoints",
    ["traffic_policy"],
    registry=REGISTRY,
)
PROXY_HEALTHZ_TOTAL = Counter(
    "kubeproxy_proxy_healthz_total",
    "Cumulative proxy healthz HTTP status",
    ["code"],
    registry=REGISTRY,
)
PROXY_LIVEZ_TOTAL = Counter(
    "kubeproxy_proxy_livez_total",
    "Cumulative proxy livez HTTP status",
    ["code"],
    registry=REGISTRY,
)
#: kproxy's own: objects skipped because they are invalid (kind: Service, EndpointSlice...)
INVALID_OBJECTS_TOTAL = Counter(
    "kproxy_invalid_objects_total",
    "Kubernetes objects skipped because they are invalid, by kind",
    ["kind"],
    stability=None,
    registry=REGISTRY,
)
