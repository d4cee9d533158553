"""Fresh network namespaces for one benchmark process.

`ip netns add` creates a namespace and the process enters it with setns(2) (through
ctypes: os.setns is Python >= 3.12), so the measured iptables-restore runs directly as a
child of the benchmark, without an `ip netns exec` in between. Only this thread moves;
the benchmark processes are single-threaded, and subprocesses inherit the namespace."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import subprocess
from collections.abc import Iterator

PREFIX = "kpbench"
CLONE_NEWNET = 0x40000000
_NAME = re.compile(rf"^{PREFIX}-(\d+)-\d+$")

_libc = ctypes.CDLL(None, use_errno=True)
_counter = 0


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def delete(name: str) -> None:
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        _ip("netns", "del", name)


@contextlib.contextmanager
def fresh() -> Iterator[str]:
    """Create an empty namespace named kpbench-<pid>-<n>, run the body inside it, return
    to the original namespace and delete it, also on failure."""
    global _counter
    _counter += 1
    name = f"{PREFIX}-{os.getpid()}-{_counter}"
    _ip("netns", "add", name)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            _ip("link", "set", "lo", "up")
            yield name
        finally:
            _setns(home)
    finally:
        os.close(home)
        delete(name)


def names() -> list[str]:
    proc = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=False
    )
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def cleanup(owner_pid: int | None = None) -> list[str]:
    """Delete namespaces left by a killed benchmark process: those of `owner_pid`, or with
    None those whose owner process is gone. Returns the deleted names."""
    gone = []
    for name in names():
        m = _NAME.match(name)
        if m is None:
            continue
        pid = int(m.group(1))
        if owner_pid is not None and pid != owner_pid:
            continue
        if owner_pid is None and os.path.exists(f"/proc/{pid}"):
            continue
        delete(name)
        gone.append(name)
    return gone
