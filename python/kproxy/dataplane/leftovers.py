"""Removing what other kproxy/kube-proxy modes left behind: starting in one mode
cleans the others, and `--cleanup` cleans them all."""

from __future__ import annotations

import logging
import shutil
import subprocess

log = logging.getLogger("kproxy.leftovers")

#: nftables tables created by the nftables mode (upstream's name) and userspace mode.
NFT_TABLES = (("ip", "kube-proxy"), ("ip6", "kube-proxy"), ("inet", "kproxy-userspace"))
IPVS_INTERFACE = "kube-ipvs0"


def remove_nft_tables(keep: tuple[tuple[str, str], ...] = ()) -> bool:
    """Delete our nftables tables (but those in `keep`) where present; True when
    something failed."""
    nft = shutil.which("nft")
    if nft is None:
        return False
    failed = False
    for family, table in NFT_TABLES:
        if (family, table) in keep:
            continue
        probe = subprocess.run(
            [nft, "-t", "list", "table", family, table],  # options before the command
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if probe.returncode != 0:
            continue
        proc = subprocess.run(
            [nft, "delete", "table", family, table],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            log.error("cannot delete nftables table %s %s: %s", family, table, proc.stderr.strip())
            failed = True
        else:
            log.info("deleted nftables table %s %s", family, table)
    return failed


def remove_ipvs_interface() -> bool:
    try:
        from pyroute2 import IPRoute
    except ImportError:  # pragma: no cover - a dependency
        return False
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=IPVS_INTERFACE)
        if not idx:
            return False
        try:
            ipr.link("del", index=idx[0])
            log.info("deleted interface %s", IPVS_INTERFACE)
        except Exception as e:
            log.error("cannot delete %s: %s", IPVS_INTERFACE, e)
            return True
    return False


def remove_other_modes(mode: str) -> None:
    """Called at start: remove leftovers of every mode but `mode`."""
    # Each mode keeps only its own table: a leftover userspace capture table would
    # redirect Service traffic to a forwarder that no longer runs.
    own = {
        "nftables": (("ip", "kube-proxy"), ("ip6", "kube-proxy")),
        "userspace": (("inet", "kproxy-userspace"),),
    }
    remove_nft_tables(keep=own.get(mode, ()))
    if mode != "ipvs":
        remove_ipvs_interface()
