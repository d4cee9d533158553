"""iptables-mode sync benchmark (issue 2 item 7).

For each (backend, N Services x M endpoints) case a child process is started with a
time cap. The child builds the model, then measures, each namespace fresh and empty:

- render_full:     the Rust render of a full sync (fresh renderer, no kernel work);
- sync_full:       `IptablesBackend.sync(model, full=True)` into an empty namespace
                   (iptables-save, render, iptables-restore --noflush), as the daemon does;
- restore_raw:     `iptables-restore --noflush` of the same rendered text alone;
- sync_partial:    one EndpointSlice changes one endpoint (one removed, one added), then
                   `IptablesBackend.sync(model, full=False)`; sync_partial_render and
                   sync_partial_restore split it;
- restore_upstream_partial: the restore input upstream kube-proxy writes for the same
                   change (see restore_text.upstream_partial), restored on the same
                   namespace state. It emulates upstream's shape, not upstream's binary.

The child prints one JSON line per sample; the parent aggregates them, so a case cut by
the time cap keeps the samples it finished and names what it skipped."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

from bench import gen, netns
from bench.restore_text import Tables, upstream_partial

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
FULL_SIZES = (1000, 10000, 30000)
QUICK_SIZES = (200, 1000)
BACKENDS = ("legacy", "nft")

# --------------------------------------------------------------------------------------
# child: one case, run as `python -m bench _iptables-case ...`


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _cpu() -> tuple[float, float]:
    """(user, system) seconds of this process plus its reaped children."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + c.ru_utime, s.ru_stime + c.ru_stime


def _timed(metric: str, fn: Callable[[], Any], **extra: Any) -> tuple[Any, float]:
    u0, s0 = _cpu()
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    u1, s1 = _cpu()
    _emit({"metric": metric, "wall": wall, "user": u1 - u0, "sys": s1 - s0, **extra})
    return out, wall


class _Budget:
    """Bounds every loop by count and time: a sample is started only if the previous
    one would still fit before the stage's deadline (or the case's hard deadline for
    the minimum number of samples)."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.hard = self.start + seconds

    def stage(self, fraction_of_rest: float) -> float:
        now = time.monotonic()
        return now + max(0.0, self.hard - now) * fraction_of_rest

    def fits(self, n: int, count: int, minimum: int, last: float, deadline: float) -> bool:
        if n >= count:
            return False
        limit = self.hard if n < minimum else deadline
        return time.monotonic() + last * 1.1 < limit


def _make_backend() -> Any:
    from kproxy.config import ProxyConfig
    from kproxy.dataplane.iptables import IptablesBackend
    from kproxy.node import NodeInfo

    cfg = ProxyConfig(cluster_cidrs=(gen.CLUSTER_CIDR,), hostname_override=gen.NODE_NAME)
    node = NodeInfo(name=gen.NODE_NAME, ips=(gen.NODE_IP,))
    return IptablesBackend(cfg, node, families=(4,))


class _Recorder:
    """Wraps the backend's renderer to keep the last restore input it produced."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.last_text = ""

    @property
    def needs_full(self) -> bool:
        return bool(self.inner.needs_full)

    def render(self, model: Any, full: bool = False, saved: str | None = None) -> Any:
        text, meta = self.inner.render(model, full, saved)
        self.last_text = text
        return text, meta

    def commit(self) -> None:
        self.inner.commit()

    def abort(self) -> None:
        self.inner.abort()

    def set_config(self, config_json: str) -> None:
        self.inner.set_config(config_json)


def run_case(args: argparse.Namespace) -> None:
    """The child: measure one case, print JSON lines."""
    from kproxy import _core
    from kproxy.dataplane.iptables import run_restore

    os.environ["KPROXY_IPTABLES_BACKEND"] = args.backend
    # A private xtables lock: the namespaces are ours alone, and other iptables users
    # on the machine must not add lock waits to the numbers.
    lock = tempfile.NamedTemporaryFile(prefix="kpbench-xtables-", suffix=".lock")
    os.environ["XTABLES_LOCKFILE"] = lock.name
    budget = _Budget(args.budget)
    n, m = args.services, args.endpoints

    def load() -> Any:
        model = _core.Model()
        for obj in gen.objects(n, m):
            key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
            text = json.dumps(obj)
            if obj["kind"] == "Service":
                model.set_service(key, text)
            else:
                model.set_endpoint_slice(key, text)
        return model

    model, _ = _timed("model_load", load)

    # The daemon's render config for this node, read inside a namespace (sysctls).
    with netns.fresh():
        config_json = json.dumps(_make_backend().render_config(4))

    # Rust render of a full sync.
    deadline = budget.stage(0.15)
    text = ""
    meta: dict[str, Any] = {}
    k, last = 0, 0.0
    while budget.fits(k, args.repeats, 1, last, deadline):
        renderer = _core.IptablesRenderer(config_json)
        (text, meta_json), last = _timed("render_full", partial(renderer.render, model, True))
        meta = json.loads(meta_json)
        k += 1
    if not text:
        _emit({"skip": "render_full", "reason": "time cap"})
        return
    stats = meta["stats"]
    _emit({"info": {"restore_bytes_full": len(text), "stats": stats}})

    # Full sync vs raw restore, interleaved so drift hits both alike. The namespace of
    # the last full sync is kept for the one-endpoint changes.
    deadline = budget.stage(0.6 if n >= args.partial_min else 0.95)
    kept = contextlib.ExitStack()
    backend: Any = None
    k, last = 0, 0.0
    try:
        while budget.fits(k, args.repeats, 1, last, deadline):
            kept.close()
            t0 = time.monotonic()
            kept.enter_context(netns.fresh())
            backend = _make_backend()
            recorder = _Recorder(backend.renderers[4])
            backend.renderers[4] = recorder
            _timed("sync_full", partial(backend.sync, model, True))
            with netns.fresh():
                _timed("restore_raw", partial(run_restore, backend.tools[4], text))
            last = time.monotonic() - t0
            k += 1
        if k == 0:
            _emit({"skip": "sync_full", "reason": "time cap"})
            return
        if n < args.partial_min:
            return
        # One-endpoint changes on the synced namespace. `tables` follows the kernel
        # state by replaying each restore input kproxy wrote.
        tables = Tables()
        tables.apply(recorder.last_text)
        deadline = budget.stage(1.0)
        k, last = 0, 0.0
        while budget.fits(k, args.changes, args.changes, last, deadline):
            t0 = time.monotonic()
            i = (n // 2 + k * 7919) % n
            obj = gen.endpoint_slice(i, m, change=k)
            model.set_endpoint_slice(gen.slice_key(i), json.dumps(obj))
            result, wall = _timed("sync_partial", partial(backend.sync, model, False))
            st = result.stats["ipv4"]
            _emit({"metric": "sync_partial_render", "wall": st["render_seconds"]})
            _emit({"metric": "sync_partial_restore", "wall": wall - st["render_seconds"]})
            _emit({"metric": "partial_restore_bytes", "value": st["restore_bytes"]})
            tables.apply(recorder.last_text)
            # Upstream's shape for the same change, restored on the same (current) state:
            # the kernel does the same flush-and-refill work whether or not the content
            # differs.
            chains = _core.service_chain_names(gen.NAMESPACE, gen.service_name(i), "http", "TCP")
            up = upstream_partial(tables, chains)
            _timed(
                "restore_upstream_partial",
                partial(run_restore, backend.tools[4], up),
                bytes=len(up),
            )
            last = time.monotonic() - t0
            k += 1
        if k < args.changes:
            _emit({"skip": "sync_partial", "reason": f"time cap after {k} changes"})
    finally:
        kept.close()
        lock.close()
        s = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        _emit(
            {
                "final": {
                    "cpu_user": s.ru_utime + c.ru_utime,
                    "cpu_sys": s.ru_stime + c.ru_stime,
                    "peak_rss_kb": s.ru_maxrss,
                    "peak_rss_children_kb": c.ru_maxrss,
                }
            }
        )


# --------------------------------------------------------------------------------------
# parent: run the cases with a time cap each, aggregate, write results, print a table


def _summary(values: list[float]) -> dict[str, float | int]:
    values = sorted(values)
    if len(values) >= 2:
        deciles = statistics.quantiles(values, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    else:
        p10 = p90 = values[0]
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p10": p10,
        "p90": p90,
        "min": values[0],
        "max": values[-1],
    }


def aggregate(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The child's JSON lines -> one case's results."""
    samples: dict[str, list[dict[str, Any]]] = {}
    case: dict[str, Any] = {"metrics": {}, "skipped": []}
    for rec in lines:
        if "metric" in rec:
            samples.setdefault(rec["metric"], []).append(rec)
        elif "skip" in rec:
            case["skipped"].append(rec)
        elif "info" in rec:
            case.update(rec["info"])
        elif "final" in rec:
            case.update(rec["final"])
    for name, recs in samples.items():
        if "value" in recs[0]:
            case["metrics"][name] = _summary([r["value"] for r in recs]) | {"unit": "bytes"}
            continue
        summary: dict[str, Any] = _summary([r["wall"] for r in recs]) | {"unit": "s"}
        if "user" in recs[0]:
            summary["cpu_user_median"] = statistics.median(r["user"] for r in recs)
            summary["cpu_sys_median"] = statistics.median(r["sys"] for r in recs)
        if "bytes" in recs[0]:
            summary["bytes_median"] = statistics.median(r["bytes"] for r in recs)
        case["metrics"][name] = summary
    metrics = case["metrics"]
    if "sync_full" in metrics and "restore_raw" in metrics:
        case["ratio_total_raw"] = metrics["sync_full"]["median"] / metrics["restore_raw"]["median"]
    return case


def run_one(
    backend: str, services: int, args: argparse.Namespace
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run one case in a child process with a time cap; returns (case, raw lines)."""
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "_iptables-case",
        f"--backend={backend}",
        f"--services={services}",
        f"--endpoints={args.endpoints}",
        f"--repeats={args.repeats}",
        f"--changes={args.changes}",
        f"--partial-min={args.partial_min}",
        # The child plans for a bit less than the cap, the parent enforces the cap.
        f"--budget={args.case_timeout * 0.9}",
    ]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    status = "ok"
    try:
        out, err = proc.communicate(timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        status = "timeout"
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    finally:
        netns.cleanup(proc.pid)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    case = aggregate(lines)
    case.update(backend=backend, services=services, endpoints_per_service=args.endpoints)
    case["elapsed_s"] = time.monotonic() - started
    if status == "ok" and proc.returncode != 0:
        status = "failed"
        case["error"] = err.strip().splitlines()[-20:]
    if status == "timeout":
        case["skipped"].append({"skip": "rest of case", "reason": f"case cap {args.case_timeout}s"})
    if status == "ok" and case["skipped"]:
        status = "partial"
    case["status"] = status
    return case, lines


def _version(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError as e:
        return f"unavailable: {e}"
    return (proc.stdout or proc.stderr).strip()


def host_info() -> dict[str, Any]:
    from kproxy import __version__

    commit = _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return {
        "kernel": platform.release(),
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "iptables_legacy": _version(["iptables-legacy", "--version"]),
        "iptables_nft": _version(["iptables-nft", "--version"]),
        "kproxy": __version__,
        "git_commit": commit,
        "load_average_at_start": list(os.getloadavg()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def _med(case: dict[str, Any], metric: str) -> float | None:
    entry = case["metrics"].get(metric)
    return None if entry is None else float(entry["median"])


def markdown_table(results: dict[str, Any]) -> str:
    head = (
        "| backend | Services x endpoints | render (full) | full sync | raw restore "
        "| full sync / raw | 1-endpoint change | upstream-shape restore | status |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for case in results["cases"]:
        ratio = case.get("ratio_total_raw")
        change = _med(case, "sync_partial")
        rows.append(
            "| {b} | {n} x {m} | {r} | {s} | {raw} | {ratio} | {c} | {u} | {st} |".format(
                b=case["backend"],
                n=f"{case['services']:,}",
                m=case["endpoints_per_service"],
                r=_fmt(_med(case, "render_full")),
                s=_fmt(_med(case, "sync_full")),
                raw=_fmt(_med(case, "restore_raw")),
                ratio="-" if ratio is None else f"{ratio:.2f}",
                c=_fmt(change),
                u=_fmt(_med(case, "restore_upstream_partial")),
                st=case["status"],
            )
        )
    nft_max = results.get("params", {}).get("nft_max_services")
    if nft_max is not None and any(n > nft_max for n in results["params"].get("sizes", [])):
        rows.append(
            f"\nnft cases above {nft_max:,} Services are not run (`--nft-max-services`): "
            "iptables-nft-restore alone needs minutes for one cold load of 10k Services."
        )
    return head + "\n".join(rows) + "\n"


def main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("the iptables benchmark needs root (network namespaces)", file=sys.stderr)
        return 2
    sizes = QUICK_SIZES if args.quick and not args.sizes else tuple(args.sizes or FULL_SIZES)
    backends = tuple(args.backends or BACKENDS)
    for b in backends:
        if b not in BACKENDS:
            print(f"--backends: {b!r} is not legacy or nft", file=sys.stderr)
            return 2
    output = Path(
        args.output or RESULTS / ("iptables-quick.json" if args.quick else "iptables.json")
    )
    stale = netns.cleanup()
    if stale:
        print(f"removed stale namespaces: {' '.join(stale)}", file=sys.stderr)
    results: dict[str, Any] = {
        "benchmark": "iptables",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": host_info(),
        "params": {
            "sizes": list(sizes),
            "backends": list(backends),
            "endpoints_per_service": args.endpoints,
            "repeats": args.repeats,
            "changes": args.changes,
            "partial_min": args.partial_min,
            "case_timeout_s": args.case_timeout,
            "nft_max_services": getattr(args, "nft_max_services", None),
        },
        "cases": [],
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    nft_max = getattr(args, "nft_max_services", None)
    for services in sizes:
        for backend in backends:
            if backend == "nft" and nft_max is not None and services > nft_max:
                print(f"-- nft {services}: skipped (--nft-max-services {nft_max})", file=sys.stderr)
                continue
            print(f"== {backend} {services} x {args.endpoints}", file=sys.stderr, flush=True)
            case, _ = run_one(backend, services, args)
            results["cases"].append(case)
            print(
                f"   {case['status']} in {case['elapsed_s']:.0f}s: "
                + ", ".join(
                    f"{k}={_fmt(v['median'])}"
                    for k, v in case["metrics"].items()
                    if v.get("unit") == "s"
                ),
                file=sys.stderr,
                flush=True,
            )
            # Written after every case, so an interrupted run keeps what it measured.
            output.write_text(json.dumps(results, indent=2) + "\n")
    results["markdown"] = markdown_table(results)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(results["markdown"])
    print(f"results: {output}", file=sys.stderr)
    return 0 if all(c["status"] != "failed" for c in results["cases"]) else 1
