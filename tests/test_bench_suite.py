"""The benchmark suite's plumbing (bench/suite.py, bench/plot.py) without kernel work: the
plan of every part, a fake part run with its budget, the results schema, the normalisers
on synthetic files in each part's own format, and the charts drawn from them. No test
asserts a time."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import plot, suite  # noqa: E402
from bench.__main__ import main as bench_main  # noqa: E402


def _summary(median: float, n: int = 3) -> dict[str, Any]:
    return {
        "n": n,
        "median": median,
        "p10": median * 0.9,
        "p90": median * 1.2,
        "min": median * 0.9,
        "max": median * 1.3,
        "unit": "s",
        "cpu_user_median": median / 2,
        "cpu_sys_median": median / 4,
    }


def synthetic_parts() -> dict[str, dict[str, Any]]:
    """A small results file of each part, in that part's own format."""
    sizes = (1000, 10000)
    iptables = {
        "benchmark": "iptables",
        "host": {"kernel": "test"},
        "cases": [
            {
                "backend": backend,
                "services": n,
                "endpoints_per_service": 2,
                "status": "ok",
                "metrics": {
                    "render_full": _summary(n * 1e-5),
                    "sync_full": _summary(n * 1e-4 * k),
                    "restore_raw": _summary(n * 0.8e-4 * k),
                    "sync_partial": _summary(0.02 * k),
                    "restore_upstream_partial": _summary(0.02 * k * n / 1000),
                },
            }
            for n in sizes
            for k, backend in ((1, "legacy"), (5, "nft"))
        ],
    }
    nftables = {
        "meta": {"kernel": "test", "cpus": 2},
        "cold": [
            {
                "services": n,
                "kproxy_render_s": n * 1e-5,
                "kproxy_nft_s": n * 0.9e-4,
                "kproxy_total_s": n * 1e-4,
                "raw_nft_s": n * 0.9e-4,
                "ratio_total_to_raw": 1.11,
                "kproxy_nft_cpu": {"user": 0.1, "sys": 0.1},
                "raw_nft_cpu": {"user": 0.1, "sys": 0.1},
                "upstream_nft_s": n * 1e-3 if n < 10000 else None,
                "upstream_skipped": "exceeded the cap" if n >= 10000 else None,
            }
            for n in sizes
        ],
        "changes": [
            {
                "services": n,
                "kind": kind,
                "samples": 50,
                "p50_ms": 10.0,
                "p99_ms": 40.0,
                "render_p50_ms": 1.0,
                "nft_p50_ms": 9.0,
            }
            for n in sizes
            for kind in ("endpoint-change", "service-add", "service-remove")
        ],
        "connect": [{"services": 0, "samples": 100, "p50_us": 50.0, "p99_us": 90.0}],
    }
    ipvs = {
        "kernel": "guest",
        "cases": [
            {
                "services": n,
                "kproxy_seconds": n * 1e-4,
                "ipvsadm_restore_seconds": n * 3e-4,
                "one_endpoint_change_seconds": [0.001, 0.002, 0.0015],
            }
            for n in sizes
        ],
    }
    peers = {"direct": (10.0, 5000, 50.0), "kproxy": (5.0, 3000, 100.0)}
    peers |= {"haproxy": (4.5, 3300, 95.0), "socat": (3.0, 1000, 95.0)}
    userspace = {
        "machine": {"cpus": 2, "kernel": "test"},
        "results": {
            name: {
                "throughput_gbit_s": t,
                "connections_per_s": c,
                "latency_p50_us": lat,
                "latency_p99_us": lat * 2,
                "idle_kib_per_connection": 2.0,
            }
            for name, (t, c, lat) in peers.items()
        }
        | {"load_average_1m": [1.0, 2.0]},
    }
    kp = userspace["results"]["kproxy"]
    kp["connections_per_s_vs_haproxy_paired"] = 0.93
    kp["rounds"] = {"connections_per_s": [3000, 2900, 3100]}
    selection = {
        "picks_10_endpoints": {
            algo: {
                "rust_pick_per_s": 4e6,
                "rust_pick_many_per_s": 5e6,
                "reference_python_per_s": 1e5,
            }
            for algo in ("random", "maglev")
        },
        "maglev_build": [{"table_size": 16381, "backends": 10, "build_ms_median": 0.5}],
        "lookup": {"services": 10000, "lookup_per_s": 80000, "lookup_many_per_s": 60000},
    }
    apiserver = {
        "benchmark": "apiserver",
        "cases": [
            {
                "services": n,
                "change_rate_per_second": 100.0,
                "measured": 200,
                "first_sync_seconds": 2.0,
                "latency_p50_seconds": 0.5,
                "latency_p99_seconds": 1.0,
                "rss_mib_after_changes": 100.0,
            }
            for n in sizes
        ],
    }
    return {
        "iptables": iptables,
        "nftables": nftables,
        "ipvs": ipvs,
        "userspace": userspace,
        "selection": selection,
        "apiserver": apiserver,
    }


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    """A results directory with every part's synthetic file, collected into suite.json."""
    for part, data in synthetic_parts().items():
        (tmp_path / f"{part}.json").write_text(json.dumps(data))
    assert suite.collect(tmp_path) == 0
    return tmp_path


def test_dry_run_plans_every_part(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["all", "--quick", "--dry-run"]) == 0
    err = capsys.readouterr().err
    for part in suite.PARTS:
        assert f"  {part}" in err
    assert "bench/results/quick/" in err


def test_plans_bound_every_part_and_pass_the_budget_down() -> None:
    for quick in (True, False):
        for part in suite.PARTS:
            p = suite.plan(part, quick)
            assert 0 < p.budget <= 3600
            assert p.output.name == f"{part}.json"
            assert (p.output.parent == suite.QUICK_RESULTS) is quick
    ipt = suite.plan("iptables", quick=True, budget=100)
    assert "--case-timeout=24" in ipt.argv  # 0.95 x 100 s over 4 cases
    nft = suite.plan("nftables", quick=False, budget=500)
    assert "--upstream-cap=100" in nft.argv
    extra = suite.plan("nftables", quick=True, extra=["--changes=2"])
    assert extra.argv[-1] == "--changes=2"
    with pytest.raises(ValueError):
        suite.plan("nope", quick=True)


def test_part_run_records_cpu_rss_and_normalised_rows(tmp_path: Path) -> None:
    out = tmp_path / "nftables.json"
    data = json.dumps(synthetic_parts()["nftables"])
    script = (
        "import sys, pathlib\n"
        "print('cold 1000: {}'); print('cold 10000: {}')\n"
        f"pathlib.Path({str(out)!r}).write_text({data!r})\n"
    )
    p = suite.Plan(
        "nftables",
        [sys.executable, "-c", script],
        out,
        budget=60,
        steps=2,
        step=suite.re.compile(r"^cold "),
        root=False,
    )
    stream = io.StringIO()
    run = suite.run_part(p, stream, log_dir=tmp_path / "logs")
    assert run["status"] == "ok", run
    assert run["output_written"]
    assert run["cpu_user_s"] is not None and run["peak_rss_kb"] > 0
    assert "2/2" in stream.getvalue()
    doc: dict[str, Any] = {"schema": suite.SCHEMA, "parts": {}, "host": suite.host()}
    entry = suite.record(doc, "nftables", out, run)
    assert entry["status"] == "ok"
    variants = {(r["metric"], r["variant"]) for r in entry["measurements"]}
    assert {("sync_full", "kproxy"), ("sync_full", "raw"), ("sync_full", "upstream")} <= variants
    suite.save(tmp_path / "suite.json", doc)
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert suite.validate(saved) == []


def test_collect_force_keeps_the_run_of_an_unchanged_file(results: Path) -> None:
    suite_path = results / "suite.json"
    doc = json.loads(suite_path.read_text())
    run = {"status": "ok", "output_written": True, "elapsed_s": 1.0, "budget_s": 9.0}
    suite.record(doc, "selection", results / "selection.json", run)
    suite.save(suite_path, doc)
    assert suite.collect(results, force=True) == 0
    kept = json.loads(suite_path.read_text())["parts"]["selection"]
    assert kept["run"] == run and kept["status"] == "ok"
    # A file rewritten since that run is imported, and its run record is dropped.
    data = json.loads((results / "selection.json").read_text())
    data["note"] = "rerun by hand"
    (results / "selection.json").write_text(json.dumps(data))
    assert suite.collect(results, force=True) == 0
    now = json.loads(suite_path.read_text())["parts"]["selection"]
    assert now["run"] is None and now["status"] == "imported"


def test_full_iptables_plan_leaves_out_nft_above_10k() -> None:
    p = suite.plan("iptables", quick=False, budget=1000)
    assert "--nft-max-services=10000" in p.argv
    assert p.steps == 2 * 5  # legacy 1k/10k/30k, nft 1k/10k
    assert "--case-timeout=190" in p.argv  # 0.95 x 1000 s over 5 cases


def test_budget_kills_a_part_that_runs_too_long(tmp_path: Path) -> None:
    p = suite.Plan(
        "userspace",
        [sys.executable, "-c", "import time\nfor _ in range(600): time.sleep(0.1)"],
        tmp_path / "userspace.json",
        budget=1.0,
        root=False,
    )
    run = suite.run_part(p, io.StringIO(), log_dir=tmp_path)
    assert run["status"] == "timeout"
    assert not run["output_written"]
    doc: dict[str, Any] = {"schema": suite.SCHEMA, "parts": {}}
    assert suite.record(doc, "userspace", p.output, run)["status"] == "timeout"


def test_a_missing_tool_skips_the_part(tmp_path: Path) -> None:
    p = suite.Plan("ipvs", ["true"], tmp_path / "ipvs.json", 10, tools=("no-such-tool-kp",))
    p.root = False
    run = suite.run_part(p, io.StringIO(), log_dir=tmp_path)
    assert run["status"] == "skipped" and "no-such-tool-kp" in run["reason"]


def test_schema_of_collected_results(results: Path) -> None:
    doc = json.loads((results / "suite.json").read_text())
    assert suite.validate(doc) == []
    assert set(doc["parts"]) == set(suite.PARTS)
    assert all(e["status"] == "imported" for e in doc["parts"].values())
    for entry in doc["parts"].values():
        assert entry["measurements"]
    # A broken row is reported, not accepted.
    doc["parts"]["ipvs"]["measurements"][0]["median"] = "fast"
    del doc["parts"]["ipvs"]["measurements"][1]["p10"]
    errors = suite.validate(doc)
    assert any("median" in e for e in errors) and any("p10" in e for e in errors)


def test_headline_ratios(results: Path) -> None:
    doc = json.loads((results / "suite.json").read_text())
    by_name = {h["comparison"]: h for h in doc["headline"]}
    legacy = by_name["iptables-legacy: full sync / raw `iptables-legacy-restore` of the same rules"]
    assert legacy["ratio"] == pytest.approx(1.25)
    assert legacy["at"] == "10,000 services"
    # upstream's nftables shape is only measured at 1,000 (cap at 10,000)
    up = by_name["nftables: upstream's rule shape / kproxy's, full load"]
    assert up["at"].startswith("1,000") and up["ratio"] == pytest.approx(10)
    ipvs = by_name["ipvs: `ipvsadm -R` / kproxy (netlink), full programming"]
    assert ipvs["ratio"] == pytest.approx(3)
    assert by_name["userspace: throughput, kproxy / HAProxy"]["ratio"] == pytest.approx(
        5 / 4.5, 1e-3
    )
    assert "| comparison |" in plot.headline_markdown(doc)


def test_plots_from_synthetic_results(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "charts"
    written = plot.plot(results / "suite.json", out)
    names = {p.name for p in written}
    assert {"sync_time.png", "change_latency.png", "forwarding.png", "selection.png"} <= names
    for p in written:
        if p.suffix == ".png":
            data = p.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "ratio" in (out / "headline.md").read_text()
    readme = tmp_path / "README.md"
    parts = "".join(
        f"<!-- bench:{p}:start -->\nstale {p}\n<!-- bench:{p}:end -->\n"
        for p in ("iptables", "nftables", "ipvs", "userspace", "apiserver")
    )
    readme.write_text(f"# x\n\nbefore\n{plot.START}\nold-headline\n{plot.END}\nafter\n{parts}")
    doc = json.loads((results / "suite.json").read_text())
    assert plot.update_readme(readme, doc, written)
    text = readme.read_text()
    assert "old-headline" not in text and "before" in text and "after" in text
    assert "![sync time](charts/sync_time.png)" in text
    # Every part's table is redrawn from its results file, headed by where it came from.
    assert "stale" not in text
    for part in ("iptables", "nftables", "ipvs", "userspace", "apiserver"):
        block = text.split(f"<!-- bench:{part}:start -->")[1].split(f"<!-- bench:{part}:end")[0]
        assert f"{part}.json" in block and "\n|" in block, (part, block)
    parts_data = synthetic_parts()
    kproxy_gbit = parts_data["userspace"]["results"]["kproxy"]["throughput_gbit_s"]
    assert f"| kproxy userspace | {kproxy_gbit:.2f} |" in text
    assert "median of the 3 per-round ratios" in text and "new connections/s 0.93" in text


def test_plot_command(results: Path, tmp_path: Path) -> None:
    argv = ["plot", "--results", str(results / "suite.json"), "--out", str(tmp_path)]
    assert bench_main(argv) == 0
    assert (tmp_path / "sync_time.png").exists()
