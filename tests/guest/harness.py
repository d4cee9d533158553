"""Boot Debian's kernel under qemu (TCG) with the host's root filesystem and run a
command in it.

The host kernel has no IPVS and cannot load modules, so the IPVS tests run in a guest:
Debian's ``linux-image-amd64`` (fetched and unpacked by ``scripts/guest-kernel.sh``
into ``.cache/guest-kernel``) boots with a busybox initramfs that mounts the host's ``/``
read-only over 9p, puts a tmpfs overlay on it and chroots, so the host's Python,
pytest, kproxy build and tools run unchanged. A second, writable 9p share carries the
script to run in and the exit code and logs out. Everything is bounded by a timeout.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
GUEST_KERNEL_SCRIPT = ROOT / "scripts" / "guest-kernel.sh"
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"
# Loaded by the initramfs, in this order (with their modules.dep dependencies first).
INITRD_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
# Loaded in the chroot before anything else; libcrc32c needs crc32c_generic first.
GUEST_MODULES = (
    "crc32c_generic",
    "ip_vs",
    "ip_vs_rr",
    "dummy",
    "veth",
    "bridge",
    "br_netfilter",
    "nf_conntrack",
    "ip_set",
)


@dataclass
class GuestResult:
    returncode: int  # the command's exit code, or -1 when the guest did not finish
    console: str  # the guest's serial console (kernel, init, command output)
    seconds: float


def skip_reason() -> str | None:
    """Why a guest cannot be started on this machine, or None."""
    if sys.platform != "linux":
        return "the guest harness needs Linux"
    if os.geteuid() != 0:
        return "the guest harness needs root (9p export of /)"
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (Debian package qemu-system-x86; scripts/setup.sh)"
    if not BUSYBOX.exists():
        return "busybox-static is not installed (/bin/busybox; scripts/setup.sh)"
    if shutil.which("depmod") is None:
        return "kmod (depmod) is not installed (scripts/setup.sh)"
    return None


def prepare_kernel(timeout: float = 900) -> Path:
    """The unpacked guest kernel (fetched on first use); raises RuntimeError on failure."""
    try:
        out = subprocess.run(
            [str(GUEST_KERNEL_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"scripts/guest-kernel.sh timed out after {timeout}s") from e
    if out.returncode != 0:
        raise RuntimeError(f"scripts/guest-kernel.sh failed: {out.stderr.strip()[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def kernel_version(kdir: Path) -> str:
    return (kdir / "version").read_text().strip()


def _module_order(moddir: Path, names: tuple[str, ...]) -> list[Path]:
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.removesuffix(".ko").replace("-", "_"): m for m in deps}
    order: list[str] = []

    def visit(mod: str) -> None:
        for d in reversed(deps.get(mod, [])):
            visit(d)
        if mod not in order:
            order.append(mod)

    for n in names:
        if n in by_name:  # built-in modules are not in modules.dep
            visit(by_name[n])
    return [moddir / m for m in order]


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (path, mode, data); directories have mode 0o040755."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        )
        out.write(hdr.encode() + nb)
        out.write(b"\0" * ((4 - (110 + len(nb)) % 4) % 4))
        out.write(data)
        out.write(b"\0" * ((4 - len(data) % 4) % 4))
    return out.getvalue()


def build_initramfs(kdir: Path) -> Path:
    """The initramfs (busybox, /init, 9p/overlay modules), cached by content."""
    moddir = kdir / "root" / "lib" / "modules" / kernel_version(kdir)
    mods = _module_order(moddir, INITRD_MODULES)
    init = (HERE / "init.sh").read_bytes()
    busybox = BUSYBOX.read_bytes()
    h = hashlib.sha256(init + busybox + "\n".join(map(str, mods)).encode()).hexdigest()[:16]
    path = kdir / f"initramfs-{h}.cpio.gz"
    if path.exists():
        return path
    d = 0o040755
    entries: list[tuple[str, int, bytes]] = [
        (n, d, b"") for n in ("bin", "dev", "proc", "sys", "modules", "lower", "rw", "newroot")
    ]
    entries.append(("bin/busybox", 0o100755, busybox))
    entries.append(("init", 0o100755, init))
    names = [m.name.removesuffix(".ko") for m in mods]
    for m, n in zip(mods, names, strict=True):
        entries.append((f"modules/{n}.ko", 0o100644, m.read_bytes()))
    entries.append(("modules.order", 0o100644, ("\n".join(names) + "\n").encode()))
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(_cpio(entries), compresslevel=1))
    tmp.rename(path)
    return path


def _run_script(kdir: Path, command: str, env: dict[str, str]) -> str:
    ver = kernel_version(kdir)
    mods = kdir / "root" / "lib" / "modules" / ver
    exports = "\n".join(f"export {k}={_shquote(v)}" for k, v in env.items())
    return f"""#!/bin/sh
# Runs in the guest as PID 1, in the overlay of the host's root.
# The checkout may live under /tmp or /run (CI clones anywhere): keep it reachable at
# its own path after fresh tmpfs mounts hide those directories.
mkdir -p /kproxy-root
mount --bind {_shquote(str(ROOT))} /kproxy-root
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
if [ ! -d {_shquote(str(ROOT))} ]; then
  mkdir -p {_shquote(str(ROOT))}
  mount --bind /kproxy-root {_shquote(str(ROOT))}
fi
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
export PATH={_shquote(os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))}
mkdir -p /lib/modules/{ver}
mount --bind {mods} /lib/modules/{ver}
for m in {" ".join(GUEST_MODULES)}; do modprobe $m || echo "guest: modprobe $m failed"; done
ip link set lo up
export HOME=/root KPROXY_IN_GUEST=1 PYTHONDONTWRITEBYTECODE=1
{exports}
cd {_shquote(str(ROOT))}
( {command} )
echo $? > /kproxy-out/rc
sync
echo "guest: done rc=$(cat /kproxy-out/rc)"
echo o > /proc/sysrq-trigger
sleep 30
"""


def _shquote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def run(
    command: str,
    *,
    timeout: float = 900,
    memory: str = "2048M",
    cpus: int = 2,
    env: dict[str, str] | None = None,
    kdir: Path | None = None,
) -> GuestResult:
    """Boot the guest, run ``command`` (sh) in the host's root at the repository, and
    return its exit code and the console. The guest is killed after ``timeout`` s."""
    kdir = kdir or prepare_kernel()
    initrd = build_initramfs(kdir)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kproxy-guest-") as out:
        outp = Path(out)
        (outp / "run.sh").write_text(_run_script(kdir, command, env or {}))
        argv = [
            QEMU,
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-m",
            memory,
            "-smp",
            str(cpus),
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
            "-kernel",
            str(kdir / "vmlinuz"),
            "-initrd",
            str(initrd),
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init",
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs",
            f"local,path={out},mount_tag=out,security_model=none",
        ]
        try:
            p = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
            console = p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")
        except subprocess.TimeoutExpired as e:
            raw = e.stdout if isinstance(e.stdout, bytes) else b""
            console = raw.decode(errors="replace") + f"\n[guest killed after {timeout}s]"
        rc_file = outp / "rc"
        rc = int(rc_file.read_text().strip() or -1) if rc_file.exists() else -1
    return GuestResult(rc, console, time.monotonic() - start)


if __name__ == "__main__":  # python tests/guest/harness.py 'command'
    reason = skip_reason()
    if reason:
        sys.exit(f"cannot run the guest: {reason}")
    res = run(" ".join(sys.argv[1:]) or "uname -a; ipvsadm -Ln")
    print(res.console)
    print(f"rc={res.returncode} in {res.seconds:.1f}s")
    sys.exit(0 if res.returncode == 0 else 1)
