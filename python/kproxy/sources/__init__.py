"""Sources of cluster state: each yields object events for Services, EndpointSlices
and Nodes. Exactly one source feeds a daemon (manifests or the API server)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Kind = Literal["Service", "EndpointSlice", "Node"]
KINDS: tuple[Kind, ...] = ("Service", "EndpointSlice", "Node")


@dataclass(frozen=True)
class Event:
    """One object set (obj is the API JSON as a dict) or deleted (obj is None)."""

    kind: Kind
    key: str
    obj: dict[str, Any] | None


class Handler(Protocol):
    def on_events(self, events: list[Event]) -> None:
        """A batch of changes."""

    def on_synced(self, kind: Kind) -> None:
        """The first full list of `kind` has been delivered (upstream's OnXSynced)."""


class Source(Protocol):
    def run(self, handler: Handler, stop: threading.Event) -> None:
        """Deliver events until `stop` is set."""


def object_key(obj: dict[str, Any]) -> str:
    """'namespace/name' (cluster-scoped objects: just 'name')."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name", ""))
    if obj.get("kind") == "Node":
        return name
    return f"{meta.get('namespace') or 'default'}/{name}"


LogFn = Callable[[str], None]
