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


class InitialState(Protocol):
    """What the daemon needs from a source before it starts: this node's object."""

    def node_object(self, name: str) -> dict[str, object] | None:
        """The Node named `name`, or None when the source has none."""


class StartableSource(Source, InitialState, Protocol):
    pass


def create_source(cfg: Any) -> StartableSource:
    """The one source of cluster state the configuration asks for (SPEC): manifests
    when --manifests is given, else the API server (--kubeconfig, --master, or
    in-cluster config)."""
    from kproxy.errors import ConfigError

    if cfg.manifests:
        from kproxy.sources.manifests import ManifestSource

        src = ManifestSource(list(cfg.manifests))
        src.poll()
        return src
    from kproxy.sources.apiserver import ApiServerSource, api_source_configured

    if api_source_configured(cfg):
        return ApiServerSource(cfg)
    raise ConfigError(
        "no source of cluster state: pass --manifests PATH, --kubeconfig PATH or --master "
        "URL (or run in a cluster, where KUBERNETES_SERVICE_HOST is set)"
    )
