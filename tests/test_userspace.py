"""userspace mode against a real kernel: the forwarder and its nftables capture in a
private network namespace (the test thread enters it with setns; every thread and
subprocess it starts inherits it). Backends listen on 127.0.0.2-127.0.0.9; Service
addresses are 10.96.0.0/16, routed to a veth interface so local output reaches the
capture rules. The packet-flow table in userspace mode is in test_packet_flow.py."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.kernel

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def netns() -> Iterator[str]:
    """A fresh namespace, entered by this thread, left and deleted even on failure."""
    name = f"kpu{os.getpid()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "add", name], check=True)
    original = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        for cmd in (
            "link set lo up",
            "link add d0 type veth peer name d1",
            "link set d1 up",
            "link set d0 up",
            "addr add 10.255.0.1/24 dev d0",
            "route add 10.96.0.0/16 dev d0",
        ):
            subprocess.run(["ip", "-n", name, *cmd.split()], check=True)
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield name
        finally:
            _setns(original)
    finally:
        os.close(original)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def service(name: str, ip: str, port: int, proto: str = "TCP", **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "t"}
    if "annotations" in spec:
        meta["annotations"] = spec.pop("annotations")
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": ip,
            "ports": [{"name": "p", "port": port, "protocol": proto}],
            **spec,
        },
    }


def slice_(svc: str, addrs: list[tuple[str, int]], proto: str = "TCP") -> dict[str, Any]:
    # One slice per endpoint port (a slice has one port list).
    ports = sorted({p for _, p in addrs})
    assert len(ports) <= 1, "use one port per test slice"
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": svc, "namespace": "t", "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": ports[0] if ports else 1, "protocol": proto}],
        "endpoints": [{"addresses": [ip], "nodeName": "n1"} for ip, _ in addrs],
    }


class Loop:
    """An asyncio loop on a thread (created inside the namespace, so it stays there)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Env:
    def __init__(self, families: tuple[int, ...] = (4,), node_ip: str = "10.255.0.1") -> None:
        from kproxy import _core
        from kproxy.dataplane.userspace import UserspaceBackend
        from kproxy.node import NodeInfo

        self.loop = Loop()
        self.model = _core.Model()
        cfg = types.SimpleNamespace(cluster_cidrs=[], detect_local_mode="ClusterCIDR")
        self.backend = UserspaceBackend(
            cfg,
            NodeInfo(name="n1", ips=(node_ip,)),
            families,
            forwarder_config={"udp_idle_timeout_ms": 2000, "connect_timeout_ms": 500},
            register_metrics=False,
        )
        self.servers: list[asyncio.base_events.Server] = []
        self.served: dict[str, int] = {}

    def apply(self, *objs: dict[str, Any], delete: tuple[str, ...] = ()) -> None:
        for o in objs:
            key = f"t/{o['metadata']['name']}"
            if o["kind"] == "Service":
                self.model.set_service(key, json.dumps(o))
            else:
                self.model.set_endpoint_slice(key, json.dumps(o))
        for key in delete:
            self.model.set_endpoint_slice(key, None)
        self.backend.sync(self.model, False)

    def stats(self, svc: str) -> dict[str, Any]:
        for p in self.backend.stats()["ports"]:
            if p["service"].startswith(f"t/{svc}"):
                return dict(p)
        raise KeyError(svc)

    def echo(self, ip: str, port: int) -> None:
        """A TCP echo server; half-close aware (echo until EOF, then close)."""
        name = f"{ip}:{port}"

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.served[name] = self.served.get(name, 0) + 1
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
                w.close()
            except (ConnectionError, OSError):
                w.transport.abort()

        async def start() -> None:
            self.servers.append(await asyncio.start_server(handle, ip, port, backlog=4096))

        self.loop.run(start())

    def udp_echo(self, ip: str, port: int) -> None:
        tag = f"{ip}:{port}|".encode()

        class P(asyncio.DatagramProtocol):
            def connection_made(self, t: Any) -> None:
                self.t = t

            def datagram_received(self, data: bytes, addr: Any) -> None:
                self.t.sendto(tag + data, addr)

        async def start() -> None:
            await self.loop.loop.create_datagram_endpoint(P, local_addr=(ip, port))

        self.loop.run(start())

    def close(self) -> None:
        self.backend.close()
        for s in self.servers:
            self.loop.loop.call_soon_threadsafe(s.close)
        self.loop.close()
        self.backend.cleanup()


@pytest.fixture
def env() -> Iterator[Env]:
    from conftest import kernel_skip_reason

    reason = kernel_skip_reason()
    if reason:
        pytest.skip(reason)
    with netns():
        e = Env()
        try:
            yield e
        finally:
            e.close()


def connect(ip: str, port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection((ip, port), timeout=timeout)


def _listeners(port: int) -> int:
    """LISTEN sockets on `port` in this thread's namespace (IPv4 and IPv6)."""
    n = 0
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/thread-self/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            n += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port
    return n


def test_tcp_shards_share_one_port_and_all_serve(env: Env) -> None:
    """One SO_REUSEPORT listener per shard (one per CPU by default), all on the
    forwarder's port; connections spread over them by hash, so 64 answered
    connections mean every shard serves (2 shards: all on one has odds 2^-63)."""
    shards = len(os.sched_getaffinity(0))
    port = env.backend.forwarder.tcp_port
    assert _listeners(port) == shards
    env.echo("127.0.0.2", 8090)
    env.apply(service("shards", "10.96.0.19", 80), slice_("shards", [("127.0.0.2", 8090)]))
    socks = [connect("10.96.0.19", 80) for _ in range(64)]
    try:
        for i, s in enumerate(socks):
            s.sendall(f"{i}".encode())
        for i, s in enumerate(socks):
            assert s.recv(16) == f"{i}".encode()
    finally:
        for s in socks:
            s.close()
    assert env.stats("shards")["connections"] == 64


def test_large_transfer_hash_both_ways_with_half_close(env: Env) -> None:
    env.echo("127.0.0.2", 8080)
    env.apply(service("big", "10.96.0.10", 80), slice_("big", [("127.0.0.2", 8080)]))
    payload = os.urandom(16 * 1024 * 1024)
    s = connect("10.96.0.10", 80, timeout=30)
    got = bytearray()

    def reader() -> None:
        while chunk := s.recv(1 << 20):
            got.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)  # half-close: the echo must still come back in full
    t.join(60)
    s.close()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    st = env.stats("big")
    assert st["bytes_to_endpoints"] == st["bytes_from_endpoints"] == len(payload)


def test_round_robin_affinity_and_annotation(env: Env) -> None:
    env.echo("127.0.0.2", 8081)
    env.echo("127.0.0.3", 8081)
    env.apply(
        service("rr", "10.96.0.11", 80),
        slice_("rr", [("127.0.0.2", 8081), ("127.0.0.3", 8081)]),
        service(
            "aff",
            "10.96.0.12",
            80,
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
        ),
        slice_("aff", [("127.0.0.2", 8081), ("127.0.0.3", 8081)]),
    )
    env.served.clear()
    for _ in range(10):
        with connect("10.96.0.11", 80) as s:
            s.sendall(b"x")
            assert s.recv(1) == b"x"
    assert env.served == {"127.0.0.2:8081": 5, "127.0.0.3:8081": 5}  # round robin
    env.served.clear()
    for _ in range(6):
        with connect("10.96.0.12", 80) as s:
            s.sendall(b"x")
            assert s.recv(1) == b"x"
    assert sorted(env.served.values()) == [6]  # ClientIP affinity: one endpoint


def test_udp_sessions_reply_from_service_address(env: Env) -> None:
    env.udp_echo("127.0.0.2", 5353)
    env.udp_echo("127.0.0.3", 5353)
    env.apply(
        service("dns", "10.96.0.53", 53, "UDP"),
        slice_("dns", [("127.0.0.2", 5353), ("127.0.0.3", 5353)], "UDP"),
    )
    seen = set()
    for _ in range(4):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(3)
            for i in range(3):  # one session: the same endpoint every time
                u.sendto(b"q%d" % i, ("10.96.0.53", 53))
                data, src = u.recvfrom(2048)
                assert src == ("10.96.0.53", 53)  # replies come from the Service address
                who, _, body = data.partition(b"|")
                assert body == b"q%d" % i
                if i == 0:
                    first = who
                assert who == first
            seen.add(first)
    assert len(seen) == 2  # sessions are spread round robin
    assert env.stats("dns")["connections"] == 4


def test_udp_session_moves_when_its_endpoint_is_removed(env: Env) -> None:
    env.udp_echo("127.0.0.2", 5354)
    env.udp_echo("127.0.0.3", 5354)
    eps = [("127.0.0.2", 5354), ("127.0.0.3", 5354)]
    env.apply(service("mv", "10.96.0.54", 53, "UDP"), slice_("mv", eps, "UDP"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(3)
        u.sendto(b"a", ("10.96.0.54", 53))
        first = u.recvfrom(2048)[0].partition(b"|")[0].decode()
        keep = [e for e in eps if f"{e[0]}:{e[1]}" != first]
        env.apply(slice_("mv", keep, "UDP"))
        u.sendto(b"b", ("10.96.0.54", 53))  # same client address: same session key
        data, src = u.recvfrom(2048)
        assert src == ("10.96.0.54", 53)
        assert data == f"{keep[0][0]}:{keep[0][1]}|b".encode()


def test_no_endpoints_refused_at_once(env: Env) -> None:
    env.apply(service("none", "10.96.0.19", 80), service("unone", "10.96.0.20", 53, "UDP"))
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        connect("10.96.0.19", 80)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(3)
        u.connect(("10.96.0.20", 53))
        # A local sender sees the reject as EPERM on send (netfilter drops its own
        # packet); a remote one gets ICMP port unreachable (ECONNREFUSED).
        with pytest.raises((ConnectionRefusedError, PermissionError)):
            u.send(b"q")
            u.recv(10)
    assert time.monotonic() - t0 < 2


def test_failed_connect_retried_on_another_endpoint(env: Env) -> None:
    env.echo("127.0.0.3", 8083)  # 127.0.0.2:8083 has no listener: connect is refused
    env.apply(
        service("half", "10.96.0.13", 80),
        slice_("half", [("127.0.0.2", 8083), ("127.0.0.3", 8083)]),
    )
    for _ in range(6):
        with connect("10.96.0.13", 80) as s:
            s.sendall(b"ok")
            assert s.recv(2) == b"ok"
    assert env.stats("half")["connect_failures"] >= 3


def test_backend_reset_reaches_client_and_is_counted(env: Env) -> None:
    async def rst(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read(1)
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        w.transport.abort()

    async def start() -> None:
        env.servers.append(await asyncio.start_server(rst, "127.0.0.2", 8084))

    env.loop.run(start())
    env.apply(service("rst", "10.96.0.14", 80), slice_("rst", [("127.0.0.2", 8084)]))
    for _ in range(5):
        with connect("10.96.0.14", 80) as s:
            s.sendall(b"x")
            with pytest.raises(ConnectionResetError):
                s.recv(10)
    deadline = time.monotonic() + 5
    while env.stats("rst")["resets"] < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert env.stats("rst")["resets"] == 5
    assert env.backend.forwarder.running


def test_endpoint_removal_under_load(env: Env) -> None:
    env.echo("127.0.0.2", 8085)
    env.echo("127.0.0.3", 8085)
    both = [("127.0.0.2", 8085), ("127.0.0.3", 8085)]
    env.apply(service("rm", "10.96.0.15", 80), slice_("rm", both))
    errors: list[str] = []
    stop = threading.Event()

    def client(i: int) -> None:
        # Long-lived connections keep echoing across the update; new ones are opened too.
        n = 0
        while not stop.is_set() and n < 2000:
            try:
                with connect("10.96.0.15", 80) as s:
                    for _ in range(20):
                        msg = os.urandom(512)
                        s.sendall(msg)
                        buf = b""
                        while len(buf) < len(msg):
                            chunk = s.recv(4096)
                            assert chunk, "closed"
                            buf += chunk
                        assert buf == msg
                        time.sleep(0.005)
            except (OSError, AssertionError) as e:
                errors.append(f"client {i}: {e!r}")
                return
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    env.apply(slice_("rm", [("127.0.0.3", 8085)]))  # remove 127.0.0.2 under load
    time.sleep(0.3)
    env.served.clear()
    time.sleep(0.7)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert set(env.served) == {"127.0.0.3:8085"}  # new connections avoid the removed one


_ECHO_SERVER = """
import asyncio, sys
async def handle(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except OSError:
        pass
    w.close()
async def main():
    srv = await asyncio.start_server(handle, "127.0.0.2", 8086, backlog=4096)
    print("listening", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
asyncio.run(main())
"""

_CLIENTS = """
import asyncio, sys
N = int(sys.argv[1])
async def main():
    sem = asyncio.Semaphore(500)  # connect in waves: 2 shared cores
    conns = []
    async def one():
        async with sem:
            r, w = await asyncio.wait_for(asyncio.open_connection("10.96.0.16", 80), 60)
            w.write(b"p")
            await w.drain()
            assert await asyncio.wait_for(r.readexactly(1), 60) == b"p"
            conns.append(w)
    await asyncio.gather(*(one() for _ in range(N)))
    print("open", len(conns), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for w in conns:
        w.close()
    await asyncio.sleep(0.5)
    print("closed", flush=True)
asyncio.run(main())
"""


def test_ten_thousand_concurrent_connections_no_fd_leak(env: Env) -> None:
    import resource
    import sys

    base = env.backend.stats()["global"]["open_fds"]
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The forwarder holds two sockets per connection. Clients and the backend run in
    # their own processes; where RLIMIT_NOFILE's hard limit is below 20k + a margin
    # (and cannot be raised without CAP_SYS_RESOURCE) the count is what fits.
    n = min(10_000, (soft - base - 64) // 2)
    assert n >= 5000, f"RLIMIT_NOFILE {soft} is too low for this test"
    env.apply(service("many", "10.96.0.16", 80), slice_("many", [("127.0.0.2", 8086)]))
    procs = []
    try:
        server = subprocess.Popen(
            [sys.executable, "-c", _ECHO_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        procs.append(server)
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        clients = subprocess.Popen(
            [sys.executable, "-c", _CLIENTS, str(n)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(clients)
        assert clients.stdout is not None and clients.stdin is not None
        assert clients.stdout.readline().split() == ["open", str(n)]
        st = env.stats("many")
        assert st["connections"] == n and st["active"] == n
        peak = env.backend.stats()["global"]["open_fds"]
        assert peak - base >= 2 * n
        clients.stdin.write("\n")
        clients.stdin.flush()
        assert clients.stdout.readline().strip() == "closed"
        deadline = time.monotonic() + 30
        while env.stats("many")["active"] and time.monotonic() < deadline:
            time.sleep(0.1)
        g = env.backend.stats()["global"]
        assert env.stats("many")["active"] == 0
        # Idle pipes are pooled (two descriptors each); every socket is gone.
        assert g["open_fds"] - base <= 2 * g["idle_pipes"] + 4, g
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


def test_metrics_and_cleanup(env: Env) -> None:
    from kproxy.dataplane.userspace import ForwarderMetrics, UserspaceBackend

    env.echo("127.0.0.2", 8087)
    env.apply(service("m", "10.96.0.17", 80), slice_("m", [("127.0.0.2", 8087)]))
    with connect("10.96.0.17", 80) as s:
        s.sendall(b"abc")
        assert s.recv(3) == b"abc"
    text = ForwarderMetrics(env.backend.forwarder).render()
    assert 'kproxy_userspace_connections_total{service="t/m:p",protocol="TCP",family="IPv4"} 1' in (
        text
    )
    assert "kproxy_userspace_bytes_total" in text
    from kproxy.dataplane import leftovers

    def present() -> bool:
        cmd = ["nft", "list", "table", "inet", "kproxy-userspace"]
        return subprocess.run(cmd, capture_output=True, check=False).returncode == 0

    assert present()
    leftovers.remove_other_modes("userspace")  # a mode keeps its own table
    assert present()
    assert UserspaceBackend.cleanup_static() is False
    assert not present()
    env.backend.sync(env.model, True)  # back; starting another mode removes it
    assert present()
    leftovers.remove_other_modes("nftables")
    assert not present()
