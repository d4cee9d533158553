"""Tests under inside/ run only in the qemu guest (tests/test_ipvs_guest.py starts it
with KPROXY_IN_GUEST=1); on the host they are not collected."""

from __future__ import annotations

import os

collect_ignore_glob = [] if os.environ.get("KPROXY_IN_GUEST") else ["inside/*"]
