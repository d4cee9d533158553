"""IPVS programming benchmark (issue 5): N virtual services x 2 real servers programmed
through kproxy's Rust client (batched generic netlink) and through ``ipvsadm -R`` of the
same set, in the same kernel; plus a one-endpoint change (an EndpointSlice update in the
model) at each N, which must cost O(change): the planner re-plans the one Service the
model's change log names and the reconciler sends its changes, no dump. The same change
through the whole-model path (a JSON plan of every Service diffed against everything
programmed, what syncs did before the planner) is measured in the same run.

IPVS exists only in the qemu guest here, so ``python -m bench.bench_ipvs`` boots the
guest (tests/guest/harness.py) and runs itself inside with ``--inside``; the results
are written to bench/results/ipvs.json. Timings under TCG emulation are slower than on
hardware in absolute terms; the ratio compares both tools in the same guest."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "ipvs.json"
MARK = "KPROXY-BENCH-IPVS-JSON "


def specs(n: int) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    out = []
    for i in range(n):
        addr = f"10.{100 + i // 65000}.{(i // 250) % 260}.{i % 250 + 1}"
        dests = [
            {"addr": f"10.244.{(i + k) % 250}.{k + 10}", "port": 8080, "weight": 1}
            for k in range(2)
        ]
        out.append(({"addr": addr, "protocol": 6, "port": 80, "scheduler": "rr"}, dests))
    return out


def ipvsadm_text(svcs: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> str:
    lines = []
    for vs, dests in svcs:
        v = f"{vs['addr']}:{vs['port']}"
        lines.append(f"-A -t {v} -s rr")
        lines.extend(f"-a -t {v} -r {d['addr']}:{d['port']} -m -w 1" for d in dests)
    return "\n".join(lines) + "\n"


def flush() -> None:
    subprocess.run(["ipvsadm", "-C"], check=True, timeout=600)


def count_services() -> int:
    out = subprocess.run(
        ["ipvsadm", "-Ln"], capture_output=True, text=True, check=True, timeout=600
    ).stdout
    return sum(1 for line in out.splitlines() if line.startswith("TCP "))


def model_change(n: int, changes: int) -> dict[str, Any]:
    """A model of n Services x 2 endpoints programmed through the planner, then
    `changes` one-endpoint changes: incremental (IpvsProxier) and whole-model."""
    from bench import gen
    from kproxy import _core

    sock = _core.IpvsSocket()
    model = _core.Model()
    for obj in gen.objects(n, 2):
        key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
        if obj["kind"] == "Service":
            model.set_service(key, json.dumps(obj))
        else:
            model.set_endpoint_slice(key, json.dumps(obj))
    cfg = json.dumps({"family": "v4", "node_name": gen.NODE_NAME, "scheduler": "rr"})
    flush()
    proxier = _core.IpvsProxier()
    t0 = time.perf_counter()
    proxier.plan(model, cfg, True)
    first = json.loads(proxier.program(sock, [], []))
    first_s = time.perf_counter() - t0
    assert not first["errors"], first["errors"][:3]
    index = n // 2
    slice_key = gen.slice_key(index)
    inc_s, inc_ops, inc_dumps, replanned = [], [], [], []
    for c in range(changes):
        model.set_endpoint_slice(slice_key, json.dumps(gen.endpoint_slice(index, 2, change=c)))
        t0 = time.perf_counter()
        delta = json.loads(proxier.plan(model, cfg, False))
        rep = json.loads(proxier.program(sock, [], []))
        inc_s.append(time.perf_counter() - t0)
        assert not rep["errors"], rep["errors"]
        inc_ops.append(rep["ops"])
        inc_dumps.append(rep["dumps"])
        replanned.append(delta["replanned"])
    # The whole-model path on the same kernel state: plan every Service as JSON,
    # diff everything (a reconciler that already holds this state).
    r = _core.IpvsReconciler()
    r.sync(sock, _core.ipvs_plan(model, cfg), [], [], True)
    whole_s = []
    for c in range(changes, 2 * changes):
        model.set_endpoint_slice(slice_key, json.dumps(gen.endpoint_slice(index, 2, change=c)))
        t0 = time.perf_counter()
        rep = json.loads(r.sync(sock, _core.ipvs_plan(model, cfg), [], [], False))
        whole_s.append(time.perf_counter() - t0)
        assert not rep["errors"], rep["errors"]
    flush()
    return {
        "model_first_sync_seconds": first_s,
        "one_endpoint_change_seconds_median": statistics.median(inc_s),
        "one_endpoint_change_seconds": inc_s,
        "one_endpoint_change_ops": inc_ops,
        "one_endpoint_change_dumps": inc_dumps,
        "one_endpoint_change_replanned": replanned,
        "whole_model_change_seconds_median": statistics.median(whole_s),
        "whole_model_change_seconds": whole_s,
    }


def inside(sizes: list[int], changes: int) -> dict[str, Any]:
    from kproxy import _core

    sock = _core.IpvsSocket()
    cases = []
    for n in sizes:
        svcs = specs(n)
        objects = n * 3
        plan = json.dumps({"services": svcs})
        # Both tools start from the same kernel state: n services just flushed (a flush
        # leaves the kernel busy with the deleted destinations for a while, which slows
        # the next adds). A warm-up programming and flush puts the first tool there too.
        flush()
        json.loads(_core.IpvsReconciler().sync(sock, plan, [], [], False))
        flush()
        # ipvsadm -R of the same set (process start included: that is the tool).
        text = ipvsadm_text(specs(n))
        t0 = time.perf_counter()
        subprocess.run(["ipvsadm", "-R"], input=text, text=True, check=True, timeout=3600)
        ipvsadm_s = time.perf_counter() - t0
        assert count_services() == n
        flush()
        # kproxy: a fresh reconciler programs everything (one service dump + batches).
        r = _core.IpvsReconciler()
        t0 = time.perf_counter()
        report = json.loads(r.sync(sock, plan, [], [], False))
        kproxy_s = time.perf_counter() - t0
        assert not report["errors"], report["errors"][:3]
        assert count_services() == n
        # A full resync of the same state (one service dump + one real-server dump per
        # service; no changes).
        t0 = time.perf_counter()
        full = json.loads(r.sync(sock, plan, [], [], True))
        full_s = time.perf_counter() - t0
        flush()
        cases.append(
            {
                "services": n,
                "real_servers_per_service": 2,
                "objects": objects,
                "kproxy_seconds": kproxy_s,
                "kproxy_objects_per_second": objects / kproxy_s,
                "kproxy_ops": report["ops"],
                "ipvsadm_restore_seconds": ipvsadm_s,
                "ipvsadm_objects_per_second": objects / ipvsadm_s,
                "ratio_kproxy_over_ipvsadm": ipvsadm_s / kproxy_s,
                "kproxy_full_resync_seconds": full_s,
                "kproxy_full_resync_dumps": full["dumps"],
                "kproxy_full_resync_ops": full["ops"],
                **model_change(n, changes),
            }
        )
    return {
        "benchmark": "ipvs programming: kproxy (Rust, generic netlink) vs ipvsadm -R",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "environment": "qemu TCG guest (tests/guest/harness.py), 2 vCPUs",
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_ipvs", description=__doc__)
    p.add_argument("--sizes", default="1000,10000")
    p.add_argument("--changes", type=int, default=5)
    p.add_argument("--inside", action="store_true", help="run here (needs IPVS)")
    p.add_argument("-o", "--output", default=str(RESULTS))
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.inside:
        print(MARK + json.dumps(inside(sizes, args.changes)), flush=True)
        return 0
    sys.path.insert(0, str(ROOT / "tests"))
    from guest import harness

    reason = harness.skip_reason()
    if reason:
        print(f"cannot run the guest: {reason}", file=sys.stderr)
        return 1
    cmd = f"{sys.executable} -m bench.bench_ipvs --inside --sizes {args.sizes} "
    cmd += f"--changes {args.changes}"
    res = harness.run(cmd, timeout=3600)
    line = next((x for x in res.console.splitlines() if x.startswith(MARK)), None)
    if res.returncode != 0 or line is None:
        print(res.console[-4000:], file=sys.stderr)
        return 1
    data = json.loads(line[len(MARK) :])
    data["guest_seconds"] = res.seconds
    Path(args.output).write_text(json.dumps(data, indent=2) + "\n")
    for c in data["cases"]:
        print(
            f"{c['services']:>6} services: kproxy {c['kproxy_seconds']:.2f}s "
            f"({c['kproxy_objects_per_second']:.0f} obj/s), ipvsadm -R "
            f"{c['ipvsadm_restore_seconds']:.2f}s ({c['ipvsadm_objects_per_second']:.0f} obj/s),"
            f" ratio {c['ratio_kproxy_over_ipvsadm']:.2f}; one-endpoint change "
            f"{c['one_endpoint_change_seconds_median'] * 1000:.1f} ms "
            f"(ops {c['one_endpoint_change_ops'][0]}, dumps {c['one_endpoint_change_dumps'][0]},"
            f" replanned {c['one_endpoint_change_replanned'][0]}; whole-model path "
            f"{c['whole_model_change_seconds_median'] * 1000:.1f} ms)"
        )
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
