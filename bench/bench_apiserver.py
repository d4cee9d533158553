"""Time from an EndpointSlice change at the API server to the kernel rules, and the
daemon's resident memory, with the daemon fed by the in-repo API server.

    python -m bench.bench_apiserver [--services 10000] [--rate 100] [--changes 300]

The API server (tests/apiserver) listens inside a fresh network namespace; kproxy runs
there with ``--kubeconfig``. Each change replaces one endpoint of a random Service's
EndpointSlice at a steady rate. Its latency is the time from the change being applied at
the API server to the end of the first sync that started after it (the daemon's
``sync done in N ms`` log lines, millisecond timestamps): the rules are in the kernel when
iptables-restore returns. Writes bench/results/apiserver.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from apiserver import FakeApiServer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "apiserver.json"
SYNC_LINE = re.compile(r"^(\S+ \S+) I kproxy\] sync done in ([\d.]+) ms")


def service(i: int) -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"name": f"s{i}", "namespace": "bench"},
        "spec": {
            "clusterIP": f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}",
            "ports": [{"name": "http", "port": 80}],
        },
    }


def endpoint_slice(i: int, gen: int, endpoints: int) -> dict[str, Any]:
    base = (i * endpoints + gen) % (250 * 250)
    return {
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"s{i}-1",
            "namespace": "bench",
            "labels": {"kubernetes.io/service-name": f"s{i}"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [
            {"addresses": [f"10.244.{(base + k) // 250 % 250}.{(base + k) % 250 + 1}"]}
            for k in range(endpoints)
        ],
    }


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def syncs(log: Path) -> list[tuple[float, float]]:
    """(start, end) epoch seconds of each sync from the daemon's log."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = SYNC_LINE.match(line)
        if m:
            end = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((end - float(m.group(2)) / 1000, end))
    return out


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def run(services: int, endpoints: int, rate: float, changes: int) -> dict[str, Any]:
    ns = f"kpb-api{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    srv = FakeApiServer(netns=ns, bookmark_interval=5.0)
    proc: subprocess.Popen[bytes] | None = None
    tmp = Path(tempfile.mkdtemp(prefix="kproxy-bench-"))
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        srv.start()
        srv.apply({"kind": "Node", "metadata": {"name": "node1"}})
        for i in range(services):
            srv.apply(service(i))
            srv.apply(endpoint_slice(i, 0, endpoints))
        log = tmp / "kproxy.log"
        argv = [
            "ip", "netns", "exec", ns, sys.executable, "-m", "kproxy",
            "--kubeconfig", srv.kubeconfig(tmp / "kubeconfig"),
            "--hostname-override", "node1", "--cluster-cidr", "10.244.0.0/16",
            "--healthz-bind-address", "127.0.0.1:10256",
            "--metrics-bind-address", "127.0.0.1:10249", "-v", "2",
        ]  # fmt: skip
        env = dict(os.environ, KPROXY_IPTABLES_BACKEND="nft")
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
        for _ in range(6000):
            if syncs(log):
                break
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()[-3000:])
            time.sleep(0.1)
        first_sync = time.monotonic() - started
        time.sleep(2.0)
        rss_synced = rss_mib(proc.pid)
        applied: list[float] = []
        gens = [0] * services
        interval = 1.0 / rate
        t0 = time.monotonic()
        for n in range(changes):
            delay = t0 + n * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            i = random.randrange(services)
            gens[i] += 1
            srv.apply(endpoint_slice(i, gens[i], endpoints))
            applied.append(time.time())
        time.sleep(5.0)
        rss_after = rss_mib(proc.pid)
        done = syncs(log)
        latencies = []
        for t in applied:
            end = next((e for s, e in done if s >= t), None)
            if end is not None:
                latencies.append(end - t)
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
        srv.stop()
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return {
        "services": services,
        "endpoints_per_service": endpoints,
        "change_rate_per_second": rate,
        "changes": changes,
        "measured": len(latencies),
        "first_sync_seconds": round(first_sync, 3),
        "latency_p50_seconds": round(quantile(latencies, 0.50), 4),
        "latency_p99_seconds": round(quantile(latencies, 0.99), 4),
        "latency_max_seconds": round(max(latencies, default=float("nan")), 4),
        "rss_mib_synced": round(rss_synced, 1),
        "rss_mib_after_changes": round(rss_after, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_apiserver", description=__doc__)
    p.add_argument("--services", default="10000", help="comma-separated counts (10000)")
    p.add_argument("--endpoints", type=int, default=4, help="endpoints per Service (4)")
    p.add_argument("--rate", type=float, default=100.0, help="endpoint changes per second")
    p.add_argument("--changes", type=int, default=300, help="changes per case (300)")
    args = p.parse_args(argv)
    cases: list[dict[str, Any]] = []
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for n in (n for n in args.services.split(",") if n.strip()):
        cases.append(run(int(n), args.endpoints, args.rate, args.changes))
        print(f"case {n}: {json.dumps(cases[-1])}", file=sys.stderr, flush=True)
        # Written after every case, so a run cut by its time budget keeps what it measured.
        doc = {"benchmark": "apiserver", "cases": cases}
        RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(cases, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
