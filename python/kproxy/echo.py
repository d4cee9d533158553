"""Echo servers and clients for the network-namespace sandbox.

``serve`` answers every TCP connection and every UDP datagram with one line,
``<pod name> <peer ip>:<peer port>``, so a client learns which pod answered and which
source address that pod saw (masqueraded or not). ``client`` connects (bounded by a
timeout) and prints one JSON object per attempt. ``http-get`` fetches a URL and prints
the status and body as JSON (used to poll the daemon's /healthz inside a namespace).

This module imports only the standard library and never imports the rest of kproxy, so
the sandbox can run it by file path (``python .../echo.py``) even when the compiled core
is not built, and it starts fast.
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

# Outcomes of one client attempt.
ANSWER = "answer"
REFUSED = "refused"  # TCP RST / ICMP unreachable: what a REJECT rule produces
TIMEOUT = "timeout"  # nothing came back: what a DROP rule produces
ERROR = "error"  # anything else (local failure); never expected by a flow

# errnos that mean "something actively rejected the flow".
_REFUSED_ERRNOS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ECONNRESET, errno.EHOSTDOWN}


def _ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p.strip()]


# ---------------------------------------------------------------------------- server


def _serve_tcp(name: str, sock: socket.socket) -> None:
    while True:
        try:
            conn, peer = sock.accept()
        except OSError:
            return
        try:
            conn.settimeout(2.0)
            conn.sendall(f"{name} {peer[0]}:{peer[1]}\n".encode())
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            conn.close()


def _serve_udp(name: str, sock: socket.socket) -> None:
    while True:
        try:
            _, peer = sock.recvfrom(2048)
        except OSError:
            return
        try:
            sock.sendto(f"{name} {peer[0]}:{peer[1]}\n".encode(), peer)
        except OSError:
            pass


def serve(name: str, tcp_ports: Sequence[int], udp_ports: Sequence[int]) -> None:
    """Bind every port, print ``ready`` once all are bound, then serve until killed."""
    threads: list[threading.Thread] = []
    for port in tcp_ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(128)
        threads.append(threading.Thread(target=_serve_tcp, args=(name, s), daemon=True))
    for port in udp_ports:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        u.bind(("0.0.0.0", port))
        threads.append(threading.Thread(target=_serve_udp, args=(name, u), daemon=True))
    for t in threads:
        t.start()
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


# ---------------------------------------------------------------------------- client


def _result(
    outcome: str,
    *,
    local: str | None = None,
    line: str = "",
    detail: str = "",
) -> dict[str, Any]:
    pod: str | None = None
    peer: str | None = None
    if outcome == ANSWER:
        parts = line.split()
        if len(parts) == 2:
            pod, peer = parts
        else:
            outcome, detail = ERROR, f"malformed answer {line!r}"
    return {"outcome": outcome, "pod": pod, "peer": peer, "local": local, "detail": detail}


def _classify(exc: OSError) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return TIMEOUT
    if exc.errno == errno.EPERM:
        # A netfilter DROP in the sender's own OUTPUT path fails the send with EPERM.
        return TIMEOUT
    if exc.errno in _REFUSED_ERRNOS:
        return REFUSED
    return ERROR


def _local_of(sock: socket.socket) -> str | None:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return None
    return f"{host}:{port}"


def probe_tcp(ip: str, port: int, timeout: float, sport: int = 0) -> dict[str, Any]:
    """One TCP connection: the answer line, or refused/timeout."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    local: str | None = None
    try:
        if sport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", sport))
        sock.settimeout(timeout)
        sock.connect((ip, port))
        local = _local_of(sock)
        data = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in data and time.monotonic() < deadline:
            chunk = sock.recv(256)
            if not chunk:
                break
            data += chunk
        line = data.decode(errors="replace").strip()
        if not line:
            return _result(ERROR, local=local, detail="connected but no answer")
        return _result(ANSWER, local=local, line=line)
    except OSError as exc:
        return _result(_classify(exc), local=local or _local_of(sock), detail=repr(exc))
    finally:
        sock.close()


def probe_udp(ip: str, port: int, timeout: float, sport: int = 0) -> dict[str, Any]:
    """One UDP datagram: the answer line, refused (ICMP unreachable) or timeout."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if sport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", sport))
        sock.settimeout(timeout)
        # connect() so the kernel reports ICMP errors to us as ECONNREFUSED.
        sock.connect((ip, port))
        local = _local_of(sock)
        try:
            sock.send(b"ping\n")
        except PermissionError:
            # Netfilter in our own OUTPUT path refused the datagram. A REJECT rule still
            # sends us an ICMP error, which recv() reports; a DROP leaves recv() to time out.
            pass
        data = sock.recv(2048)
        return _result(ANSWER, local=local, line=data.decode(errors="replace").strip())
    except OSError as exc:
        return _result(_classify(exc), local=_local_of(sock), detail=repr(exc))
    finally:
        sock.close()


def probe(proto: str, ip: str, port: int, timeout: float, sport: int = 0) -> dict[str, Any]:
    if proto == "tcp":
        return probe_tcp(ip, port, timeout, sport)
    if proto == "udp":
        return probe_udp(ip, port, timeout, sport)
    raise ValueError(f"unknown protocol {proto!r}")


# ---------------------------------------------------------------------------- http


def http_get(url: str, timeout: float) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return {"status": resp.status, "body": resp.read(65536).decode(errors="replace")}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read(65536).decode(errors="replace")}
    except (OSError, ValueError) as exc:
        return {"status": 0, "body": repr(exc)}


# ---------------------------------------------------------------------------- cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kproxy.echo", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="answer TCP connections and UDP datagrams")
    s.add_argument("--name", required=True, help="pod name to answer with")
    s.add_argument("--tcp", default="", help="comma-separated TCP ports")
    s.add_argument("--udp", default="", help="comma-separated UDP ports")
    c = sub.add_parser("client", help="connect and print one JSON line per attempt")
    c.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    c.add_argument("--ip", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--timeout", type=float, default=1.0)
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--sport", type=int, default=0, help="fixed source port (0: ephemeral)")
    h = sub.add_parser("http-get", help="GET a URL, print status and body as JSON")
    h.add_argument("url")
    h.add_argument("--timeout", type=float, default=1.0)
    args = parser.parse_args(argv)

    if args.cmd == "serve":
        serve(args.name, _ports(args.tcp), _ports(args.udp))
        return 0
    if args.cmd == "client":
        for _ in range(max(1, args.count)):
            res = probe(args.proto, args.ip, args.port, args.timeout, args.sport)
            print(json.dumps(res), flush=True)
        return 0
    print(json.dumps(http_get(args.url, args.timeout)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
