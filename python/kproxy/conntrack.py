"""Conntrack housekeeping: clear stale UDP entries after endpoint changes, so a flow
whose Service gained its first endpoint, or whose endpoint went away, is not
blackholed by an entry made before the change (upstream pkg/proxy/conntrack)."""

from __future__ import annotations

import logging
import shutil
import subprocess
from typing import Any

log = logging.getLogger("kproxy.conntrack")


def _run(args: list[str]) -> None:
    exe = shutil.which("conntrack")
    if exe is None:
        log.error("conntrack binary not found: stale UDP entries are not cleared")
        return
    # Exit code 1 with "0 flow entries have been deleted" is not an error.
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode not in (0, 1):
        log.error("conntrack %s failed: %s", " ".join(args), proc.stderr.strip())
    else:
        log.debug("conntrack %s: %s", " ".join(args), proc.stderr.strip())


def family_flag(ip: str | None) -> list[str]:
    return ["-f", "ipv6"] if ip and ":" in ip else []


def clear(entries: list[dict[str, Any]]) -> None:
    """Apply the cleanups the renderer asked for."""
    seen: set[tuple[Any, ...]] = set()
    for e in entries:
        key = (e["kind"], e.get("ip"), e["port"], e.get("endpoint_ip"), e["protocol"])
        if key in seen:
            continue
        seen.add(key)
        proto = ["-p", e["protocol"]]
        if e["kind"] == "service-ip":
            _run(
                [
                    "-D",
                    *family_flag(e["ip"]),
                    *proto,
                    "--orig-dst",
                    e["ip"],
                    "--orig-port-dst",
                    str(e["port"]),
                ]
            )
        elif e["kind"] == "nodeport":
            _run(["-D", *proto, "--orig-port-dst", str(e["port"])])
        elif e["kind"] == "endpoint":
            args = ["-D", *family_flag(e["endpoint_ip"]), *proto]
            if e.get("ip"):
                args += ["--orig-dst", e["ip"]]
            args += ["--orig-port-dst", str(e["port"]), "--dst-nat", e["endpoint_ip"]]
            _run(args)
