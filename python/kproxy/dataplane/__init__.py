"""Dataplane backends: one per proxy mode, all behind `Backend`.

A backend takes the full desired state (the Rust model plus node facts) and programs
only what changed; `cleanup` removes everything it could ever have created."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from kproxy import _core
from kproxy.node import NodeInfo


@dataclass
class SyncResult:
    full: bool
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    #: hc node port -> (service "ns/name", local ready endpoint count)
    health_checks: dict[int, tuple[str, int]] = field(default_factory=dict)


class Backend(Protocol):
    mode: str

    def set_node(self, node: NodeInfo) -> None:
        """Node facts changed (labels, IPs): the next sync is full."""

    def sync(self, model: _core.Model, full: bool) -> SyncResult:
        """Program the desired state; raises SyncError on failure (retried as full)."""

    def cleanup(self) -> bool:
        """Remove everything this mode creates; True when something failed."""
