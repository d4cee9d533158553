"""Starts the qemu guest (tests/guest/harness.py) and runs the IPVS tests inside it:
the Rust IPVS client against a real IPVS (tests/guest/inside/) and the packet-flow
table in ipvs mode (tests/test_packet_flow.py, the "ipvs" row of flows.PROXY_CONFIGS,
which exists only in the guest). Skipped, with the reason, only when the guest cannot be
started here (no qemu, no root, kernel not fetchable); a failure inside fails this test
with the guest's output."""

from __future__ import annotations

import os
import sys

import pytest

from guest import harness

pytestmark = pytest.mark.kernel

# Upper bound for the whole guest run (boot + tests); TCG is slow but bounded.
GUEST_TIMEOUT = float(os.environ.get("KPROXY_GUEST_TIMEOUT", "1500"))
INSIDE = ["tests/guest/inside", "tests/test_packet_flow.py"]


@pytest.mark.timeout(GUEST_TIMEOUT + 900)  # + fetching the kernel on a fresh machine
def test_ipvs_in_guest_kernel() -> None:
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
        f"{sys.executable} -m pytest -p no:cacheprovider -q -x "
        f"-k 'ipvs or inside' {' '.join(INSIDE)}"
    )
    res = harness.run(cmd, timeout=GUEST_TIMEOUT, kdir=kdir)
    print(f"guest run took {res.seconds:.0f}s")
    tail = "\n".join(res.console.splitlines()[-80:])
    assert res.returncode == 0, f"guest tests failed (rc={res.returncode}):\n{tail}"
