"""The benchmark generator and the upstream partial-sync emulation (no kernel, no timing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import gen  # noqa: E402
from bench.restore_text import Tables, upstream_partial  # noqa: E402


def test_objects_are_deterministic_and_distinct() -> None:
    first = list(gen.objects(50, 3))
    assert first == list(gen.objects(50, 3))
    assert [o["kind"] for o in first[:4]] == ["Service", "EndpointSlice"] * 2
    services = [o for o in first if o["kind"] == "Service"]
    slices = [o for o in first if o["kind"] == "EndpointSlice"]
    assert len(services) == len(slices) == 50
    cluster_ips = {s["spec"]["clusterIP"] for s in services}
    assert len(cluster_ips) == 50
    addresses = [e["addresses"][0] for s in slices for e in s["endpoints"]]
    assert len(addresses) == len(set(addresses)) == 150
    for s in slices:
        svc = s["metadata"]["labels"]["kubernetes.io/service-name"]
        assert s["metadata"]["name"].startswith(svc)


def test_one_endpoint_change_replaces_exactly_one_address() -> None:
    before = gen.endpoint_slice(7, 2)
    after = gen.endpoint_slice(7, 2, change=3)
    old = [e["addresses"][0] for e in before["endpoints"]]
    new = [e["addresses"][0] for e in after["endpoints"]]
    assert old[0] == new[0]
    assert old[1] != new[1] == gen.spare_ip(3)
    assert before["metadata"] == after["metadata"]


def test_large_indexes_stay_in_range() -> None:
    last = gen.service(29999)
    assert last["spec"]["clusterIP"] == "10.96.117.48"
    assert gen.endpoint_ip(29999, 1, 2) == "10.128.234.96"


def test_manifests_file_loads_like_kproxy_manifests(tmp_path: Path) -> None:
    from kproxy.sources.manifests import load_objects

    path = gen.write_manifests(tmp_path / "bench.yaml", 20, 2)
    loaded = load_objects([path])
    assert ("Service", gen.service_key(19)) in loaded
    assert ("EndpointSlice", gen.slice_key(0)) in loaded
    assert len(loaded) == 40


def test_upstream_partial_shape() -> None:
    from kproxy import _core

    model = _core.Model()
    for obj in gen.objects(5, 2):
        key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
        setter = model.set_service if obj["kind"] == "Service" else model.set_endpoint_slice
        setter(key, json.dumps(obj))
    config = {
        "family": "v4",
        "node_name": gen.NODE_NAME,
        "node_ips": [gen.NODE_IP],
        "local_detector": {"kind": "cidr", "cidrs": [gen.CLUSTER_CIDR]},
    }
    renderer = _core.IptablesRenderer(json.dumps(config))
    text, _ = renderer.render(model, True)
    renderer.commit()
    tables = Tables()
    tables.apply(text)
    model.set_endpoint_slice(gen.slice_key(2), json.dumps(gen.endpoint_slice(2, 2, change=0)))
    partial, _ = renderer.render(model, False)
    tables.apply(partial)

    svc, _, _, _ = _core.service_chain_names(gen.NAMESPACE, gen.service_name(2), "http", "TCP")
    up = upstream_partial(tables, [svc])
    declared = [line[1:].split()[0] for line in up.splitlines() if line.startswith(":")]
    seps = tables.jump_targets("nat", svc, "KUBE-SEP-")
    assert len(seps) == 2
    assert "KUBE-SERVICES" in declared and "KUBE-MARK-MASQ" in declared
    assert svc in declared and all(s in declared for s in seps)
    # Only the changed Service's own chains, no jumps from built-in chains.
    assert sum(c.startswith("KUBE-SVC-") for c in declared) == 1
    assert not any(line.startswith("-I ") for line in up.splitlines())
    assert f"--to-destination {gen.spare_ip(0)}:{gen.TARGET_PORT}" in up
    assert up.count("COMMIT") == 2
