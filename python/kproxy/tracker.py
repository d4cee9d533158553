"""Change tracking: remembers {applied, pending} per object and drops no-op changes,
as upstream's ServiceChangeTracker and EndpointsChangeTracker do."""

from __future__ import annotations

import json
import threading
from typing import Any

from kproxy.sources import Event, Kind

# Fields that change without changing what a proxy programs.
_VOLATILE_METADATA = ("resourceVersion", "managedFields", "generation", "uid", "creationTimestamp")


def canonical(obj: dict[str, Any] | None) -> str | None:
    """JSON of the object without bookkeeping fields, with sorted keys."""
    if obj is None:
        return None
    meta = dict(obj.get("metadata") or {})
    for k in _VOLATILE_METADATA:
        meta.pop(k, None)
    trimmed = dict(obj)
    trimmed["metadata"] = meta
    return json.dumps(trimmed, sort_keys=True, separators=(",", ":"), default=str)


class ChangeTracker:
    """Thread-safe: sources call `update`, the sync thread calls `drain`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._applied: dict[tuple[Kind, str], str] = {}
        self._pending: dict[tuple[Kind, str], tuple[str | None, dict[str, Any] | None]] = {}

    def update(self, event: Event) -> bool:
        """Record a change; False when it changes nothing that was applied or pending."""
        key = (event.kind, event.key)
        text = canonical(event.obj)
        with self._lock:
            if key in self._pending:
                if self._pending[key][0] == text:
                    return False
            elif self._applied.get(key) == text:
                return False
            if self._applied.get(key) == text:
                # Changed and changed back before a sync: nothing to do.
                del self._pending[key]
                return False
            self._pending[key] = (text, event.obj)
            return True

    def pending(self, kind: Kind) -> int:
        with self._lock:
            return sum(1 for k in self._pending if k[0] == kind)

    def drain(self) -> list[tuple[Kind, str, str | None, dict[str, Any] | None]]:
        """Pending changes (kind, key, canonical JSON or None, object), now applied."""
        with self._lock:
            out = [(k[0], k[1], text, obj) for k, (text, obj) in self._pending.items()]
            for k, (text, _) in self._pending.items():
                if text is None:
                    self._applied.pop(k, None)
                else:
                    self._applied[k] = text
            self._pending.clear()
        return out

    def forget(self, kind: Kind, key: str) -> None:
        """Drop what we believe is applied (the object was rejected)."""
        with self._lock:
            self._applied.pop((kind, key), None)
