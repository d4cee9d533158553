"""The Prometheus text registry and kube-proxy's metric declarations."""

from __future__ import annotations

import re

import pytest

from kproxy import metrics
from kproxy.metrics import Counter, Gauge, Histogram, Registry, format_value

# (name, type, labels, help) as upstream pkg/proxy/metrics/metrics.go declares them
UPSTREAM = [
    (
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "histogram",
        (),
        "SyncProxyRules latency in seconds",
    ),
    (
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "histogram",
        (),
        "SyncProxyRules latency in seconds for full resyncs",
    ),
    (
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        "histogram",
        (),
        "SyncProxyRules latency in seconds for partial resyncs",
    ),
    (
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "gauge",
        (),
        "The last time proxy rules were successfully synced",
    ),
    (
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "gauge",
        (),
        "The last time a sync of proxy rules was queued",
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "gauge",
        (),
        "Pending proxy rules Endpoint changes",
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "counter",
        (),
        "Cumulative proxy rules Endpoint changes",
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "gauge",
        (),
        "Pending proxy rules Service changes",
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "counter",
        (),
        "Cumulative proxy rules Service changes",
    ),
    (
        "kubeproxy_sync_proxy_rules_iptables_total",
        "gauge",
        ("table",),
        "Total number of iptables rules owned by kube-proxy",
    ),
    (
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
        "counter",
        (),
        "Cumulative proxy iptables restore failures",
    ),
    (
        "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
        "counter",
        (),
        "Cumulative proxy iptables partial restore failures",
    ),
    (
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
        "counter",
        (),
        "Cumulative proxy nftables sync failures",
    ),
    (
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "gauge",
        ("traffic_policy",),
        "Number of services with a Local traffic policy and no endpoints",
    ),
    (
        "kubeproxy_network_programming_duration_seconds",
        "histogram",
        (),
        "In Cluster Network Programming Latency in seconds",
    ),
    ("kubeproxy_proxy_healthz_total", "counter", ("code",), "Cumulative proxy healthz HTTP status"),
    ("kubeproxy_proxy_livez_total", "counter", ("code",), "Cumulative proxy livez HTTP status"),
]


@pytest.mark.parametrize(("name", "type_name", "labels", "help_text"), UPSTREAM)
def test_upstream_metric_declared(
    name: str, type_name: str, labels: tuple[str, ...], help_text: str
) -> None:
    m = metrics.REGISTRY.get(name)
    assert m.type_name == type_name
    assert m.labelnames == labels
    assert m.help == help_text
    assert m.stability == "ALPHA"


def test_kproxy_invalid_objects_metric() -> None:
    m = metrics.REGISTRY.get("kproxy_invalid_objects_total")
    assert isinstance(m, Counter)
    assert m.labelnames == ("kind",)
    before = metrics.INVALID_OBJECTS_TOTAL.value(kind="Service")
    metrics.INVALID_OBJECTS_TOTAL.labels(kind="Service").inc()
    assert metrics.INVALID_OBJECTS_TOTAL.value(kind="Service") == before + 1
    text = metrics.REGISTRY.render()
    assert "# TYPE kproxy_invalid_objects_total counter" in text
    assert re.search(r'^kproxy_invalid_objects_total\{kind="Service"\} \d+$', text, re.M)


def test_upstream_bucket_layouts() -> None:
    sync = metrics.SYNC_PROXY_RULES_LATENCY.buckets
    assert len(sync) == 15
    assert sync[0] == pytest.approx(0.001)
    assert sync[-1] == pytest.approx(16.384)
    net = metrics.NETWORK_PROGRAMMING_LATENCY.buckets
    assert net[:4] == (0.0, 0.25, 0.5, 1.0)
    assert net[-1] == 300.0
    assert 59.0 in net and 115.0 in net and 150.0 in net
    assert len(net) == 1 + 2 + 59 + 12 + 7


def test_render_counter_and_gauge_text_format() -> None:
    reg = Registry()
    c = Counter("a_total", "Counts things", ["code"], registry=reg)
    g = Gauge("b", "A level", stability=None, registry=reg)
    c.labels(code="200").inc()
    c.labels("503").inc(2)
    g.set(1.5)
    assert reg.render() == (
        "# HELP a_total [ALPHA] Counts things\n"
        "# TYPE a_total counter\n"
        'a_total{code="200"} 1\n'
        'a_total{code="503"} 2\n'
        "# HELP b A level\n"
        "# TYPE b gauge\n"
        "b 1.5\n"
    )


def test_labelled_metric_without_samples_is_omitted_unlabelled_is_zero() -> None:
    reg = Registry()
    Counter("x_total", "x", ["kind"], registry=reg)
    Counter("y_total", "y", registry=reg)
    text = reg.render()
    assert "x_total" not in text
    assert "y_total 0\n" in text


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    reg = Registry()
    h = Histogram("lat_seconds", "Latency", buckets=[0.1, 1, 10], registry=reg)
    for v in (0.05, 0.1, 0.5, 5, 50):
        h.observe(v)
    lines = [ln for ln in reg.render().splitlines() if not ln.startswith("#")]
    assert lines == [
        'lat_seconds_bucket{le="0.1"} 2',
        'lat_seconds_bucket{le="1"} 3',
        'lat_seconds_bucket{le="10"} 4',
        'lat_seconds_bucket{le="+Inf"} 5',
        "lat_seconds_sum 55.65",
        "lat_seconds_count 5",
    ]
    assert h.count() == 5


def test_label_values_are_escaped() -> None:
    reg = Registry()
    c = Counter("e_total", "e", ["v"], registry=reg)
    c.labels(v='a"b\\c\nd').inc()
    assert 'e_total{v="a\\"b\\\\c\\nd"} 1' in reg.render()


def test_misuse_is_rejected() -> None:
    reg = Registry()
    c = Counter("c_total", "c", ["code"], registry=reg)
    with pytest.raises(ValueError):
        c.inc()  # labelled metric needs labels
    with pytest.raises(ValueError):
        c.labels(other="x")
    with pytest.raises(ValueError):
        c.labels("1").inc(-1)
    with pytest.raises(ValueError):
        Counter("c_total", "again", registry=reg)


def test_format_value() -> None:
    assert format_value(3) == "3"
    assert format_value(0.25) == "0.25"
    assert format_value(float("inf")) == "+Inf"
    assert format_value(1e-05) == "1e-05"


def test_default_registry_renders_parseable_text() -> None:
    metrics.SYNC_PROXY_RULES_LATENCY.observe(0.002)
    text = metrics.REGISTRY.render()
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? \S+$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert 'kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.002"}' in text
