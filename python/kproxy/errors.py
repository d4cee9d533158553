"""kproxy's exception hierarchy: every error a caller can see is a KproxyError."""

from __future__ import annotations


class KproxyError(Exception):
    """Base class of every error raised by kproxy."""


class ConfigError(KproxyError):
    """A flag, config file field or manifest is invalid (exit code 2 in the daemon)."""


class ObjectError(KproxyError):
    """A Kubernetes object is invalid; the message names the object and the field."""


class SyncError(KproxyError):
    """Programming the dataplane failed."""


class NoRouteError(KproxyError):
    """A flow has no endpoint to go to (its verdict is not forward)."""


for _cls in (KproxyError, ConfigError, ObjectError, SyncError, NoRouteError):
    _cls.__module__ = "kproxy"
