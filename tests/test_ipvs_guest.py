"""Starts the qemu guest (tests/guest/harness.py) and runs the IPVS tests inside it:
the Rust IPVS client against a real IPVS (tests/guest/inside/), and the packet-flow
table in ipvs mode (tests/test_packet_flow.py, the "ipvs" row of flows.PROXY_CONFIGS,
which exists only in the guest). Skipped, with the reason, only when the guest cannot
be started here (no qemu, not root, kernel not fetchable); a failure inside fails the
test with the guest's output."""

from __future__ import annotations

import os
import sys

import pytest

from guest import harness

pytestmark = pytest.mark.kernel

# Upper bounds for the guest runs (boot + tests); TCG is slow but bounded.
CLIENT_TIMEOUT = float(os.environ.get("KPROXY_GUEST_TIMEOUT", "600"))
FLOW_TIMEOUT = float(os.environ.get("KPROXY_GUEST_FLOW_TIMEOUT", "1500"))
KERNEL_FETCH = 900  # seconds, on a fresh machine


def _guest_pytest(args: str, timeout: float) -> tuple[int, str]:
    """Run pytest in the guest: (its exit code, the tail of the guest's console)."""
    if os.environ.get("KPROXY_IN_GUEST"):
        pytest.skip("already inside the guest")
    reason = harness.skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        kdir = harness.prepare_kernel()
    except RuntimeError as e:
        pytest.skip(f"guest kernel cannot be prepared: {e}")
    cmd = (
        f"PYTHONPATH=tests {sys.executable} -m pytest -p guest.tcg -p no:cacheprovider -q "
        f"--timeout {int(timeout)} {args}"
    )
    res = harness.run(cmd, timeout=timeout, kdir=kdir)
    print(f"guest run took {res.seconds:.0f}s")
    return res.returncode, "\n".join(res.console.splitlines()[-80:])


@pytest.mark.timeout(CLIENT_TIMEOUT + KERNEL_FETCH)
def test_ipvs_client_in_guest_kernel() -> None:
    rc, tail = _guest_pytest("tests/guest/inside", CLIENT_TIMEOUT)
    assert rc == 0, f"guest tests failed (rc={rc}):\n{tail}"


@pytest.mark.timeout(FLOW_TIMEOUT + KERNEL_FETCH)
def test_packet_flow_ipvs_in_guest_kernel() -> None:
    rc, tail = _guest_pytest("-k ipvs tests/test_packet_flow.py", FLOW_TIMEOUT)
    assert rc == 0, f"guest packet-flow table failed (rc={rc}):\n{tail}"
