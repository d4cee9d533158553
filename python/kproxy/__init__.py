"""kproxy: a drop-in Kubernetes service proxy with a Rust core.

The daemon is `python -m kproxy`; the library part (routing, selection, rendering)
is importable anywhere the wheel builds."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kproxy.errors import ConfigError, KproxyError, NoRouteError, ObjectError, SyncError

if TYPE_CHECKING:
    from kproxy._core import Selector
    from kproxy.table import Route, ServiceTable, render

__all__ = [
    "ConfigError",
    "KproxyError",
    "NoRouteError",
    "ObjectError",
    "Route",
    "Selector",
    "ServiceTable",
    "SyncError",
    "render",
]
__version__ = "0.1.0"

# The routing API needs the compiled core; load it on first use so the pure-Python
# parts (sandbox, echo) import without it.
_LAZY = {
    "Route": "kproxy.table",
    "ServiceTable": "kproxy.table",
    "render": "kproxy.table",
    "Selector": "kproxy._core",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kproxy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
