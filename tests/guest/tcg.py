"""pytest plugin for runs inside the TCG guest (``-p guest.tcg``): processes start about
ten times slower under emulation, so the sandbox's start-up waits (echo servers,
kproxy becoming healthy) are scaled. The flows' own per-attempt timeouts are not."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from kproxy import sandbox

SCALE = 20.0


def _scale_timeout(fn: Callable[..., Any], default: float) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not args and "timeout" not in kwargs:
            kwargs["timeout"] = default * SCALE
        return fn(self, *args, **kwargs)

    return wrapper


sandbox.Sandbox._start_echo_servers = _scale_timeout(  # type: ignore[method-assign]
    sandbox.Sandbox._start_echo_servers, 15.0
)
_start_kproxy = sandbox.Sandbox.start_kproxy


@functools.wraps(_start_kproxy)
def _start_kproxy_slow(self: Any, *args: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("timeout", 60.0 * SCALE)
    return _start_kproxy(self, *args, **kwargs)


sandbox.Sandbox.start_kproxy = _start_kproxy_slow  # type: ignore[method-assign]

# Every command in a namespace (an ``ip`` call, a Python client) starts slowly too.
EXEC_SCALE = 6.0
_run_in = sandbox.Sandbox.run_in


@functools.wraps(_run_in)
def _run_in_slow(self: Any, *args: Any, **kwargs: Any) -> Any:
    kwargs["timeout"] = kwargs.get("timeout", 10.0) * EXEC_SCALE
    return _run_in(self, *args, **kwargs)


sandbox.Sandbox.run_in = _run_in_slow  # type: ignore[method-assign]
_run = sandbox._run


def _run_slow(argv: Any, timeout: float = 10.0, check: bool = True) -> str:
    return _run(argv, timeout=timeout * EXEC_SCALE, check=check)


sandbox._run = _run_slow
