"""A throw-away cluster node built from network namespaces, for the demo and the tests.

Layout (every name carries a per-run prefix, ``{prefix}-{pid}-{hex}``)::

    {run}-ext (external client)                {run}-node (the node kproxy runs in)
      eth0 172.18.0.100/24 ---- veth ---- eth0 172.18.0.2/24 (NODE_IP, InternalIP)
      default via 172.18.0.2                  default via 172.18.0.100
                                              kbr0 10.244.0.1/24 (bridge, pod gateway)
                                              ip_forward=1, bridge-nf-call-iptables=1
                                                |  vethN (hairpin on) per pod
    {run}-pN (one per pod IP in the EndpointSlices, plus the "client" pod)
      eth0 <pod ip>/24, default via 10.244.0.1, echo server on every listed port

Pods whose EndpointSlice entry says ``nodeName: node2`` sit on the same bridge: only the
slice makes them remote. Packets never leave these namespaces.

Everything is torn down by :meth:`Sandbox.close` (also on errors and Ctrl-C when used
as a context manager); :func:`cleanup_stale` removes what a killed run left behind.
Only the standard library, PyYAML and the ``ip`` tool are used, so the sandbox works
without the compiled core.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from kproxy.errors import KproxyError

NODE_NAME = "node1"
NODE_IP = "172.18.0.2"
EXTERNAL_IP = "172.18.0.100"
UPLINK_PREFIXLEN = 24
POD_CIDR = "10.244.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
POD_GATEWAY = "10.244.0.1"
BRIDGE = "kbr0"
CLIENT_POD = "client"
CLIENT_POD_IP = "10.244.0.250"
HEALTHZ_ADDRESS = "127.0.0.1:10256"
METRICS_ADDRESS = "127.0.0.1:10249"
ECHO_SCRIPT = Path(__file__).with_name("echo.py")
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

# Outcomes reported by the echo client (see kproxy.echo).
ANSWER, REFUSED, TIMEOUT, ERROR = "answer", "refused", "timeout", "error"


class SandboxError(KproxyError):
    """Building, using or tearing down the sandbox failed."""


class KproxyStartError(SandboxError):
    """The kproxy daemon exited or did not report healthy in time."""


SandboxError.__module__ = "kproxy.sandbox"
KproxyStartError.__module__ = "kproxy.sandbox"


# ------------------------------------------------------------------------ manifests


def manifest_files(paths: Iterable[str | Path]) -> list[Path]:
    """The manifest files named by ``paths`` (files, or directories of them)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix in MANIFEST_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise SandboxError(f"manifest path {p} does not exist")
    return out


def load_objects(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every object in the manifests (multi-document YAML, JSON and ``kind: List``)."""
    objects: list[dict[str, Any]] = []
    for f in manifest_files(paths):
        try:
            docs = list(yaml.safe_load_all(f.read_text()))
        except yaml.YAMLError as exc:
            raise SandboxError(f"{f}: invalid YAML: {exc}") from exc
        for doc in docs:
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") == "List":
                objects.extend(i for i in doc.get("items") or [] if isinstance(i, dict))
            else:
                objects.append(doc)
    return objects


@dataclass(frozen=True)
class Pod:
    """A pod of the sandbox: one namespace on the bridge running the echo server."""

    name: str
    ip: str
    node_name: str
    netns: str
    tcp_ports: tuple[int, ...] = ()
    udp_ports: tuple[int, ...] = ()


@dataclass
class _PodSpec:
    name: str
    ip: str
    node_name: str
    tcp: set[int] = field(default_factory=set)
    udp: set[int] = field(default_factory=set)


def pods_from_objects(objects: Iterable[Mapping[str, Any]]) -> list[_PodSpec]:
    """One pod per IPv4 endpoint address inside POD_CIDR found in the EndpointSlices.

    The pod is named after the endpoint's ``targetRef`` (kind Pod), else after its IP,
    and serves the union of the ports of every slice that lists it.
    """
    cidr = ipaddress.ip_network(POD_CIDR)
    reserved = {POD_GATEWAY, CLIENT_POD_IP}
    by_ip: dict[str, _PodSpec] = {}
    for obj in objects:
        if obj.get("kind") != "EndpointSlice" or obj.get("addressType", "IPv4") != "IPv4":
            continue
        ports = [
            (int(p["port"]), str(p.get("protocol") or "TCP").upper())
            for p in obj.get("ports") or []
            if isinstance(p, dict) and p.get("port") is not None
        ]
        for ep in obj.get("endpoints") or []:
            addrs = ep.get("addresses") or []
            if not addrs:
                continue
            ip = str(addrs[0])
            try:
                if ipaddress.ip_address(ip) not in cidr or ip in reserved:
                    continue
            except ValueError:
                continue
            ref = ep.get("targetRef") or {}
            name = str(ref["name"]) if ref.get("kind") == "Pod" and ref.get("name") else ""
            spec = by_ip.setdefault(
                ip,
                _PodSpec(
                    name=name or "pod-" + ip.replace(".", "-"),
                    ip=ip,
                    node_name=str(ep.get("nodeName") or ""),
                ),
            )
            for port, proto in ports:
                if proto == "TCP":
                    spec.tcp.add(port)
                elif proto == "UDP":
                    spec.udp.add(port)
    names: set[str] = set()
    for spec in by_ip.values():
        if spec.name in names or spec.name == CLIENT_POD:
            spec.name = f"{spec.name}-{spec.ip.replace('.', '-')}"
        names.add(spec.name)
    return sorted(by_ip.values(), key=lambda s: ipaddress.ip_address(s.ip))


# ------------------------------------------------------------------------ results


@dataclass(frozen=True)
class ConnectResult:
    """What one client attempt saw."""

    outcome: str  # ANSWER, REFUSED, TIMEOUT or ERROR
    pod: str | None = None  # the pod that answered
    peer: str | None = None  # "ip:port" the pod saw as the client
    local: str | None = None  # "ip:port" the client used
    detail: str = ""

    @property
    def answered(self) -> bool:
        return self.outcome == ANSWER

    @property
    def peer_ip(self) -> str | None:
        return self.peer.rsplit(":", 1)[0] if self.peer else None

    @property
    def local_ip(self) -> str | None:
        return self.local.rsplit(":", 1)[0] if self.local else None

    @property
    def masqueraded(self) -> bool | None:
        """Whether the pod saw another source IP than the client's own (None: no answer)."""
        if not self.answered:
            return None
        return self.peer_ip != self.local_ip

    @property
    def verdict(self) -> str:
        """The answering pod's name, or REJECT (refused), DROP (timeout) or ERROR."""
        if self.answered:
            return self.pod or "?"
        return {REFUSED: "REJECT", TIMEOUT: "DROP"}.get(self.outcome, "ERROR")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ConnectResult:
        return cls(
            outcome=str(data.get("outcome", ERROR)),
            pod=data.get("pod"),
            peer=data.get("peer"),
            local=data.get("local"),
            detail=str(data.get("detail", "")),
        )


# ------------------------------------------------------------------------ processes


def _ip(*args: str, timeout: float = 10.0) -> str:
    return _run(["ip", *args], timeout=timeout)


def _run(argv: Sequence[str], timeout: float = 10.0, check: bool = True) -> str:
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise SandboxError(f"{' '.join(argv)}: timed out after {timeout}s") from exc
    except OSError as exc:
        raise SandboxError(f"{' '.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise SandboxError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_list() -> list[str]:
    try:
        out = _run(["ip", "netns", "list"], check=False)
    except SandboxError:
        return []
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _delete_netns(name: str) -> None:
    """Kill what still runs in namespace ``name`` (started by the sandbox), then delete it."""
    with contextlib.suppress(SandboxError):
        for pid in _run(["ip", "netns", "pids", name], check=False).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    with contextlib.suppress(SandboxError):
        _run(["ip", "netns", "del", name], check=False)


def cleanup_stale(prefix: str = "kp", *, force: bool = False) -> list[str]:
    """Delete namespaces left by killed sandbox runs with this ``prefix``.

    A namespace belongs to a run whose process id is part of its name; it is stale when
    that process is gone (or always with ``force``). Returns the deleted names.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-[0-9a-f]+-")
    removed: list[str] = []
    for name in _netns_list():
        m = pattern.match(name)
        if not m:
            continue
        if not force and _pid_alive(int(m.group(1))):
            continue
        _delete_netns(name)
        removed.append(name)
    return removed


def _terminate(proc: subprocess.Popen[Any], grace: float) -> int | None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
    return proc.returncode


@dataclass
class KproxyProcess:
    """A kproxy daemon running in the node namespace."""

    proc: subprocess.Popen[bytes]
    argv: list[str]
    log_path: Path
    mode: str

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_text(self, tail: int = 0) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-tail:]) if tail else text

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit code."""
        return _terminate(self.proc, grace)


# ------------------------------------------------------------------------ sandbox


class Sandbox:
    """A node, its pods and an external client, each in its own network namespace."""

    def __init__(
        self,
        manifests: Sequence[str | Path],
        *,
        prefix: str = "kp",
        node_name: str = NODE_NAME,
        keep_workdir: bool = False,
    ) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,11}", prefix):
            raise SandboxError(f"prefix {prefix!r}: use 1-12 lowercase letters/digits")
        self.prefix = prefix
        self.run_id = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.node_name = node_name
        self.source_manifests = [Path(p) for p in manifests]
        self.keep_workdir = keep_workdir
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.run_id}-"))
        # kproxy watches this copy, so tests may edit it without touching examples/.
        self.manifest_dir = self.workdir / "manifests"
        self.node_ns = f"{self.run_id}-node"
        self.ext_ns = f"{self.run_id}-ext"
        self.pods: dict[str, Pod] = {}
        self.objects: list[dict[str, Any]] = []
        self.kproxy: KproxyProcess | None = None
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False

    @classmethod
    def from_manifests(
        cls, paths: Sequence[str | Path], prefix: str = "kp", **kwargs: Any
    ) -> Sandbox:
        """A sandbox for these manifests; build it with ``with`` (or :meth:`setup`)."""
        return cls(paths, prefix=prefix, **kwargs)

    # -------------------------------------------------------------- lifecycle

    def __enter__(self) -> Sandbox:
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def setup(self) -> None:
        """Copy the manifests, create the namespaces and links, start the echo servers."""
        if os.geteuid() != 0:
            raise SandboxError("the sandbox needs root (it creates network namespaces)")
        self._copy_manifests()
        self.objects = load_objects([self.manifest_dir])
        specs = pods_from_objects(self.objects)
        specs.append(_PodSpec(name=CLIENT_POD, ip=CLIENT_POD_IP, node_name=self.node_name))
        self._build_node()
        for idx, spec in enumerate(specs):
            self._add_pod(idx, spec)
        self._start_echo_servers()

    def close(self) -> None:
        """Stop every process and delete every namespace; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        # A second Ctrl-C must not interrupt the teardown half-way.
        restore = None
        if threading.current_thread() is threading.main_thread():
            restore = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if self.kproxy is not None:
                self.kproxy.stop()
            for proc in self._procs:
                _terminate(proc, grace=2.0)
            for ns in reversed(self._namespaces):
                _delete_netns(ns)
            if not self.keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            if restore is not None:
                signal.signal(signal.SIGINT, restore)

    def _copy_manifests(self) -> None:
        self.manifest_dir.mkdir(parents=True, exist_ok=True)
        for idx, f in enumerate(manifest_files(self.source_manifests)):
            dest = self.manifest_dir / f.name
            if dest.exists():
                dest = self.manifest_dir / f"{idx:02d}-{f.name}"
            shutil.copyfile(f, dest)

    def _add_netns(self, name: str) -> None:
        self._namespaces.append(name)  # before creating: close() deletes it either way
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build_node(self) -> None:
        node, ext = self.node_ns, self.ext_ns
        self._add_netns(node)
        self._add_netns(ext)
        self.sysctl(node, "net.ipv4.ip_forward", "1")
        # The external client and the node's default gateway share the uplink; redirects
        # would tell the client to bypass the node, and their per-peer rate limit would
        # swallow the ICMP errors of REJECT rules. Many probes in a row must each get
        # their ICMP error, so the node does not rate-limit them either.
        for key in ("all", "default"):
            self.sysctl(node, f"net.ipv4.conf.{key}.send_redirects", "0")
        self.sysctl(node, "net.ipv4.icmp_ratelimit", "0")
        _ip("-n", node, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", node, "addr", "add", f"{POD_GATEWAY}/24", "dev", BRIDGE)
        _ip("-n", node, "link", "set", BRIDGE, "up")
        # br_netfilter is per namespace here: bridged pod->pod replies of a Service flow
        # must pass conntrack so they are un-DNATed.
        self.sysctl(node, "net.bridge.bridge-nf-call-iptables", "1")
        _ip("-n", node, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", ext)
        _ip("-n", node, "addr", "add", f"{NODE_IP}/{UPLINK_PREFIXLEN}", "dev", "eth0")
        _ip("-n", node, "link", "set", "eth0", "up")
        _ip("-n", ext, "addr", "add", f"{EXTERNAL_IP}/{UPLINK_PREFIXLEN}", "dev", "eth0")
        _ip("-n", ext, "link", "set", "eth0", "up")
        # The external client reaches ClusterIPs, externalIPs and LB IPs through the node.
        _ip("-n", ext, "route", "add", "default", "via", NODE_IP)
        # Like a real node, the node has a default route out of its uplink, so traffic it
        # originates to a Service VIP leaves with its InternalIP as source.
        _ip("-n", node, "route", "add", "default", "via", EXTERNAL_IP)

    def _add_pod(self, idx: int, spec: _PodSpec) -> None:
        ns = f"{self.run_id}-p{idx}"
        veth = f"veth{idx}"
        self._add_netns(ns)
        node = self.node_ns
        _ip("-n", node, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", node, "link", "set", veth, "master", BRIDGE)
        _ip("-n", node, "link", "set", veth, "up")
        # Hairpin: a pod reaching itself through a Service gets the packet back on the
        # port it came from (needed by bridges that switch such flows).
        _ip("-n", node, "link", "set", "dev", veth, "type", "bridge_slave", "hairpin", "on")
        _ip("-n", ns, "addr", "add", f"{spec.ip}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "add", "default", "via", POD_GATEWAY)
        self.pods[spec.name] = Pod(
            name=spec.name,
            ip=spec.ip,
            node_name=spec.node_name,
            netns=ns,
            tcp_ports=tuple(sorted(spec.tcp)),
            udp_ports=tuple(sorted(spec.udp)),
        )

    def _start_echo_servers(self, timeout: float = 15.0) -> None:
        waiting: dict[int, tuple[Pod, subprocess.Popen[bytes]]] = {}
        for pod in self.pods.values():
            if not pod.tcp_ports and not pod.udp_ports:
                continue
            argv = [
                "ip", "netns", "exec", pod.netns, sys.executable, str(ECHO_SCRIPT), "serve",
                "--name", pod.name,
                "--tcp", ",".join(map(str, pod.tcp_ports)),
                "--udp", ",".join(map(str, pod.udp_ports)),
            ]  # fmt: skip
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            self._procs.append(proc)
            assert proc.stdout is not None
            waiting[proc.stdout.fileno()] = (pod, proc)
        deadline = time.monotonic() + timeout
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                names = ", ".join(p.name for p, _ in waiting.values())
                raise SandboxError(f"echo servers not ready after {timeout}s: {names}")
            ready, _, _ = select.select(list(waiting), [], [], left)
            for fd in ready:
                pod, proc = waiting.pop(fd)
                assert proc.stdout is not None
                line = proc.stdout.readline().decode(errors="replace").strip()
                if line != "ready":
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    raise SandboxError(f"echo server of {pod.name} failed: {line} {err}")

    # -------------------------------------------------------------- helpers

    def sysctl(self, ns: str, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        self.run_in(ns, ["sh", "-c", f"echo {value} > {path}"])

    def netns_of(self, source: str) -> str:
        """Namespace of a source: ``node``, ``external``, ``pod:NAME`` or a namespace."""
        if source == "node":
            return self.node_ns
        if source == "external":
            return self.ext_ns
        if source.startswith("pod:"):
            name = source[4:]
            if name not in self.pods:
                raise SandboxError(f"no pod {name!r} in the sandbox")
            return self.pods[name].netns
        if source in self._namespaces:
            return source
        raise SandboxError(f"unknown source {source!r}")

    def source_ip(self, source: str) -> str:
        if source == "node":
            return NODE_IP
        if source == "external":
            return EXTERNAL_IP
        return self.pods[source[4:]].ip

    def run_in(
        self, ns: str, argv: Sequence[str], timeout: float = 10.0, check: bool = True
    ) -> str:
        """Run ``argv`` inside namespace ``ns`` (a name or a source); return its stdout."""
        netns = ns if ns in self._namespaces else self.netns_of(ns)
        return _run(["ip", "netns", "exec", netns, *argv], timeout=timeout, check=check)

    def connect_many(
        self,
        source: str,
        proto: str,
        ip: str,
        port: int,
        *,
        count: int = 1,
        timeout: float = 1.0,
        sport: int = 0,
    ) -> list[ConnectResult]:
        """``count`` sequential attempts from ``source``, each bounded by ``timeout``."""
        argv = [
            sys.executable, str(ECHO_SCRIPT), "client", "--proto", proto.lower(),
            "--ip", ip, "--port", str(port), "--timeout", str(timeout),
            "--count", str(count), "--sport", str(sport),
        ]  # fmt: skip
        out = self.run_in(source, argv, timeout=count * (timeout + 1.0) + 10.0)
        results = [ConnectResult.from_json(json.loads(line)) for line in out.splitlines()]
        if len(results) != count:
            raise SandboxError(f"echo client printed {len(results)} results, wanted {count}")
        return results

    def connect(
        self, source: str, proto: str, ip: str, port: int, timeout: float = 1.0, sport: int = 0
    ) -> ConnectResult:
        """One attempt from ``source`` (``node``, ``external``, ``pod:NAME``)."""
        return self.connect_many(source, proto, ip, port, timeout=timeout, sport=sport)[0]

    def http_get(self, source: str, url: str, timeout: float = 1.0) -> tuple[int, str]:
        """GET ``url`` from inside a namespace: (status, body); status 0 = no answer."""
        argv = [sys.executable, str(ECHO_SCRIPT), "http-get", url, "--timeout", str(timeout)]
        data = json.loads(self.run_in(source, argv, timeout=timeout + 10.0))
        return int(data["status"]), str(data["body"])

    def write_manifest(self, name: str, objects: Sequence[Mapping[str, Any]]) -> Path:
        """Atomically (re)write a manifest file in the watched copy; returns its path."""
        dest = self.manifest_dir / name
        tmp = self.manifest_dir / f".{name}.tmp"
        tmp.write_text(yaml.safe_dump_all([dict(o) for o in objects], sort_keys=False))
        os.replace(tmp, dest)
        return dest

    def remove_manifest(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.manifest_dir / name).unlink()

    def iter_namespaces(self) -> Iterator[str]:
        yield from self._namespaces

    # -------------------------------------------------------------- kproxy

    def kproxy_argv(self, mode: str, extra_args: Sequence[str] = ()) -> list[str]:
        return [
            sys.executable, "-m", "kproxy",
            "--manifests", str(self.manifest_dir),
            "--hostname-override", self.node_name,
            "--proxy-mode", mode,
            "--cluster-cidr", CLUSTER_CIDR,
            "--healthz-bind-address", HEALTHZ_ADDRESS,
            "--metrics-bind-address", METRICS_ADDRESS,
            "-v", "2",
            *extra_args,
        ]  # fmt: skip

    def start_kproxy(
        self,
        mode: str = "iptables",
        extra_args: Sequence[str] = (),
        *,
        iptables_backend: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> KproxyProcess:
        """Run kproxy in the node namespace and wait until /healthz reports a sync.

        ``iptables_backend`` (``legacy`` or ``nft``) is passed as KPROXY_IPTABLES_BACKEND.
        Raises :class:`KproxyStartError` (with the log's tail) if kproxy exits or stays
        unhealthy for ``timeout`` seconds.
        """
        if self.kproxy is not None and self.kproxy.running():
            raise SandboxError("kproxy is already running in this sandbox")
        argv = self.kproxy_argv(mode, extra_args)
        child_env = dict(os.environ)
        # Make the package importable from a source checkout too.
        src = str(Path(__file__).resolve().parent.parent)
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (src, child_env.get("PYTHONPATH", "")) if p
        )
        child_env["PYTHONUNBUFFERED"] = "1"
        if iptables_backend:
            child_env["KPROXY_IPTABLES_BACKEND"] = iptables_backend
        child_env.update(env or {})
        log_path = self.workdir / f"kproxy-{mode}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.node_ns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
                start_new_session=True,
            )
        self.kproxy = KproxyProcess(proc=proc, argv=argv, log_path=log_path, mode=mode)
        self.wait_healthy(timeout=timeout)
        return self.kproxy

    def wait_healthy(self, timeout: float = 60.0, interval: float = 0.25) -> None:
        """Poll /healthz in the node namespace until 200 after a first sync (bounded)."""
        kp = self.kproxy
        if kp is None:
            raise SandboxError("kproxy was not started")
        url = f"http://{HEALTHZ_ADDRESS}/healthz"
        deadline = time.monotonic() + timeout
        last = "no answer"
        for _ in range(int(timeout / interval) + 1):
            if not kp.running():
                raise KproxyStartError(
                    f"kproxy exited with code {kp.proc.returncode} before it was healthy; "
                    f"log {kp.log_path}:\n{kp.log_text(tail=40)}"
                )
            status, body = self.http_get("node", url, timeout=1.0)
            last = f"{status} {body[:200]}"
            if status == 200 and _synced(body):
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(interval)
        raise KproxyStartError(
            f"kproxy not healthy after {timeout}s (last /healthz: {last}); "
            f"log {kp.log_path}:\n{kp.log_text(tail=40)}"
        )

    def stop_kproxy(self, grace: float = 10.0) -> int | None:
        if self.kproxy is None:
            return None
        return self.kproxy.stop(grace)


def _synced(body: str) -> bool:
    """False when /healthz says it never synced (Go's zero time in lastUpdated)."""
    try:
        data = json.loads(body)
    except ValueError:
        return True
    last = data.get("lastUpdated") if isinstance(data, dict) else None
    return not (isinstance(last, str) and last.startswith("0001-"))
