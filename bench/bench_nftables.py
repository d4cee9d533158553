"""nftables-mode benchmark (issue 4 item 5): `python -m bench.bench_nftables`.

Every case runs in a fresh, empty network namespace (bench.netns) on the deterministic
cluster of bench.gen (N ClusterIP Services x 2 endpoints). Measured:

- cold sync:   kproxy's full sync (Rust render + one `nft -f` transaction) into an empty
               namespace; `raw`: `nft -f` of the very same text alone; `upstream`: the
               same Services in upstream kube-proxy's shape (one anonymous
               `numgen random mod N vmap { … }` per Service, one chain per endpoint),
               loaded the same way (one `nft -f`), capped per case (recorded as skipped);
- changes:     at each size, >= 50 syncs each of a one-endpoint change (one endpoint
               replaced), one Service added and one removed, each timed as the daemon
               does it (incremental render + `nft -f`); p50 / p99;
- connect():   TCP connect() latency from the namespace to the last Service's ClusterIP
               (DNAT to a local listener) with only that Service and with N Services.

Results go to bench/results/nftables.json; a markdown table is printed. No test asserts
on these numbers."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import gen, netns
from kproxy import _core

RESULTS = Path(__file__).resolve().parent / "results" / "nftables.json"
CLUSTER_CIDR = gen.CLUSTER_CIDR


def _cpu_children() -> tuple[float, float]:
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return c.ru_utime, c.ru_stime


def nft(text: str, timeout: float = 900.0) -> dict[str, float]:
    """One `nft -f -` transaction; wall, user and sys seconds of the nft process."""
    u0, s0 = _cpu_children()
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["nft", "-f", "-"], input=text, capture_output=True, text=True, timeout=timeout
    )
    wall = time.perf_counter() - t0
    u1, s1 = _cpu_children()
    if proc.returncode != 0:
        raise RuntimeError(f"nft -f failed: {proc.stderr[:600]}")
    return {"wall": wall, "user": u1 - u0, "sys": s1 - s0}


def config() -> str:
    return json.dumps(
        {
            "family": "v4",
            "node_name": gen.NODE_NAME,
            "node_ips": [gen.NODE_IP],
            "local_detector": {"kind": "cidr", "cidrs": [CLUSTER_CIDR]},
            "nodeport_addresses": [gen.NODE_IP],
        }
    )


def build_model(services: int, endpoints: int) -> Any:
    model = _core.Model()
    for obj in gen.objects(services, endpoints):
        key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
        if obj["kind"] == "Service":
            model.set_service(key, json.dumps(obj))
        else:
            model.set_endpoint_slice(key, json.dumps(obj))
    return model


def upstream_text(static: str, services: int, endpoints: int) -> str:
    """Upstream kube-proxy's per-Service shape (pkg/proxy/nftables/proxier.go) for the
    same Services: service chain with an anonymous numgen vmap, endpoint chains."""
    t = "ip kube-proxy"
    out = [static]
    elements = []
    for i in range(services):
        ns, name = gen.NAMESPACE, gen.service_name(i)
        base = f"{ns}/{name}/tcp/http"
        svc = f"service-{i:08X}-{base}"
        eps = []
        for j in range(endpoints):
            ip = gen.endpoint_ip(i, j, endpoints)
            ep = f"endpoint-{i:06X}{j:02X}-{base}__{ip}/{gen.TARGET_PORT}"
            out.append(f"add chain {t} {ep}")
            out.append(f"add rule {t} {ep} ip saddr {ip} jump mark-for-masquerade")
            out.append(f"add rule {t} {ep} meta l4proto tcp dnat to {ip}:{gen.TARGET_PORT}")
            eps.append(ep)
        cip = gen.cluster_ip(i)
        out.append(f"add chain {t} {svc}")
        out.append(
            f"add rule {t} {svc} ip daddr {cip} tcp dport {gen.PORT} "
            f"ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade"
        )
        vmap = ", ".join(f"{k} : goto {ep}" for k, ep in enumerate(eps))
        out.append(f"add rule {t} {svc} numgen random mod {len(eps)} vmap {{ {vmap} }}")
        out.append(f"add element {t} cluster-ips {{ {cip} }}")
        elements.append(f"{cip} . tcp . {gen.PORT} : goto {svc}")
    for k in range(0, len(elements), 2000):
        out.append(f"add element {t} service-ips {{ {', '.join(elements[k : k + 2000])} }}")
    return "\n".join(out) + "\n"


def static_part() -> str:
    """The fixed part of the table, as kproxy writes it (no Services)."""
    text, _ = _core.NftablesRenderer(config()).render(_core.Model(), True)
    return text


# ---------------------------------------------------------------------- cold syncs


def cold(
    services: int, endpoints: int, upstream_cap: float, skip_upstream: str = "", repeats: int = 3
) -> dict[str, Any]:
    """kproxy's cold sync and the raw load, alternating, `repeats` times each; the best
    of each is kept (the CPUs are shared, so the minimum is the least disturbed)."""
    model = build_model(services, endpoints)
    row: dict[str, Any] = {"services": services, "endpoints": endpoints, "repeats": repeats}
    best: dict[str, Any] = {}
    raws: list[dict[str, float]] = []
    for _ in range(repeats):
        with netns.fresh():
            r = _core.NftablesRenderer(config())
            t0 = time.perf_counter()
            text, meta = r.render(model, True)
            render = time.perf_counter() - t0
            load = nft(text)
            if not best or render + load["wall"] < best["total"]:
                best = {"render": render, "load": load, "total": render + load["wall"]}
        with netns.fresh():
            raws.append(nft(text))
    row["kproxy_render_s"] = best["render"]
    row["kproxy_nft_s"] = best["load"]["wall"]
    row["kproxy_total_s"] = best["total"]
    row["kproxy_nft_cpu"] = {"user": best["load"]["user"], "sys": best["load"]["sys"]}
    row["chains"] = json.loads(meta)["stats"]["chains"]
    row["bytes"] = len(text)
    raw = min(raws, key=lambda x: x["wall"])
    row["raw_nft_s"] = raw["wall"]
    row["raw_nft_cpu"] = {"user": raw["user"], "sys": raw["sys"]}
    row["ratio_total_to_raw"] = row["kproxy_total_s"] / row["raw_nft_s"]
    if skip_upstream:
        row["upstream_nft_s"] = None
        row["upstream_skipped"] = skip_upstream
        print(f"cold {services}: {json.dumps(row)}", file=sys.stderr, flush=True)
        return row
    up = upstream_text(static_part(), services, endpoints)
    with netns.fresh():
        try:
            u = nft(up, timeout=upstream_cap)
            row["upstream_nft_s"] = u["wall"]
            row["upstream_nft_cpu"] = {"user": u["user"], "sys": u["sys"]}
        except subprocess.TimeoutExpired:
            row["upstream_nft_s"] = None
            row["upstream_skipped"] = f"exceeded the {upstream_cap:g} s cap"
    print(f"cold {services}: {json.dumps(row)}", file=sys.stderr, flush=True)
    return row


# ---------------------------------------------------------------------- changes


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def changes(services: int, endpoints: int, count: int) -> list[dict[str, Any]]:
    model = build_model(services, endpoints)
    rows = []
    with netns.fresh():
        r = _core.NftablesRenderer(config())
        text, _ = r.render(model, True)
        nft(text)
        r.commit()

        def sync() -> tuple[float, float, float]:
            t0 = time.perf_counter()
            text, _ = r.render(model, False)
            t1 = time.perf_counter()
            if text:
                nft(text)
            r.commit()
            t2 = time.perf_counter()
            return t2 - t0, t1 - t0, t2 - t1

        kinds: dict[str, list[tuple[float, float, float]]] = {
            "endpoint-change": [],
            "service-add": [],
            "service-remove": [],
        }
        for k in range(count):
            i = (k * 7919) % services
            model.set_endpoint_slice(
                gen.slice_key(i), json.dumps(gen.endpoint_slice(i, endpoints, change=k))
            )
            kinds["endpoint-change"].append(sync())
            new = services + k
            model.set_service(gen.service_key(new), json.dumps(gen.service(new)))
            model.set_endpoint_slice(gen.slice_key(new), json.dumps(gen.endpoint_slice(new, 2)))
            kinds["service-add"].append(sync())
            model.set_service(gen.service_key(new), None)
            model.set_endpoint_slice(gen.slice_key(new), None)
            kinds["service-remove"].append(sync())
        for kind, samples in kinds.items():
            totals = [s[0] * 1000 for s in samples]
            row = {
                "services": services,
                "kind": kind,
                "samples": len(samples),
                "p50_ms": _pct(totals, 0.5),
                "p99_ms": _pct(totals, 0.99),
                "render_p50_ms": _pct([s[1] * 1000 for s in samples], 0.5),
                "nft_p50_ms": _pct([s[2] * 1000 for s in samples], 0.5),
            }
            rows.append(row)
            print(f"change {json.dumps(row)}", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------- connect()


def _listener(ip_port: tuple[str, int], stop: threading.Event) -> socket.socket:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(ip_port)
    srv.listen(512)
    srv.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def connect_latency(services: int, endpoints: int, samples: int) -> dict[str, Any]:
    """connect() to the last Service's ClusterIP; endpoints are local addresses."""
    last = max(services, 1) - 1
    model = build_model(services, endpoints) if services else _core.Model()
    if not services:
        model.set_service(gen.service_key(last), json.dumps(gen.service(last)))
        model.set_endpoint_slice(
            gen.slice_key(last), json.dumps(gen.endpoint_slice(last, endpoints))
        )
    with netns.fresh():
        for cmd in (
            ["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            ["link", "set", "v0", "up"],
            ["link", "set", "v1", "up"],
            ["addr", "add", f"{gen.NODE_IP}/24", "dev", "v0"],
            ["route", "add", "default", "dev", "v0"],
        ):
            subprocess.run(["ip", *cmd], check=True, capture_output=True)
        ips = [gen.endpoint_ip(last, j, endpoints) for j in range(endpoints)]
        for ip in ips:
            subprocess.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"], check=True)
        r = _core.NftablesRenderer(config())
        text, _ = r.render(model, True)
        nft(text)
        stop = threading.Event()
        servers = [_listener((ip, gen.TARGET_PORT), stop) for ip in ips]
        try:
            target = (gen.cluster_ip(last), gen.PORT)
            lat = []
            for k in range(samples + 20):
                t0 = time.perf_counter()
                with socket.create_connection(target, timeout=2.0):
                    pass
                if k >= 20:  # warm-up
                    lat.append((time.perf_counter() - t0) * 1e6)
        finally:
            stop.set()
            for s in servers:
                s.close()
    row = {
        "services": services,
        "samples": len(lat),
        "p50_us": statistics.median(lat),
        "p99_us": _pct(lat, 0.99),
    }
    print(f"connect {json.dumps(row)}", file=sys.stderr, flush=True)
    return row


# ---------------------------------------------------------------------- report


def markdown(res: dict[str, Any]) -> str:
    out = [
        "| Services x 2 endpoints | kproxy cold sync (render + nft -f) | raw nft -f, same rules "
        "| ratio | upstream shape, nft -f |",
        "|---:|---:|---:|---:|---:|",
    ]
    for c in res["cold"]:
        up = (
            f"{c['upstream_nft_s']:.2f} s"
            if c.get("upstream_nft_s") is not None
            else f"skipped ({c.get('upstream_skipped', '')})"
        )
        out.append(
            f"| {c['services']:,} | {c['kproxy_total_s']:.2f} s "
            f"({c['kproxy_render_s']:.2f} + {c['kproxy_nft_s']:.2f}) | {c['raw_nft_s']:.2f} s "
            f"| {c['ratio_total_to_raw']:.2f} | {up} |"
        )
    out += [
        "",
        "| Services | change | p50 | p99 | render p50 | nft p50 |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for c in res["changes"]:
        out.append(
            f"| {c['services']:,} | {c['kind']} (n={c['samples']}) | {c['p50_ms']:.1f} ms "
            f"| {c['p99_ms']:.1f} ms | {c['render_p50_ms']:.2f} ms | {c['nft_p50_ms']:.1f} ms |"
        )
    out += ["", "| Services in the table | connect() p50 | p99 |", "|---:|---:|---:|"]
    for c in res["connect"]:
        out.append(f"| {c['services']:,} | {c['p50_us']:.0f} µs | {c['p99_us']:.0f} µs |")
    return "\n".join(out)


def _sizes(text: str) -> list[int]:
    return [int(s.replace("_", "")) for s in text.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_nftables", description=__doc__)
    p.add_argument("--sizes", type=_sizes, default=[1000, 10000, 30000, 50000])
    p.add_argument("--change-sizes", type=_sizes, default=[10000, 30000])
    p.add_argument("--connect-sizes", type=_sizes, default=[0, 30000])
    p.add_argument("--endpoints", type=int, default=2)
    p.add_argument("--changes", type=int, default=50, help="changes of each kind (50)")
    p.add_argument("--repeats", type=int, default=3, help="cold-sync repeats, best kept (3)")
    p.add_argument("--connects", type=int, default=500, help="connect() samples (500)")
    p.add_argument(
        "--upstream-cap", type=float, default=300.0, help="seconds per upstream-shape load"
    )
    p.add_argument("-o", "--output", default=str(RESULTS))
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    netns.cleanup()
    nft_version = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout
    res: dict[str, Any] = {
        "meta": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "kernel": platform.release(),
            "nft": nft_version.strip(),
            "cpus": os.cpu_count(),
            "endpoints_per_service": args.endpoints,
            "note": "2 CPUs shared with other jobs; wall-clock seconds; cold: best of repeats",
            "loadavg_at_start": os.getloadavg(),
        },
        "cold": [],
        "changes": [],
        "connect": [],
    }
    out = Path(args.output)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")

    skip = ""
    for n in args.sizes:
        row = cold(n, args.endpoints, args.upstream_cap, skip, args.repeats)
        res["cold"].append(row)
        if row.get("upstream_nft_s") is None and not skip:
            # Quadratic: a larger size cannot fit the cap either.
            skip = f"not run: {row['services']:,} Services already exceeded the cap"
        save()
    for n in args.change_sizes:
        res["changes"].extend(changes(n, args.endpoints, args.changes))
        save()
    for n in args.connect_sizes:
        res["connect"].append(connect_latency(n, args.endpoints, args.connects))
        save()
    res["meta"]["loadavg_at_end"] = os.getloadavg()
    res["markdown"] = markdown(res)
    save()
    print(res["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
