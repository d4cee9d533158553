"""Selection and lookup benchmarks: `python bench/bench_selection.py`.

Writes bench/results/selection.json: picks/s from Python per algorithm (Rust Selector,
one call per pick and pick_many) against the pure-Python reference model in the same
run; Maglev table build time for M in {16381, 65521} and N in {10, 100, 1000}; lookup
throughput over a table of 10k Services."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from kproxy import Selector, ServiceTable  # noqa: E402
from reference import ReferenceSelector  # noqa: E402

ALGORITHMS = ["random", "round-robin", "least-conn", "source-hash", "maglev"]


def rate(fn: Callable[[], int], min_time: float = 0.5) -> float:
    """Operations per second of fn (which returns how many it did), best of 3."""
    best = 0.0
    for _ in range(3):
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_time / 3:
            done += fn()
        best = max(best, done / elapsed)
    return best


def endpoints(n: int) -> list[str]:
    return [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:80" for i in range(n)]


def picks() -> dict[str, dict[str, float]]:
    eps = endpoints(10)
    srcs = [f"192.0.{i // 256}.{i % 256}" for i in range(1000)]
    out = {}
    for algo in ALGORITHMS:
        rust = Selector(algo, eps)
        ref = ReferenceSelector(algo, eps)

        def one(s: Selector = rust) -> int:
            for src in srcs:
                s.pick(src, 0.0)
            return len(srcs)

        def many(s: Selector = rust) -> int:
            return len(s.pick_many(srcs, 0.0))

        def python(r: ReferenceSelector = ref) -> int:
            for src in srcs:
                r.pick(src, 0.0)
            return len(srcs)

        r1, rm, rp = rate(one), rate(many), rate(python)
        out[algo] = {
            "rust_pick_per_s": round(r1),
            "rust_pick_many_per_s": round(rm),
            "reference_python_per_s": round(rp),
            "ratio_pick": round(r1 / rp, 1),
            "ratio_pick_many": round(rm / rp, 1),
        }
        print(
            f"{algo:12} pick {r1:12,.0f}/s  pick_many {rm:12,.0f}/s  "
            f"python {rp:10,.0f}/s  x{r1 / rp:.1f} / x{rm / rp:.1f}"
        )
    return out


def maglev_builds() -> list[dict[str, float]]:
    out = []
    for size in (16381, 65521):
        for n in (10, 100, 1000):
            a, b = endpoints(n), endpoints(n + 1)[1:]
            sel = Selector("maglev", a, table_size=size)
            times = []
            for i in range(20):
                start = time.perf_counter()
                sel.set_endpoints(b if i % 2 == 0 else a)  # a change: rebuilds the table
                times.append(time.perf_counter() - start)
            ms = sorted(times)[len(times) // 2] * 1000
            out.append({"table_size": size, "backends": n, "build_ms_median": round(ms, 3)})
            print(f"maglev M={size:6} N={n:5}: {ms:8.3f} ms")
    return out


def lookups(n_services: int = 10000) -> dict[str, float]:
    objs: list[dict[str, Any]] = []
    for i in range(n_services):
        ip = f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"
        name = f"s{i}"
        objs.append(
            {
                "kind": "Service",
                "metadata": {"name": name, "namespace": "b"},
                "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": 80}]},
            }
        )
        objs.append(
            {
                "kind": "EndpointSlice",
                "addressType": "IPv4",
                "metadata": {
                    "name": f"{name}-x",
                    "namespace": "b",
                    "labels": {"kubernetes.io/service-name": name},
                },
                "ports": [{"name": "p", "port": 8080}],
                "endpoints": [{"addresses": [f"10.244.{j}.{i % 250 + 1}"]} for j in range(3)],
            }
        )
    start = time.perf_counter()
    table = ServiceTable.from_objects(objs, node_name="n1", cluster_cidrs=["10.244.0.0/16"])
    build = time.perf_counter() - start
    flows: list[tuple[str, str, int, str, Literal["pod", "node", "external"]]] = [
        ("tcp", o["spec"]["clusterIP"], 80, "10.244.0.9", "pod")
        for o in objs
        if o["kind"] == "Service"
    ]
    table.lookup_many(flows[:10])  # builds the index
    one = rate(lambda: len([f for f in flows[:2000] if table.lookup(*f)]))
    many = rate(lambda: len(table.lookup_many(flows)))
    res = {
        "services": n_services,
        "build_s": round(build, 2),
        "lookup_per_s": round(one),
        "lookup_many_per_s": round(many),
    }
    print(
        f"lookup over {n_services} Services: {one:,.0f}/s, lookup_many {many:,.0f}/s "
        f"(table built in {build:.2f} s)"
    )
    return res


def main() -> None:
    results = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "picks_10_endpoints": picks(),
        "maglev_build": maglev_builds(),
        "lookup": lookups(),
    }
    out = ROOT / "bench" / "results" / "selection.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
