"""Deterministic synthetic clusters: N ClusterIP Services x M endpoints each.

Every Service `bench/svc-NNNNN` has one TCP port (80 -> 8080) and one EndpointSlice
`bench/svc-NNNNN-x1` holding M ready endpoints, alternating between node1 (local) and
node2 (remote). Service IPs come from SERVICE_CIDR, endpoint IPs from CLUSTER_CIDR, both
large enough for a million objects, so the same index always yields the same objects.

`python -m bench gen --services N --endpoints M -o FILE` writes them as a multi-document
YAML file usable with `kproxy --manifests FILE`."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

NAMESPACE = "bench"
SERVICE_CIDR = "10.96.0.0/12"
CLUSTER_CIDR = "10.128.0.0/10"
# Replacement addresses for one-endpoint changes, disjoint from every generated endpoint.
SPARE_CIDR = "10.64.0.0/12"
NODE_NAME = "node1"
NODE_IP = "172.18.0.2"
PORT = 80
TARGET_PORT = 8080

_SERVICE_BASE = int(ipaddress.IPv4Network(SERVICE_CIDR).network_address)
_ENDPOINT_BASE = int(ipaddress.IPv4Network(CLUSTER_CIDR).network_address)
_SPARE_BASE = int(ipaddress.IPv4Network(SPARE_CIDR).network_address)
MAX_SERVICES = ipaddress.IPv4Network(SERVICE_CIDR).num_addresses - 2


def service_name(index: int) -> str:
    return f"svc-{index:05d}"


def slice_name(index: int) -> str:
    return f"{service_name(index)}-x1"


def service_key(index: int) -> str:
    """The model key ("namespace/name") of Service `index`."""
    return f"{NAMESPACE}/{service_name(index)}"


def slice_key(index: int) -> str:
    """The model key of Service `index`'s EndpointSlice."""
    return f"{NAMESPACE}/{slice_name(index)}"


def cluster_ip(index: int) -> str:
    return str(ipaddress.IPv4Address(_SERVICE_BASE + 1 + index))


def endpoint_ip(index: int, endpoint: int, endpoints_per_service: int) -> str:
    return str(ipaddress.IPv4Address(_ENDPOINT_BASE + 1 + index * endpoints_per_service + endpoint))


def spare_ip(change: int) -> str:
    """The address a one-endpoint change puts in place of an existing endpoint."""
    return str(ipaddress.IPv4Address(_SPARE_BASE + 1 + change))


def service(index: int) -> dict[str, Any]:
    """A v1 ClusterIP Service with one TCP port."""
    if not 0 <= index < MAX_SERVICES:
        raise ValueError(f"service index {index} outside 0..{MAX_SERVICES - 1}")
    ip = cluster_ip(index)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(index), "namespace": NAMESPACE},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "selector": {"app": service_name(index)},
            "ports": [{"name": "http", "protocol": "TCP", "port": PORT, "targetPort": TARGET_PORT}],
        },
    }


def _endpoint(address: str, node: str, pod: str) -> dict[str, Any]:
    return {
        "addresses": [address],
        "conditions": {"ready": True, "serving": True, "terminating": False},
        "nodeName": node,
        "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": pod},
    }


def endpoint_slice(index: int, endpoints: int, change: int | None = None) -> dict[str, Any]:
    """A discovery.k8s.io/v1 EndpointSlice for Service `index` with `endpoints` ready
    endpoints. With `change`, the last endpoint is replaced by `spare_ip(change)`: one
    endpoint removed and one added, as when a pod is rescheduled."""
    eps = []
    for j in range(endpoints):
        address = endpoint_ip(index, j, endpoints)
        pod = f"{service_name(index)}-{j}"
        if change is not None and j == endpoints - 1:
            address = spare_ip(change)
            pod = f"{pod}-c{change}"
        eps.append(_endpoint(address, "node1" if j % 2 == 0 else "node2", pod))
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name(index),
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": service_name(index)},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": TARGET_PORT}],
        "endpoints": eps,
    }


def objects(services: int, endpoints: int) -> Iterator[dict[str, Any]]:
    """Service 0, its slice, Service 1, its slice, ... (deterministic)."""
    if services < 0 or endpoints < 0:
        raise ValueError("services and endpoints must be >= 0")
    if services > MAX_SERVICES:
        raise ValueError(f"at most {MAX_SERVICES} services")
    for i in range(services):
        yield service(i)
        yield endpoint_slice(i, endpoints)


def write_manifests(path: str | Path, services: int, endpoints: int) -> Path:
    """Write the objects as one multi-document YAML file for `--manifests`."""
    out = Path(path)
    dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    with out.open("w", encoding="utf-8") as f:
        yaml.dump_all(objects(services, endpoints), f, Dumper=dumper, sort_keys=False)
    return out
