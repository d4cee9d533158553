"""userspace mode under faulty peers, and over IPv6: backends that accept and never
answer, that vanish mid-stream, that black-hole the connect; clients that open and drop
thousands of connections. The forwarder must stay up, hold no descriptors afterwards and
count each kind of failure. Same namespace set-up as test_userspace.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import test_userspace
from test_userspace import Env, connect, netns, service, slice_

pytestmark = pytest.mark.kernel

env = test_userspace.env  # the same fixture: a namespace with the forwarder in it


def wait_until(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def _fds(env: Env) -> int:
    return int(env.backend.stats()["global"]["open_fds"])


def _settled(env: Env, base: int) -> bool:
    g = env.backend.stats()["global"]
    return bool(g["open_fds"] - base <= 2 * g["idle_pipes"] + 4)


def test_backend_that_accepts_and_never_answers(env: Env) -> None:
    accepted: list[int] = []
    eofs: list[int] = []

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(1)
        with contextlib.suppress(OSError):
            while await r.read(4096):  # takes what comes, never answers, never closes first
                pass
            eofs.append(1)
        w.close()

    async def start() -> None:
        env.servers.append(await asyncio.start_server(silent, "127.0.0.2", 8091))

    env.loop.run(start())
    env.apply(service("mute", "10.96.0.21", 80), slice_("mute", [("127.0.0.2", 8091)]))
    base = _fds(env)
    clients = []
    for _ in range(200):
        s = connect("10.96.0.21", 80)
        s.sendall(b"hello?")
        clients.append(s)
    for s in clients[:5]:
        s.settimeout(0.2)
        with pytest.raises(TimeoutError):
            s.recv(1)  # nothing comes back, and nothing breaks
    assert wait_until(lambda: env.stats("mute")["active"] == 200)
    for s in clients:
        s.close()  # the client gives up: the forwarder must let go of both sides
    assert wait_until(lambda: env.stats("mute")["active"] == 0), env.stats("mute")
    assert wait_until(lambda: _settled(env, base)), env.backend.stats()["global"]
    assert env.backend.forwarder.running
    # The backend saw the client's close passed on (EOF), not a connection left open.
    assert len(accepted) == 200
    assert wait_until(lambda: len(eofs) == 200), len(eofs)


def test_backend_vanishes_mid_stream(env: Env) -> None:
    blob = bytes(range(256)) * 4096  # 1 MiB

    async def vanish(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read(1)
        w.write(blob)
        await w.drain()
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()  # RST after 1 MiB: the endpoint died mid-stream

    async def start() -> None:
        env.servers.append(await asyncio.start_server(vanish, "127.0.0.2", 8092))

    env.loop.run(start())
    env.apply(service("gone", "10.96.0.22", 80), slice_("gone", [("127.0.0.2", 8092)]))
    outcomes = []
    for _ in range(5):
        got = 0
        with connect("10.96.0.22", 80, timeout=10) as s:
            s.sendall(b"x")
            try:
                while chunk := s.recv(65536):
                    got += len(chunk)
                outcomes.append(("eof", got))
            except ConnectionResetError:
                outcomes.append(("rst", got))
    # The client never sees a clean end of a stream that broke; what arrived is a prefix.
    assert all(kind == "rst" and got <= len(blob) for kind, got in outcomes), outcomes
    assert wait_until(lambda: env.stats("gone")["resets"] >= 5), env.stats("gone")
    assert wait_until(lambda: env.stats("gone")["active"] == 0)
    assert env.backend.forwarder.running


def test_black_holed_endpoint_times_out_and_is_retried(env: Env) -> None:
    # 10.255.0.99 is on the veth's subnet, but nobody answers ARP for it: the SYN goes
    # nowhere and the connect can only time out (connect_timeout_ms is 500 in Env).
    env.echo("127.0.0.3", 8093)
    env.apply(
        service("hole", "10.96.0.23", 80),
        slice_("hole", [("10.255.0.99", 8093), ("127.0.0.3", 8093)]),
    )
    for _ in range(4):
        with connect("10.96.0.23", 80, timeout=10) as s:
            s.sendall(b"ok")
            assert s.recv(2) == b"ok"
    st = env.stats("hole")
    assert st["connect_failures"] >= 1, st  # round robin put at least one on the hole
    assert st["no_endpoint"] == 0


_CHURN = """
import socket, struct, sys
n, ip, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
done = 0
for i in range(n):
    s = socket.socket()
    s.settimeout(10)
    s.connect((ip, port))
    if i % 2:
        s.sendall(b"x" * 100)
    # Half of them vanish with a RST, half with a FIN, without reading the reply.
    if i % 4 < 2:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    done += 1
print(done, flush=True)
"""


def test_clients_that_open_and_drop_thousands_of_connections(env: Env) -> None:
    env.echo("127.0.0.2", 8094)
    env.apply(service("churn", "10.96.0.24", 80), slice_("churn", [("127.0.0.2", 8094)]))
    base = _fds(env)
    n = 3000
    out = subprocess.run(
        [sys.executable, "-c", _CHURN, str(n), "10.96.0.24", "80"],
        capture_output=True, text=True, timeout=240, check=True,
    )  # fmt: skip
    assert out.stdout.split() == [str(n)]
    assert wait_until(lambda: env.stats("churn")["active"] == 0, 30), env.stats("churn")
    st = env.stats("churn")
    assert st["connections"] == n, st
    assert wait_until(lambda: _settled(env, base), 30), env.backend.stats()["global"]
    assert env.backend.forwarder.running
    with connect("10.96.0.24", 80) as s:  # and it still serves
        s.sendall(b"still here")
        assert s.recv(64) == b"still here"


# ----------------------------------------------------------------------------------------
# IPv6


def _slice6(svc: str, addrs: list[tuple[str, int]], proto: str = "TCP") -> dict[str, Any]:
    s = slice_(svc, addrs, proto)
    s["addressType"] = "IPv6"
    s["metadata"]["name"] = f"{svc}-v6"
    return s


def _service6(name: str, ip: str, port: int, proto: str = "TCP") -> dict[str, Any]:
    s = service(name, ip, port, proto)
    s["spec"]["ipFamilies"] = ["IPv6"]
    return s


@pytest.fixture
def env6() -> Iterator[Env]:
    with netns() as name:
        for cmd in (
            "addr add fd00:255::1/64 dev d0 nodad",
            "addr add fd00:1::2/128 dev lo",
            "addr add fd00:1::3/128 dev lo",
            "route add fd00:96::/64 dev d0",
        ):
            subprocess.run(["ip", *cmd.split()], check=True)
        del name
        e = Env(families=(6,), node_ip="fd00:255::1")
        try:
            yield e
        finally:
            e.close()


def test_ipv6_tcp_and_udp_through_the_forwarder(env6: Env) -> None:
    env6.echo("fd00:1::2", 8095)
    env6.echo("fd00:1::3", 8095)
    env6.udp_echo("fd00:1::2", 8096)
    env6.apply(
        _service6("v6", "fd00:96::10", 80),
        _slice6("v6", [("fd00:1::2", 8095), ("fd00:1::3", 8095)]),
        _service6("v6u", "fd00:96::11", 53, "UDP"),
        _slice6("v6u", [("fd00:1::2", 8096)], "UDP"),
    )
    payload = bytes(range(256)) * 1024
    for _ in range(4):
        with socket.create_connection(("fd00:96::10", 80), timeout=5) as s:
            threading.Thread(target=s.sendall, args=(payload,), daemon=True).start()
            buf = b""
            while len(buf) < len(payload):
                chunk = s.recv(65536)
                assert chunk
                buf += chunk
            assert buf == payload
    assert set(env6.served) == {"fd00:1::2:8095", "fd00:1::3:8095"}  # round robin: both
    st = env6.stats("v6")
    assert st["family"] == "IPv6" and st["connections"] == 4
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        u.sendto(b"ping", ("fd00:96::11", 53))
        data, addr = u.recvfrom(256)
        assert data == b"fd00:1::2:8096|ping"
        assert addr[0] == "fd00:96::11" and addr[1] == 53  # the reply comes from the VIP
    rules = subprocess.run(
        ["nft", "-j", "list", "table", "inet", "kproxy-userspace"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "fd00:96::10" in json.dumps(json.loads(rules))
