"""The benchmark suite: one command runs every part (or one), bounded in time, and writes
one results file in one schema (issue 8).

    python -m bench all [--quick] [--budget S] [--parts a,b] [--dry-run] [--no-plot]
    python -m bench nftables [--quick] [--budget S] [--part-args '--sizes 1000']
    python -m bench collect        # normalise the parts' existing files, run nothing
    python -m bench plot           # charts + headline table from bench/results/suite.json

Each part is its own benchmark module (bench/iptables_sync.py, bench/bench_*.py), which
creates its own network namespaces (or, for ipvs, a qemu guest). The suite runs each one as
a child process in its own process group with a time budget (``--budget`` seconds per
part; on expiry the group is killed and the part's stale namespaces removed), passes the
budget down where the part has its own caps, shows a progress bar built from the part's
output lines, and measures the child tree's CPU user/system time and peak RSS (wait4).
Then it reads the part's own results file (left in the part's own format) and adds its
measurements, normalised, to ``suite.json``: one row per (case, metric, variant, x) with
median, p10, p90 (null where the part reports no spread), p99 when reported, and n.

Quick mode (``--quick``) runs small sizes, writes under bench/results/quick/ and leaves
the committed results alone."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
QUICK_RESULTS = RESULTS / "quick"
LOGS = RESULTS / "tmp" / "logs"  # gitignored
SCHEMA = "kproxy-bench-suite/1"
PARTS = ("iptables", "nftables", "ipvs", "userspace", "selection", "apiserver")

# Seconds per part. Full budgets fit the default sizes on a loaded 2-core machine; the
# parts' own caps (iptables --case-timeout, nftables --upstream-cap) are derived from it.
BUDGET_FULL = {
    "iptables": 1500.0,  # nft 10k alone: ~3-5 min per full sync + raw restore pair
    "nftables": 1200.0,
    "ipvs": 1500.0,
    "userspace": 600.0,
    "selection": 300.0,
    "apiserver": 900.0,
}
BUDGET_QUICK = {
    "iptables": 240.0,
    "nftables": 240.0,
    "ipvs": 900.0,  # booting the TCG guest alone takes a minute or two
    "userspace": 300.0,
    "selection": 150.0,
    "apiserver": 300.0,
}


# --------------------------------------------------------------------------------------
# plans: how each part is started


@dataclass
class Plan:
    part: str
    argv: list[str]
    output: Path  # the part's own results file
    budget: float
    steps: int | None = None  # expected progress lines (None: time only)
    step: re.Pattern[str] | None = None
    tools: tuple[str, ...] = ()
    root: bool = True
    params: dict[str, Any] = field(default_factory=dict)


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def plan(
    part: str,
    quick: bool,
    budget: float | None = None,
    results: Path | None = None,
    extra: Iterable[str] = (),
    iptables: argparse.Namespace | None = None,
) -> Plan:
    """The child command of one part. `extra` is appended to the part's own arguments;
    `iptables` carries `python -m bench iptables`' own options (kept from before the suite)."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r} (one of {', '.join(PARTS)})")
    out_dir = results or (QUICK_RESULTS if quick else RESULTS)
    output = out_dir / f"{part}.json"
    b = float(budget if budget is not None else (BUDGET_QUICK if quick else BUDGET_FULL)[part])
    extra = list(extra)
    if part == "iptables":
        o = iptables or argparse.Namespace()
        sizes = getattr(o, "sizes", None) or ([200, 1000] if quick else [1000, 10000, 30000])
        backends = getattr(o, "backends", None) or ["legacy", "nft"]
        nft_max = getattr(o, "nft_max_services", None)
        if nft_max is None and not quick and not getattr(o, "sizes", None):
            nft_max = 10000  # iptables-nft-restore cannot cold-load 30k in any sane budget
        cases = sum(
            1 for n in sizes for b in backends if not (b == "nft" and nft_max and n > nft_max)
        )
        case_timeout = getattr(o, "case_timeout", None) or max(20.0, b * 0.95 / cases)
        if getattr(o, "output", None):
            output = Path(o.output)
        argv = _py("-m", "bench", "_iptables-run")
        argv += [f"--sizes={','.join(map(str, sizes))}", f"--backends={','.join(backends)}"]
        argv += [f"--case-timeout={case_timeout:.0f}", f"--output={output}"]
        if nft_max:
            argv.append(f"--nft-max-services={nft_max}")
        for opt, quick_default in (
            ("endpoints", None),
            ("repeats", 3),
            ("changes", 3),
            ("partial_min", None),
        ):
            value = getattr(o, opt, None)
            if value is None and quick:
                value = quick_default
            if value is not None:
                argv.append(f"--{opt.replace('_', '-')}={value}")
        return Plan(
            part,
            argv + extra,
            output,
            b,
            2 * cases,  # a line when a case starts and one when it ends
            re.compile(r"^== (legacy|nft) \d+|^   (ok|partial|timeout|failed) in"),
            ("iptables-legacy", "iptables-nft"),
            params={"sizes": sizes, "backends": backends, "case_timeout_s": case_timeout},
        )
    if part == "nftables":
        if quick:
            sizes, change_sizes, connect_sizes = [200, 1000], [1000], [0, 1000]
            more = ["--changes=10", "--connects=100"]
        else:
            sizes, change_sizes, connect_sizes = [1000, 10000, 30000, 50000], [10000, 30000], [0]
            connect_sizes.append(30000)
            more = []
        cap = min(60.0 if quick else 150.0, b * 0.2)
        argv = _py("-m", "bench.bench_nftables", f"--output={output}")
        argv += ["--sizes=" + ",".join(map(str, sizes))]
        argv += ["--change-sizes=" + ",".join(map(str, change_sizes))]
        argv += ["--connect-sizes=" + ",".join(map(str, connect_sizes))]
        argv += [f"--upstream-cap={cap:.0f}", *more]
        steps = len(sizes) + 3 * len(change_sizes) + len(connect_sizes)
        return Plan(
            part,
            argv + extra,
            output,
            b,
            steps,
            re.compile(r"^(cold|change|connect) "),
            ("nft",),
            params={"sizes": sizes, "upstream_cap_s": cap},
        )
    if part == "ipvs":
        sizes_s = "100,1000" if quick else "1000,10000"
        argv = _py("-m", "bench.bench_ipvs", f"--sizes={sizes_s}", f"--output={output}")
        argv.append("--changes=3" if quick else "--changes=5")
        return Plan(part, argv + extra, output, b, None, None, ("qemu-system-x86_64",))
    # The last three write a fixed path and take few options: run them through _child,
    # which sets their module-level knobs (output path, rounds) and then calls main().
    argv = _py("-m", "bench.suite", "_child", part, f"--output={output}")
    if quick:
        argv.append("--quick")
    if part == "userspace":
        from bench import bench_userspace as us

        rounds = 1 if quick else us.ROUNDS
        return Plan(
            part,
            argv + extra,
            output,
            b,
            rounds * 4,
            re.compile(r"^bench_userspace: round"),
            ("haproxy", "iperf3", "ab", "socat", "nft"),
        )
    if part == "selection":
        return Plan(
            part,
            argv + extra,
            output,
            b,
            12,
            re.compile(r"^\s*(random|round-robin|least-conn|source-hash|maglev |lookup over)"),
            (),
            root=False,
        )
    # apiserver: one "case N:" line per size (200 quick; 1000 and 5000 full)
    return Plan(part, argv + extra, output, b, 1 if quick else 2, re.compile(r"^case \d+:"), ())


def _child(argv: list[str]) -> int:
    """`python -m bench.suite _child PART --output F [--quick] [part args]`."""
    p = argparse.ArgumentParser(prog="python -m bench.suite _child")
    p.add_argument("part", choices=("userspace", "selection", "apiserver"))
    p.add_argument("--output", required=True)
    p.add_argument("--quick", action="store_true")
    args, rest = p.parse_known_args(argv)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.part == "userspace":
        from bench import bench_userspace as us

        us.RESULTS = output
        if args.quick:
            us.ROUNDS = 1
            us.IDLE_CONNECTIONS = 500
        return us.main()
    if args.part == "apiserver":
        from bench import bench_apiserver as api

        api.RESULTS = output
        if args.quick:
            rest = ["--services=200", "--changes=50", "--rate=50", *rest]
        else:
            rest = ["--services=1000,5000", "--changes=200", *rest]
        return api.main(rest)
    # selection writes ROOT/bench/results/selection.json: point ROOT at a scratch tree.
    import tempfile

    from bench import bench_selection as sel

    with tempfile.TemporaryDirectory(prefix="kpbench-selection-") as tmp:
        sel.ROOT = Path(tmp)
        sel.main()
        written = Path(tmp) / "bench" / "results" / "selection.json"
        output.write_text(written.read_text())
    return 0


# --------------------------------------------------------------------------------------
# progress bar


class Progress:
    """One line per part: steps done (from the part's output) and time against budget.
    Redrawn in place on a terminal, a plain line per step (or per minute) otherwise."""

    def __init__(self, plan: Plan, stream: TextIO | None = None, width: int = 28) -> None:
        self.plan, self.width = plan, width
        self.stream = stream or sys.stderr
        self.done = 0
        self.last_line = ""
        self.started = time.monotonic()
        self.last_print = 0.0
        self.tty = self.stream.isatty()
        self.lock = threading.Lock()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        if self.plan.steps:
            frac = min(1.0, self.done / self.plan.steps)
            count = f"{self.done}/{self.plan.steps}"
        else:
            frac = min(1.0, elapsed / self.plan.budget)
            count = "time"
        filled = round(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        tail = self.last_line[:60]
        return (
            f"{self.plan.part:9} [{bar}] {count:>5} {elapsed:6.0f}s/{self.plan.budget:.0f}s {tail}"
        )

    def step(self, text: str) -> None:
        with self.lock:
            self.done += 1
            self.last_line = text.strip()
            self._draw(force=True)

    def tick(self) -> None:
        with self.lock:
            self._draw(force=False)

    def _draw(self, force: bool) -> None:
        now = time.monotonic()
        if self.tty:
            if force or now - self.last_print >= 0.5:
                self.stream.write("\r" + self.line().ljust(110))
                self.stream.flush()
                self.last_print = now
        elif force or now - self.last_print >= 60:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self.last_print = now

    def finish(self, status: str) -> None:
        with self.lock:
            self.last_line = status
            if self.tty:
                self.stream.write("\r" + self.line().ljust(110) + "\n")
            else:
                self.stream.write(self.line() + "\n")
            self.stream.flush()


# --------------------------------------------------------------------------------------
# running one part


def _kill_group(pid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _cleanup_namespaces() -> list[str]:
    """Namespaces left by killed parts: bench.netns' kpbench-<pid>-<n> and
    bench_apiserver's kpb-api<pid>, whose owner process is gone."""
    if os.geteuid() != 0:
        return []
    from bench import netns

    gone = netns.cleanup()
    for name in netns.names():
        m = re.match(r"^kpb-api(\d+)$", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            netns.delete(name)
            gone.append(name)
    return gone


def _missing(p: Plan) -> str | None:
    import shutil

    if p.root and os.geteuid() != 0:
        return "needs root (network namespaces)"
    absent = [t for t in p.tools if shutil.which(t) is None]
    if absent:
        return f"not installed: {', '.join(absent)} (scripts/setup.sh)"
    return None


def run_part(p: Plan, stream: TextIO | None = None, log_dir: Path = LOGS) -> dict[str, Any]:
    """Run one part's child with its budget; returns the part's `run` record."""
    stream = stream or sys.stderr
    run: dict[str, Any] = {
        "mode": "run",
        "command": ["python", *(a.replace(f"{ROOT}/", "") for a in p.argv[1:])],
        "budget_s": p.budget,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": list(os.getloadavg()),
        "params": p.params,
    }
    reason = _missing(p)
    if reason:
        run.update(status="skipped", reason=reason)
        stream.write(f"{p.part:9} skipped: {reason}\n")
        return run
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{p.part}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        x for x in (str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")) if x
    )
    env["PYTHONUNBUFFERED"] = "1"
    progress = Progress(p, stream)
    started_wall = time.time()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        p.argv,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # its own process group, killed as one on expiry
    )
    tail: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        with log_path.open("w") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                tail.append(line.rstrip())
                del tail[:-40]
                if p.step is not None and p.step.search(line):
                    progress.step(line)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    status, rusage, code = "ok", None, None
    deadline = t0 + p.budget
    while True:
        pid, wstatus, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            code = os.waitstatus_to_exitcode(wstatus)
            proc.returncode = code
            break
        if time.monotonic() >= deadline:
            status = "timeout"
            _kill_group(proc.pid)
            _, wstatus, rusage = os.wait4(proc.pid, 0)
            code = os.waitstatus_to_exitcode(wstatus)
            proc.returncode = code
            break
        progress.tick()
        time.sleep(0.2)
    _kill_group(proc.pid)  # anything the part left running in its group
    thread.join(timeout=10)
    removed = _cleanup_namespaces()
    if status == "ok" and code != 0:
        status = "failed"
    run.update(
        status=status,
        returncode=code,
        elapsed_s=round(time.monotonic() - t0, 3),
        # The child and every descendant it waited for (wait4 semantics): CPU is the
        # sum over the tree, peak RSS the largest single process in it.
        cpu_user_s=round(rusage.ru_utime, 3) if rusage else None,
        cpu_sys_s=round(rusage.ru_stime, 3) if rusage else None,
        peak_rss_kb=rusage.ru_maxrss if rusage else None,
        log=os.path.relpath(log_path, ROOT),
    )
    if removed:
        run["removed_namespaces"] = removed
    if status != "ok":
        run["tail"] = tail[-15:]
    fresh = p.output.exists() and p.output.stat().st_mtime >= started_wall - 1
    run["output_written"] = fresh
    progress.finish(f"{status} in {run['elapsed_s']:.0f}s")
    return run


# --------------------------------------------------------------------------------------
# normalising the parts' files into one schema

MEASUREMENT_KEYS = {
    "part": str,
    "case": str,
    "metric": str,
    "variant": str,
    "unit": str,
    "median": float,
    "n": int,
}
OPTIONAL_KEYS = ("x", "x_name", "p10", "p90", "p99", "cpu_user", "cpu_sys", "note")


def m(
    part: str,
    case: str,
    metric: str,
    variant: str,
    unit: str,
    median: float | None,
    *,
    x: float | None = None,
    x_name: str | None = None,
    p10: float | None = None,
    p90: float | None = None,
    p99: float | None = None,
    n: int = 1,
    cpu_user: float | None = None,
    cpu_sys: float | None = None,
    note: str | None = None,
) -> dict[str, Any] | None:
    """One measurement row; None when there is no value (skipped by the part)."""
    if median is None:
        return None
    if n == 1 and p10 is None and p90 is None:
        p10 = p90 = median  # one sample: no spread to report
    return {
        "part": part,
        "case": case,
        "metric": metric,
        "variant": variant,
        "unit": unit,
        "x": x,
        "x_name": x_name,
        "median": float(median),
        "p10": p10,
        "p90": p90,
        "p99": p99,
        "n": n,
        "cpu_user": cpu_user,
        "cpu_sys": cpu_sys,
        "note": note,
    }


def _from_summary(
    part: str, case: str, metric: str, variant: str, s: dict[str, Any] | None, x: float
) -> dict[str, Any] | None:
    if not s:
        return None
    return m(
        part,
        case,
        metric,
        variant,
        s.get("unit", "s"),
        s["median"],
        x=x,
        x_name="services",
        p10=s.get("p10"),
        p90=s.get("p90"),
        n=int(s.get("n", 1)),
        cpu_user=s.get("cpu_user_median"),
        cpu_sys=s.get("cpu_sys_median"),
    )


def norm_iptables(d: dict[str, Any]) -> list[dict[str, Any] | None]:
    rows: list[dict[str, Any] | None] = []
    for c in d.get("cases", []):
        case, x, ms = f"iptables-{c['backend']}", c["services"], c.get("metrics", {})
        for metric, variant, key in (
            ("sync_full", "kproxy", "sync_full"),
            ("sync_full", "raw", "restore_raw"),
            ("render_full", "kproxy", "render_full"),
            ("change", "kproxy", "sync_partial"),
            ("change", "upstream", "restore_upstream_partial"),
        ):
            rows.append(_from_summary("iptables", case, metric, variant, ms.get(key), x))
    return rows


def norm_nftables(d: dict[str, Any]) -> list[dict[str, Any] | None]:
    rows: list[dict[str, Any] | None] = []
    for c in d.get("cold", []):
        x = c["services"]
        for variant, key, cpu in (
            ("kproxy", "kproxy_total_s", "kproxy_nft_cpu"),
            ("raw", "raw_nft_s", "raw_nft_cpu"),
            ("upstream", "upstream_nft_s", "upstream_nft_cpu"),
        ):
            usage = c.get(cpu) or {}
            rows.append(
                m(
                    "nftables",
                    "nftables",
                    "sync_full",
                    variant,
                    "s",
                    c.get(key),
                    x=x,
                    x_name="services",
                    cpu_user=usage.get("user"),
                    cpu_sys=usage.get("sys"),
                    note="cpu: the nft process" if usage else None,
                )
            )
        rows.append(
            m(
                "nftables",
                "nftables",
                "render_full",
                "kproxy",
                "s",
                c.get("kproxy_render_s"),
                x=x,
                x_name="services",
            )
        )
    for c in d.get("changes", []):
        metric = "change" if c["kind"] == "endpoint-change" else f"change_{c['kind']}"
        rows.append(
            m(
                "nftables",
                "nftables",
                metric,
                "kproxy",
                "s",
                c["p50_ms"] / 1000,
                x=c["services"],
                x_name="services",
                p99=c["p99_ms"] / 1000,
                n=c["samples"],
                note="the part reports p50/p99 only",
            )
        )
    for c in d.get("connect", []):
        rows.append(
            m(
                "nftables",
                "nftables",
                "connect_latency",
                "kproxy",
                "us",
                c["p50_us"],
                x=c["services"],
                x_name="services",
                p99=c["p99_us"],
                n=c["samples"],
            )
        )
    return rows


def norm_ipvs(d: dict[str, Any]) -> list[dict[str, Any] | None]:
    rows: list[dict[str, Any] | None] = []
    for c in d.get("cases", []):
        x = c["services"]
        kw: dict[str, Any] = {"x": x, "x_name": "services", "note": "qemu TCG guest"}
        rows.append(m("ipvs", "ipvs", "sync_full", "kproxy", "s", c["kproxy_seconds"], **kw))
        rows.append(m("ipvs", "ipvs", "sync_full", "raw", "s", c["ipvsadm_restore_seconds"], **kw))
        ch = c.get("one_endpoint_change_seconds") or []
        if ch:
            rows.append(
                m(
                    "ipvs",
                    "ipvs",
                    "change",
                    "kproxy",
                    "s",
                    statistics.median(ch),
                    p10=min(ch),
                    p90=max(ch),
                    n=len(ch),
                    **kw,
                )
            )
    return rows


def norm_userspace(d: dict[str, Any]) -> list[dict[str, Any] | None]:
    rows: list[dict[str, Any] | None] = []
    res = d.get("results", {})
    note = "median of the interleaved rounds"
    for variant in ("direct", "kproxy", "haproxy", "socat"):
        r = res.get(variant)
        if not r:
            continue
        for metric, key, unit in (
            ("throughput", "throughput_gbit_s", "Gbit/s"),
            ("connection_rate", "connections_per_s", "1/s"),
            ("rr_latency", "latency_p50_us", "us"),
            ("idle_memory", "idle_kib_per_connection", "KiB"),
        ):
            p99 = r.get("latency_p99_us") if metric == "rr_latency" else None
            rows.append(
                m("userspace", "tcp", metric, variant, unit, r.get(key), p99=p99, note=note)
            )
    return rows


def norm_selection(d: dict[str, Any]) -> list[dict[str, Any] | None]:
    rows: list[dict[str, Any] | None] = []
    for algo, r in d.get("picks_10_endpoints", {}).items():
        for variant, key in (
            ("kproxy", "rust_pick_per_s"),
            ("kproxy_many", "rust_pick_many_per_s"),
            ("python_reference", "reference_python_per_s"),
        ):
            rows.append(m("selection", algo, "picks", variant, "1/s", r.get(key), note="best of 3"))
    for r in d.get("maglev_build", []):
        rows.append(
            m(
                "selection",
                f"maglev M={r['table_size']}",
                "maglev_build",
                "kproxy",
                "s",
                r["build_ms_median"] / 1000,
                x=r["backends"],
                x_name="backends",
                n=20,
                note="median of 20",
            )
        )
    lk = d.get("lookup")
    if lk:
        kw: dict[str, Any] = {"x": lk["services"], "x_name": "services", "note": "best of 3"}
        rows.append(m("selection", "lookup", "lookups", "kproxy", "1/s", lk["lookup_per_s"], **kw))
        rows.append(
            m("selection", "lookup", "lookups", "kproxy_many", "1/s", lk["lookup_many_per_s"], **kw)
        )
    return rows


def norm_apiserver(d: dict[str, Any]) -> list[dict[str, Any] | None]:
    rows: list[dict[str, Any] | None] = []
    for c in d.get("cases", []):
        kw: dict[str, Any] = {"x": c["services"], "x_name": "services"}
        rows.append(
            m(
                "apiserver",
                "apiserver-iptables-nft",
                "e2e_change",
                "kproxy",
                "s",
                c["latency_p50_seconds"],
                p99=c["latency_p99_seconds"],
                n=c["measured"],
                note=f"{c['change_rate_per_second']:g} changes/s",
                **kw,
            )
        )
        rows.append(
            m(
                "apiserver",
                "apiserver-iptables-nft",
                "first_sync",
                "kproxy",
                "s",
                c["first_sync_seconds"],
                **kw,
            )
        )
        rows.append(
            m(
                "apiserver",
                "apiserver-iptables-nft",
                "daemon_rss",
                "kproxy",
                "MiB",
                c["rss_mib_after_changes"],
                **kw,
            )
        )
    return rows


NORMALISERS: dict[str, Callable[[dict[str, Any]], list[dict[str, Any] | None]]] = {
    "iptables": norm_iptables,
    "nftables": norm_nftables,
    "ipvs": norm_ipvs,
    "userspace": norm_userspace,
    "selection": norm_selection,
    "apiserver": norm_apiserver,
}


def normalise(part: str, path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(measurements, the part's own host/meta fields) of a part's results file."""
    d = json.loads(path.read_text())
    rows = [r for r in NORMALISERS[part](d) if r is not None]
    meta: dict[str, Any] = {}
    for key in ("host", "meta", "machine", "kernel", "environment", "when", "timestamp"):
        if key in d:
            meta[key] = d[key]
    if part == "userspace":
        meta["load_average_1m"] = d.get("results", {}).get("load_average_1m")
    return rows, meta


# --------------------------------------------------------------------------------------
# the results file


def _version(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else None


TOOLS = {
    "iptables_legacy": ["iptables-legacy", "--version"],
    "iptables_nft": ["iptables-nft", "--version"],
    "nft": ["nft", "--version"],
    "ipvsadm": ["ipvsadm", "--version"],
    "haproxy": ["haproxy", "-v"],
    "socat": ["socat", "-V"],
    "iperf3": ["iperf3", "--version"],
    "ab": ["ab", "-V"],
    "qemu": ["qemu-system-x86_64", "--version"],
}


def host() -> dict[str, Any]:
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    kproxy_version: str | None
    try:
        from kproxy import __version__ as kproxy_version
    except ImportError:
        kproxy_version = None
    tools = {name: _version(cmd) for name, cmd in TOOLS.items()}
    if tools["socat"]:
        socat = _version(["socat", "-V"]) or ""
        tools["socat"] = next(
            (ln for ln in socat.splitlines() if "version" in ln), socat.splitlines()[0]
        )
    return {
        "kernel": platform.release(),
        "cores": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "kproxy": kproxy_version,
        "git_commit": _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "load_average": list(os.getloadavg()),
        "tools": tools,
    }


def load(path: Path) -> dict[str, Any]:
    if path.exists():
        doc: dict[str, Any] = json.loads(path.read_text())
        if doc.get("schema") == SCHEMA:
            return doc
    return {"schema": SCHEMA, "parts": {}}


def save(path: Path, doc: dict[str, Any]) -> None:
    doc["schema"] = SCHEMA
    doc["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    doc["parts"] = {k: doc["parts"][k] for k in PARTS if k in doc["parts"]}
    from bench import plot

    doc["headline"] = plot.headline(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(
    doc: dict[str, Any], part: str, output: Path, run: dict[str, Any] | None
) -> dict[str, Any]:
    """Put one part's run record and normalised measurements into the document."""
    entry: dict[str, Any] = {
        "source": os.path.relpath(output, ROOT) if output.is_absolute() else str(output),
        "run": run,
    }
    usable = output.exists() and (run is None or run.get("output_written", False))
    if usable:
        digest = _digest(output)
        previous = doc["parts"].get(part, {})
        # Re-importing the very file a suite run wrote keeps that run's record and status.
        kept = run is None and bool(previous.get("run"))
        kept = kept and previous.get("source_sha256") == digest
        if kept:
            run = previous["run"]
        entry["run"] = run
        entry["source_sha256"] = digest
        rows, meta = normalise(part, output)
        entry["measurements"] = rows
        entry["part_meta"] = meta
        if kept:
            entry["status"] = previous.get("status", "imported")
        elif run is None:
            entry["status"] = "imported"
        else:
            entry["status"] = run["status"] if run["status"] != "ok" or rows else "empty"
    else:
        entry["measurements"] = []
        entry["status"] = run["status"] if run else "missing"
        if run and run["status"] == "ok":
            entry["status"] = "empty"
    doc["parts"][part] = entry
    return entry


def validate(doc: dict[str, Any]) -> list[str]:
    """Schema check of a suite.json document; returns the problems (empty when valid)."""
    errors = []
    if doc.get("schema") != SCHEMA:
        errors.append(f"schema is {doc.get('schema')!r}, not {SCHEMA!r}")
    h = doc.get("host", {})
    for key in ("kernel", "cores", "tools"):
        if key not in h:
            errors.append(f"host.{key} missing")
    for part, entry in doc.get("parts", {}).items():
        if part not in PARTS:
            errors.append(f"unknown part {part}")
        for key in ("status", "source", "measurements", "run"):
            if key not in entry:
                errors.append(f"{part}: {key} missing")
        run = entry.get("run")
        if run and run.get("status") not in ("skipped", None):
            for key in ("elapsed_s", "budget_s", "cpu_user_s", "cpu_sys_s", "peak_rss_kb"):
                if key not in run:
                    errors.append(f"{part}: run.{key} missing")
        for i, row in enumerate(entry.get("measurements", [])):
            for key, typ in MEASUREMENT_KEYS.items():
                value = row.get(key)
                if typ is float and isinstance(value, int):
                    continue
                if not isinstance(value, typ):
                    errors.append(f"{part}[{i}].{key} = {value!r} is not {typ.__name__}")
            for key in OPTIONAL_KEYS:
                if key not in row:
                    errors.append(f"{part}[{i}].{key} missing (null when unknown)")
            if row.get("part") != part:
                errors.append(f"{part}[{i}].part = {row.get('part')!r}")
            for key in ("p10", "p90", "p99", "x", "cpu_user", "cpu_sys"):
                v = row.get(key)
                if v is not None and not isinstance(v, int | float):
                    errors.append(f"{part}[{i}].{key} = {v!r} is not a number")
    if not isinstance(doc.get("headline", []), list):
        errors.append("headline is not a list")
    return errors


# --------------------------------------------------------------------------------------
# commands


def run_parts(
    parts: list[str],
    quick: bool,
    budget: float | None,
    results: Path | None = None,
    dry_run: bool = False,
    plots: bool = True,
    extra: Iterable[str] = (),
    iptables: argparse.Namespace | None = None,
    stream: TextIO | None = None,
) -> int:
    stream = stream or sys.stderr
    out_dir = results or (QUICK_RESULTS if quick else RESULTS)
    suite_path = out_dir / "suite.json"
    plans = [plan(p, quick, budget, out_dir, extra, iptables) for p in parts]
    total = sum(p.budget for p in plans)
    stream.write(
        f"bench: {len(plans)} part(s), {'quick' if quick else 'full'}, at most "
        f"{total / 60:.0f} min; results in {os.path.relpath(out_dir, ROOT)}/\n"
    )
    if dry_run:
        for p in plans:
            reason = _missing(p)
            stream.write(
                f"  {p.part:9} budget {p.budget:5.0f}s -> {os.path.relpath(p.output, ROOT)}"
                f"{'  (would skip: ' + reason + ')' if reason else ''}\n"
                f"    {shlex.join(p.argv)}\n"
            )
        return 0
    # A part writing elsewhere (`python -m bench iptables -o /tmp/x.json`) is a one-off
    # run: it is not recorded in the suite, and the charts are not redrawn.
    elsewhere = [p for p in plans if p.output.resolve().parent != out_dir.resolve()]
    if elsewhere:
        worst = 0
        for p in elsewhere:
            run = run_part(p, stream)
            stream.write(f"{p.part}: {run['status']}; results in {p.output} (not in the suite)\n")
            worst = max(worst, int(run["status"] == "failed"))
        return worst
    doc = load(suite_path)
    doc["host"] = host()
    doc["mode"] = "quick" if quick else "full"
    worst = 0
    for p in plans:
        run = run_part(p, stream)
        record(doc, p.part, p.output, run)
        save(suite_path, doc)  # after every part: an interrupted run keeps what it has
        if run["status"] in ("failed",):
            worst = 1
    if plots:
        from bench import plot

        written = plot.plot(suite_path, out_dir)
        for w in written:
            stream.write(f"plot: {os.path.relpath(w, ROOT)}\n")
    stream.write(f"results: {os.path.relpath(suite_path, ROOT)}\n")
    from bench import plot

    print(plot.headline_markdown(load(suite_path)))
    return worst


def collect(results: Path | None = None, parts: Iterable[str] = PARTS, force: bool = False) -> int:
    """Import the parts' existing results files into suite.json without running them."""
    out_dir = results or RESULTS
    suite_path = out_dir / "suite.json"
    doc = load(suite_path)
    doc.setdefault("host", host())
    for part in parts:
        output = out_dir / f"{part}.json"
        if part in doc["parts"] and doc["parts"][part].get("run") and not force:
            continue  # a measured run of the suite wins over an import
        # With --force the part is re-read; its run record survives when the file is
        # still the one that run wrote (same digest), see record().
        if output.exists():
            record(doc, part, output, None)
            print(f"imported {os.path.relpath(output, ROOT)}", file=sys.stderr)
    save(suite_path, doc)
    return 0


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes; bench/results/quick/")
    p.add_argument("--budget", type=float, help="seconds per part (default: per part)")
    p.add_argument("--results", type=Path, help="results directory")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--no-plot", action="store_true", help="do not draw the charts")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        sys.exit(_child(sys.argv[2:]))
    print("use python -m bench all|<part>|plot|collect", file=sys.stderr)
    sys.exit(2)
