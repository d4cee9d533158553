"""userspace mode benchmark: `python bench/bench_userspace.py` (root; Debian packages
haproxy, iperf3, apache2-utils, socat).

In one fresh network namespace and one run, the same backends are reached directly,
through kproxy (the daemon in userspace mode, capture by nftables redirect), through
HAProxy (tcp mode) and through socat (fork per connection):

- single-stream throughput: iperf3, 4 s;
- new connections per second: ab, one connection per request, against an HAProxy
  instance that answers HTTP 200 itself (so the backend is not the bottleneck);
- added latency: p50/p99 of a 1-byte request/response on one connection, minus direct
  in the same round (the median of the rounds);
- every measurement runs in 5 rounds interleaving the targets; each figure is the
  median of its rounds (the rounds are kept in the results), and kproxy / HAProxy is
  also given as the median of per-round ratios, which cancels load that lasts a round;
- memory per idle proxied connection: RSS growth of the proxy process(es) with N idle
  connections open (kernel socket buffers not included, for any proxy).

Writes bench/results/userspace.json and prints a markdown table."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import netns  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "userspace.json"
IPERF = ("127.0.0.2", 5201)
HTTP = ("127.0.0.3", 8080)
ECHO = ("127.0.0.4", 7007)
VIPS = {"iperf": ("10.96.0.10", 5201), "http": ("10.96.0.11", 80), "echo": ("10.96.0.12", 7)}
HAPROXY_PORTS = {"iperf": 15201, "http": 15080, "echo": 15007}
SOCAT_PORTS = {"iperf": 16201, "http": 16080, "echo": 16007}
IDLE_CONNECTIONS = 2000
ROUNDS = 5


def manifests(d: Path) -> None:
    docs: list[dict[str, Any]] = []
    for name, (vip, port) in VIPS.items():
        ip, tport = {"iperf": IPERF, "http": HTTP, "echo": ECHO}[name]
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": "bench"},
                "spec": {"clusterIP": vip, "ports": [{"name": "p", "port": port}]},
            }
        )
        docs.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": name,
                    "namespace": "bench",
                    "labels": {"kubernetes.io/service-name": name},
                },
                "addressType": "IPv4",
                "ports": [{"name": "p", "port": tport, "protocol": "TCP"}],
                "endpoints": [{"addresses": [ip], "nodeName": "bench"}],
            }
        )
    (d / "svc.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))


def haproxy_cfg(d: Path) -> tuple[Path, Path]:
    """(the HTTP 200 backend's config, the tcp-mode proxy's config)."""
    common = "global\n  maxconn 9000\n  nbthread 2\ndefaults\n  timeout connect 5s\n"
    common += "  timeout client 300s\n  timeout server 300s\n"
    backend = d / "http-backend.cfg"
    backend.write_text(
        common
        + "  mode http\nfrontend f\n  bind {}:{}\n".format(*HTTP)
        + "  http-request return status 200 content-type text/plain string ok\n"
    )
    proxy = d / "proxy.cfg"
    text = common + "  mode tcp\n"
    for name, port in HAPROXY_PORTS.items():
        ip, tport = {"iperf": IPERF, "http": HTTP, "echo": ECHO}[name]
        text += f"listen {name}\n  bind 127.0.0.1:{port}\n  server s {ip}:{tport}\n"
    proxy.write_text(text)
    return backend, proxy


class Echo:
    """A 1-byte echo backend on its own thread (asyncio; holds many idle connections)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            w.close()

        async def start() -> None:
            await asyncio.start_server(handle, *ECHO, backlog=4096)

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)


def wait_port(host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{host}:{port} did not come up")


def throughput(host: str, port: int) -> float:
    best = 0.0
    for _ in range(1):
        out = subprocess.run(
            ["iperf3", "-c", host, "-p", str(port), "-t", "4", "-J"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        try:
            bps = json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]
        except (ValueError, KeyError):
            continue
        best = max(best, bps / 1e9)
    return round(best, 2)


def conn_rate(host: str, port: int, n: int = 20000) -> float:
    out = subprocess.run(
        ["ab", "-q", "-n", str(n), "-c", "16", f"http://{host}:{port}/"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    m = re.search(r"Requests per second:\s+([\d.]+)", out.stdout)
    failed = re.search(r"Failed requests:\s+(\d+)", out.stdout)
    if m is None or (failed and int(failed.group(1)) > 0):
        return 0.0
    return round(float(m.group(1)))


def latency(host: str, port: int, n: int = 5000) -> tuple[float, float]:
    s = socket.create_connection((host, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []
    for _ in range(200):  # warm up
        s.sendall(b"x")
        s.recv(1)
    for _ in range(n):
        t0 = time.perf_counter_ns()
        s.sendall(b"x")
        s.recv(1)
        samples.append((time.perf_counter_ns() - t0) / 1000)
    s.close()
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def idle_memory(host: str, port: int, pids_fn: Any, n: int = IDLE_CONNECTIONS) -> float:
    before = rss_kib(pids_fn())
    conns = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"x")
        s.recv(1)
        conns.append(s)
    time.sleep(1.0)
    after = rss_kib(pids_fn())
    for s in conns:
        s.close()
    return round((after - before) / n, 2)


def main() -> int:
    for tool in ("haproxy", "iperf3", "ab", "socat", "nft"):
        if shutil.which(tool) is None:
            print(f"bench_userspace: {tool} is not installed (scripts/setup.sh)", file=sys.stderr)
            return 1
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kpu-bench-") as tmp, netns.fresh():
        d = Path(tmp)
        try:
            # The ClusterIPs need a route; the capture redirects them to loopback. The
            # route gets a loopback-sized MTU (as the direct and peer paths have), or a
            # connection to a VIP would be held to 1460-byte segments (MSS from the
            # route at connect time) while every other path gets 64 KiB ones.
            for cmd in (
                "link add d0 type veth peer name d1",
                "link set d0 mtu 65535",
                "link set d1 mtu 65535",
                "link set d1 up",
                "link set d0 up",
                "addr add 10.255.0.1/24 dev d0",
                "route add 10.96.0.0/16 dev d0",
            ):
                subprocess.run(["ip", *cmd.split()], check=True)
            Echo()  # daemon thread: lives until the process exits
            manifests(d)
            hb, hp = haproxy_cfg(d)

            def spawn(*argv: str, **kw: Any) -> subprocess.Popen[bytes]:
                p = subprocess.Popen(
                    argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw
                )
                procs.append(p)
                return p

            spawn("iperf3", "-s", "-B", IPERF[0], "-p", str(IPERF[1]))
            spawn("haproxy", "-f", str(hb))
            haproxy = spawn("haproxy", "-f", str(hp))
            socats = []
            for name, port in SOCAT_PORTS.items():
                ip, tport = {"iperf": IPERF, "http": HTTP, "echo": ECHO}[name]
                socats.append(
                    spawn(
                        "socat",
                        f"TCP-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1,backlog=4096",
                        f"TCP:{ip}:{tport}",
                    )
                )
            env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
            kproxy = spawn(
                sys.executable, "-m", "kproxy", "--proxy-mode", "userspace",
                "--manifests", str(d), "--hostname-override", "bench",
                "--metrics-bind-address", "127.0.0.1:10249",
                "--healthz-bind-address", "127.0.0.1:10256", env=env,
            )  # fmt: skip
            for host, port in (IPERF, HTTP, ECHO, ("127.0.0.1", 10249)):
                wait_port(host, port)
            wait_port(*VIPS["echo"])
            targets = {
                "direct": {"iperf": IPERF, "http": HTTP, "echo": ECHO},
                "kproxy": VIPS,
                "haproxy": {k: ("127.0.0.1", p) for k, p in HAPROXY_PORTS.items()},
                "socat": {k: ("127.0.0.1", p) for k, p in SOCAT_PORTS.items()},
            }
            load_before = os.getloadavg()[0]
            # Rounds interleave the targets, so load from elsewhere on the machine that
            # lasts a while falls on every target; the median of the rounds is reported.
            rounds: dict[str, dict[str, list[float]]] = {}
            for round_ in range(ROUNDS):
                for name, t in targets.items():
                    print(f"bench_userspace: round {round_ + 1}: {name}", file=sys.stderr)
                    p50, p99 = latency(*t["echo"])
                    got = rounds.setdefault(name, {})
                    got.setdefault("throughput_gbit_s", []).append(throughput(*t["iperf"]))
                    got.setdefault("connections_per_s", []).append(conn_rate(*t["http"]))
                    got.setdefault("latency_p50_us", []).append(round(p50, 1))
                    got.setdefault("latency_p99_us", []).append(round(p99, 1))
            for name, got in rounds.items():
                r = result.setdefault(name, {})
                for key, vals in got.items():
                    r[key] = round(statistics.median(vals), 2)
                r["rounds"] = got
            result["load_average_1m"] = [load_before, os.getloadavg()[0]]
            for name in ("kproxy", "haproxy", "socat"):
                r = result[name]
                # Added latency: the median of per-round differences from direct (the
                # two ran seconds apart), steadier than a difference of two medians.
                for q in ("p50", "p99"):
                    key = f"latency_{q}_us"
                    pairs = zip(rounds[name][key], rounds["direct"][key], strict=True)
                    r[f"added_latency_{q}_us"] = round(
                        statistics.median(a - b for a, b in pairs), 1
                    )
                direct = result["direct"]["throughput_gbit_s"] or 1.0
                r["throughput_vs_direct"] = round(r["throughput_gbit_s"] / direct, 3)
            # Paired per round (the two ran seconds apart under the same load).
            for key in ("throughput_gbit_s", "connections_per_s"):
                pairs = zip(rounds["kproxy"][key], rounds["haproxy"][key], strict=True)
                ratios = [k / h for k, h in pairs if h > 0]
                if ratios:
                    result["kproxy"][f"{key}_vs_haproxy_paired"] = round(
                        statistics.median(ratios), 3
                    )
            result["kproxy"]["idle_kib_per_connection"] = idle_memory(
                *VIPS["echo"], lambda: [kproxy.pid]
            )
            result["haproxy"]["idle_kib_per_connection"] = idle_memory(
                "127.0.0.1", HAPROXY_PORTS["echo"], lambda: [haproxy.pid]
            )
            result["socat"]["idle_kib_per_connection"] = idle_memory(
                "127.0.0.1",
                SOCAT_PORTS["echo"],
                lambda: [p.pid for p in socats] + [c for p in socats for c in children(p.pid)],
                n=200,
            )
            with urllib.request.urlopen("http://127.0.0.1:10249/metrics", timeout=5) as resp:
                text = resp.read().decode()
            result["kproxy_metrics_sample"] = [
                line for line in text.splitlines() if line.startswith("kproxy_userspace_")
            ][:8]
        finally:
            for p in reversed(procs):
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            subprocess.run(["nft", "delete", "table", "inet", "kproxy-userspace"],
                           capture_output=True, check=False)  # fmt: skip
    out = {
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "notes": "one netns, loopback; client, proxy and server share the CPUs (and other "
        "jobs: see load_average_1m); figures are medians of the interleaved rounds "
        "(results.<path>.rounds); "
        "idle memory is process RSS growth (socat: summed over its forked children, "
        "200 connections)",
        "results": result,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(table(result))
    return 0


def table(r: dict[str, Any]) -> str:
    rows = [
        "| path | throughput (Gbit/s) | vs direct | new conn/s | p50 added (µs) "
        "| p99 added (µs) | KiB per idle conn |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("direct", "kproxy", "haproxy", "socat"):
        x = r[name]
        rows.append(
            f"| {name} | {x['throughput_gbit_s']} | {x.get('throughput_vs_direct', 1.0)} "
            f"| {x['connections_per_s']} | {x.get('added_latency_p50_us', 0)} "
            f"| {x.get('added_latency_p99_us', 0)} | {x.get('idle_kib_per_connection', '-')} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
