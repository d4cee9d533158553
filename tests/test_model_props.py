"""Property tests of the model and the iptables renderer: after any sequence of
changes, the chains that partial syncs left in the (simulated) kernel equal what a
fresh full sync of the same objects writes."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from kproxy import _core

CONFIG = json.dumps(
    {
        "family": "v4",
        "node_name": "node1",
        "node_zone": "z1",
        "node_ips": ["172.18.0.2"],
        "local_detector": {"kind": "cidr", "cidrs": ["10.244.0.0/16"]},
    }
)

Tables = dict[str, dict[str, list[str]]]


def apply_restore(state: Tables, text: str) -> None:
    """iptables-restore --noflush semantics for what the renderer emits."""
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
            state.setdefault(table, {})
        elif line == "COMMIT":
            table = ""
        elif line.startswith(":"):
            state[table][line[1:].split()[0]] = []
        elif line.startswith("-A "):
            chain = line.split()[1]
            assert chain in state[table], f"append to undeclared chain {chain}"
            state[table][chain].append(line)
        elif line.startswith("-X "):
            state[table].pop(line.split()[1], None)
        elif line.startswith("-I "):
            state[table].setdefault(line.split()[1], []).insert(0, line)
        else:
            raise AssertionError(f"unexpected restore line {line!r}")


def service(i: int, kind: str, itp: bool, etp: bool, affinity: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "type": kind,
        "clusterIP": f"10.96.0.{i + 1}",
        "ports": [{"name": "p", "port": 80, "protocol": "UDP" if i % 3 == 0 else "TCP"}],
    }
    if kind != "ClusterIP":
        spec["ports"][0]["nodePort"] = 30000 + i
        spec["externalTrafficPolicy"] = "Local" if etp else "Cluster"
    if itp:
        spec["internalTrafficPolicy"] = "Local"
    if affinity:
        spec["sessionAffinity"] = "ClientIP"
    obj: dict[str, Any] = {"metadata": {"name": f"s{i}", "namespace": "ns"}, "spec": spec}
    if kind == "LoadBalancer":
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": f"192.0.2.{i + 1}"}]}}
        if i % 2:
            spec["loadBalancerSourceRanges"] = ["203.0.113.0/24", "172.18.0.0/24"]
    return obj


endpoint = st.fixed_dictionaries(
    {
        "ip": st.integers(1, 6),
        "node": st.sampled_from(["node1", "node2"]),
        "ready": st.booleans(),
        "serving": st.booleans(),
        "terminating": st.booleans(),
        "zone": st.sampled_from([None, "z1", "z2"]),
    }
)


def slice_obj(i: int, eps: list[dict[str, Any]]) -> dict[str, Any]:
    endpoints = []
    for e in eps:
        ep: dict[str, Any] = {
            "addresses": [f"10.244.{i}.{e['ip']}"],
            "nodeName": e["node"],
            "conditions": {
                "ready": e["ready"],
                "serving": e["serving"] or e["ready"],
                "terminating": e["terminating"],
            },
        }
        if e["zone"]:
            ep["hints"] = {"forZones": [{"name": e["zone"]}]}
        endpoints.append(ep)
    return {
        "metadata": {
            "name": f"s{i}-a",
            "namespace": "ns",
            "labels": {"kubernetes.io/service-name": f"s{i}"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "UDP" if i % 3 == 0 else "TCP"}],
        "endpoints": endpoints,
    }


change = st.one_of(
    st.tuples(
        st.just("svc"),
        st.integers(0, 5),
        st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]),
        st.booleans(),
        st.booleans(),
        st.booleans(),
    ),
    st.tuples(st.just("slice"), st.integers(0, 5), st.lists(endpoint, max_size=4)),
    st.tuples(st.just("del-svc"), st.integers(0, 5)),
    st.tuples(st.just("del-slice"), st.integers(0, 5)),
)


def apply_change(model: _core.Model, c: tuple[Any, ...]) -> None:
    if c[0] == "svc":
        _, i, kind, itp, etp, aff = c
        model.set_service(f"ns/s{i}", json.dumps(service(i, kind, itp, etp, aff)))
    elif c[0] == "slice":
        model.set_endpoint_slice(f"ns/s{c[1]}-a", json.dumps(slice_obj(c[1], c[2])))
    elif c[0] == "del-svc":
        model.set_service(f"ns/s{c[1]}", None)
    else:
        model.set_endpoint_slice(f"ns/s{c[1]}-a", None)


def ours(state: Tables) -> Tables:
    return {
        t: {c: r for c, r in chains.items() if c.startswith("KUBE-")} for t, chains in state.items()
    }


@given(st.lists(st.lists(change, min_size=1, max_size=4), min_size=1, max_size=6))
def test_partial_syncs_converge_to_full(batches: list[list[tuple[Any, ...]]]) -> None:
    model = _core.Model()
    renderer = _core.IptablesRenderer(CONFIG)
    kernel: Tables = {}
    for batch in batches:
        for c in batch:
            apply_change(model, c)
        text, _ = renderer.render(model, False, None)
        apply_restore(kernel, text)
        renderer.commit()
    fresh: Tables = {}
    text, _ = _core.IptablesRenderer(CONFIG).render(model, True, None)
    apply_restore(fresh, text)
    assert ours(kernel) == ours(fresh)


@given(st.lists(change, min_size=1, max_size=8))
def test_every_jump_target_exists(changes: list[tuple[Any, ...]]) -> None:
    model = _core.Model()
    for c in changes:
        apply_change(model, c)
    state: Tables = {}
    text, meta = _core.IptablesRenderer(CONFIG).render(model, True, None)
    apply_restore(state, text)
    builtin = {"ACCEPT", "DROP", "REJECT", "RETURN", "DNAT", "MARK", "MASQUERADE"}
    for table, chains in state.items():
        for rules in chains.values():
            for r in rules:
                if " -j " in r:
                    target = r.split(" -j ")[1].split()[0]
                    assert target in builtin or target in chains, f"{table}: {r}"
    # Every service port with a cluster IP is accounted for.
    assert json.loads(meta)["stats"]["service_ports"] == len(
        {c[1] for c in changes if c[0] == "svc"} - _deleted_after(changes)
    )


def _deleted_after(changes: list[tuple[Any, ...]]) -> set[int]:
    alive: dict[int, bool] = {}
    for c in changes:
        if c[0] == "svc":
            alive[c[1]] = True
        elif c[0] == "del-svc":
            alive[c[1]] = False
    return {i for i, a in alive.items() if not a}
