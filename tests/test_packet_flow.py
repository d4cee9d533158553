"""Packet-flow tests: the flow table of tests/flows.py against a real kernel.

One sandbox and one kproxy daemon per (mode, iptables backend); see flows.PROXY_CONFIGS.
"""

from __future__ import annotations

import time

import pytest

from flows import (
    FLOWS,
    PROXY_CONFIGS,
    RUNTIME_CHANGES,
    Flow,
    RuntimeChange,
    check_flow,
    for_mode,
)
from kproxy.sandbox import ConnectResult, Sandbox

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.parametrize(
        "mode,iptables_backend",
        PROXY_CONFIGS,
        scope="module",
        ids=[f"{m}-{b}" if b else m for m, b in PROXY_CONFIGS],
    ),
]

# How long a manifest change may take to reach the dataplane (file watch + sync).
CHANGE_DEADLINE = 30.0
RESEND_INTERVAL = 0.3


@pytest.mark.parametrize("flow", FLOWS, ids=[f.name for f in FLOWS])
def test_packet_flow(proxied: Sandbox, flow: Flow) -> None:
    check_flow(proxied, flow)


def test_metrics_report_mode(proxied: Sandbox, mode: str) -> None:
    status, body = proxied.http_get("node", "http://127.0.0.1:10249/proxyMode")
    assert (status, body.strip()) == (200, mode)


def test_health_check_node_port(proxied: Sandbox) -> None:
    # etp-local has one endpoint on node1: its healthCheckNodePort says 200.
    status, body = proxied.http_get("external", "http://172.18.0.2:32000/")
    assert status == 200, body
    # etp-local-remote-only has none here: 503 tells load balancers to avoid this node.
    status, body = proxied.http_get("external", "http://172.18.0.2:32001/")
    assert status == 503, body


def _send(sb: Sandbox, probe: Flow) -> ConnectResult:
    return sb.connect(
        probe.source, probe.protocol, probe.dst_ip, probe.dst_port, timeout=0.5, sport=probe.sport
    )


# Runs after the table (definition order): it changes the watched manifests, and puts
# them back before it returns.
@pytest.mark.parametrize("change", RUNTIME_CHANGES, ids=[c.name for c in RUNTIME_CHANGES])
def test_runtime_change_keeps_udp_source_port(
    proxied: Sandbox, change: RuntimeChange, mode: str
) -> None:
    for probe in change.probes:
        before = _send(proxied, probe)
        assert not before.answered, f"{probe.name}: answered before the change: {before}"
    proxied.write_manifest(change.manifest, change.objects)
    try:
        for probe in [for_mode(mode, p) for p in change.probes]:
            deadline = time.monotonic() + CHANGE_DEADLINE
            attempts: list[ConnectResult] = []
            for _ in range(int(CHANGE_DEADLINE / RESEND_INTERVAL)):
                attempts.append(_send(proxied, probe))
                if attempts[-1].answered or time.monotonic() > deadline:
                    break
                time.sleep(RESEND_INTERVAL)
            last = attempts[-1]
            assert last.answered, (
                f"{probe.name}: no answer {CHANGE_DEADLINE}s after the change "
                f"(stale conntrack entry?); last: {last}"
            )
            assert last.pod in probe.pods, f"{probe.name}: {last}"
            assert last.masqueraded == probe.masquerade, f"{probe.name}: {last}"
            assert last.local is not None
            assert last.local.endswith(f":{probe.sport}"), f"source port changed: {last}"
    finally:
        proxied.remove_manifest(change.manifest)
