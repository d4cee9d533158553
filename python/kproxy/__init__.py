"""kproxy: a drop-in Kubernetes service proxy with a Rust core.

The daemon is `python -m kproxy`; the library part (routing, selection, rendering)
is importable anywhere the wheel builds."""

from __future__ import annotations

from kproxy.errors import ConfigError, KproxyError, NoRouteError, ObjectError, SyncError

__all__ = ["ConfigError", "KproxyError", "NoRouteError", "ObjectError", "SyncError"]
__version__ = "0.1.0"
