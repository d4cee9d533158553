"""Shared fixtures: the network-namespace sandbox and hypothesis profiles."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# Run from a source checkout without installing: the pure-Python parts (sandbox, echo)
# import without the compiled core.
if importlib.util.find_spec("kproxy") is None:
    sys.path.insert(0, str(ROOT / "python"))
# tests/flows.py is imported as a plain module by the packet-flow tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kproxy.sandbox import Sandbox, cleanup_stale  # noqa: E402

settings.register_profile("fast", max_examples=50, deadline=None)
settings.register_profile(
    "slow", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

# Namespace prefix of the test suite's sandboxes (see kproxy.sandbox.cleanup_stale).
TEST_PREFIX = "kpt"


def kernel_skip_reason() -> str | None:
    """Why kernel tests cannot run here, or None."""
    if sys.platform != "linux":
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (the ip tool)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is not None:
        reason = kernel_skip_reason()
        if reason:
            pytest.skip(reason)


def pytest_sessionstart(session: pytest.Session) -> None:
    # Leftovers of a killed earlier run (their owner process is gone).
    if kernel_skip_reason() is None:
        cleanup_stale(TEST_PREFIX)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    """The example cluster in namespaces, without kproxy (module-scoped: slow to build)."""
    reason = kernel_skip_reason()
    if reason:
        pytest.skip(reason)
    with Sandbox.from_manifests([EXAMPLES], prefix=TEST_PREFIX) as sb:
        yield sb


@pytest.fixture(scope="module")
def proxied(mode: str, iptables_backend: str | None) -> Iterator[Sandbox]:
    """The example cluster with kproxy running in ``mode`` in the node namespace.

    ``mode`` and ``iptables_backend`` come from a module-scoped parametrization, e.g.
    ``pytest.mark.parametrize("mode,iptables_backend", PROXY_CONFIGS, scope="module")``,
    so there is one sandbox and one daemon per configuration, not per test.
    """
    reason = kernel_skip_reason()
    if reason:
        pytest.skip(reason)
    if iptables_backend and shutil.which(f"iptables-{iptables_backend}") is None:
        pytest.skip(f"iptables-{iptables_backend} is not installed")
    with Sandbox.from_manifests([EXAMPLES], prefix=TEST_PREFIX) as sb:
        sb.start_kproxy(mode, iptables_backend=iptables_backend)
        yield sb
        if sb.kproxy is not None and not sb.kproxy.running():
            pytest.fail(f"kproxy died during the tests:\n{sb.kproxy.log_text(tail=40)}")
