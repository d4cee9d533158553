"""Charts and the headline-ratio table from a suite results file.

    python -m bench plot [--results bench/results/suite.json] [--out DIR] [--readme README.md]

Writes sync_time.png (full sync against the number of Services per mode, log-log, with the
raw tool and upstream's shape beside kproxy), change_latency.png (incremental change
latency), forwarding.png (userspace mode against direct, HAProxy and socat) and
selection.png, next to the results file unless --out is given, and headline.md (the
table). With --readme, the table and the chart links between the markers
``<!-- bench:headline:start -->`` and ``<!-- bench:headline:end -->`` are replaced, and
each part's table between ``<!-- bench:<part>:start -->`` and ``<!-- bench:<part>:end -->``
(iptables, nftables, ipvs, userspace, apiserver) is redrawn from that part's results file."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:headline:start -->", "<!-- bench:headline:end -->"

COLOURS = {
    "kproxy": "#1f77b4",
    "raw": "#7f7f7f",
    "upstream": "#d62728",
    "direct": "#2ca02c",
    "haproxy": "#ff7f0e",
    "socat": "#9467bd",
    "kproxy_many": "#17becf",
    "python_reference": "#8c564b",
}
LABELS = {
    "kproxy": "kproxy",
    "raw": "raw tool, same rules",
    "upstream": "upstream's shape",
    "direct": "direct",
    "haproxy": "HAProxy",
    "socat": "socat",
    "kproxy_many": "kproxy (batch call)",
    "python_reference": "Python reference",
}
RAW_TOOL = {
    "iptables-legacy": "iptables-legacy-restore",
    "iptables-nft": "iptables-nft-restore",
    "nftables": "nft -f",
    "ipvs": "ipvsadm -R",
}


# --------------------------------------------------------------------------------------
# selecting rows


def rows(doc: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    out = []
    for entry in doc.get("parts", {}).values():
        for r in entry.get("measurements", []):
            if all(r.get(k) == v for k, v in match.items()):
                out.append(r)
    return sorted(out, key=lambda r: (r.get("x") is None, r.get("x") or 0))


def value(doc: dict[str, Any], **match: Any) -> float | None:
    found = rows(doc, **match)
    return float(found[0]["median"]) if found else None


def _largest_common_x(doc: dict[str, Any], a: dict[str, Any], b: dict[str, Any]) -> Any:
    xa = {r["x"] for r in rows(doc, **a)}
    xb = {r["x"] for r in rows(doc, **b)}
    common = sorted(x for x in xa & xb if x is not None)
    return common[-1] if common else None


def _fmt_s(v: float) -> str:
    if v < 1e-3:
        return f"{v * 1e6:.0f} µs"
    if v < 1:
        return f"{v * 1e3:.3g} ms"
    return f"{v:.3g} s"


def _fmt(v: float, unit: str) -> str:
    if unit == "s":
        return _fmt_s(v)
    if unit == "1/s":
        return f"{v:,.0f}/s"
    return f"{v:.3g} {unit}"


# --------------------------------------------------------------------------------------
# headline ratios


def headline(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The few ratios the README shows, each measured in one run on one machine.
    `ratio` > 1 means kproxy is better except where `lower_is_better_ratio` says so."""
    out: list[dict[str, Any]] = []

    def pair(
        title: str,
        a: dict[str, Any],
        b: dict[str, Any],
        how: str,
        kproxy_first: bool,
    ) -> None:
        x = _largest_common_x(doc, a, b)
        if x is None:
            return
        va, vb = value(doc, x=x, **a), value(doc, x=x, **b)
        if not va or not vb:
            return
        unit = rows(doc, **a)[0]["unit"]
        out.append(
            {
                "comparison": title,
                "at": f"{x:,.0f} {rows(doc, **a)[0].get('x_name') or ''}".strip(),
                "ratio": round(va / vb, 3),
                "reads": how,
                "numbers": f"{_fmt(va, unit)} vs {_fmt(vb, unit)}",
                "kproxy_first": kproxy_first,
            }
        )

    for case in ("iptables-legacy", "iptables-nft"):
        base = {"case": case}
        pair(
            f"{case}: full sync / raw `{RAW_TOOL[case]}` of the same rules",
            {**base, "metric": "sync_full", "variant": "kproxy"},
            {**base, "metric": "sync_full", "variant": "raw"},
            "time ratio (1.0 = no overhead over the tool)",
            True,
        )
        pair(
            f"{case}: upstream-shape restore / kproxy, one-endpoint change",
            {**base, "metric": "change", "variant": "upstream"},
            {**base, "metric": "change", "variant": "kproxy"},
            "speed-up (> 1: kproxy faster)",
            False,
        )
    base = {"case": "nftables", "metric": "sync_full"}
    pair(
        "nftables: full sync / raw `nft -f` of the same rules",
        {**base, "variant": "kproxy"},
        {**base, "variant": "raw"},
        "time ratio (1.0 = no overhead over the tool)",
        True,
    )
    pair(
        "nftables: upstream's rule shape / kproxy's, full load",
        {**base, "variant": "upstream"},
        {**base, "variant": "kproxy"},
        "speed-up (> 1: kproxy faster)",
        False,
    )
    base = {"case": "ipvs", "metric": "sync_full"}
    pair(
        "ipvs: `ipvsadm -R` / kproxy (netlink), full programming",
        {**base, "variant": "raw"},
        {**base, "variant": "kproxy"},
        "speed-up (> 1: kproxy faster)",
        False,
    )
    for metric, what in (("throughput", "throughput"), ("connection_rate", "new connections/s")):
        k = value(doc, part="userspace", metric=metric, variant="kproxy")
        for peer in ("direct", "haproxy", "socat"):
            v = value(doc, part="userspace", metric=metric, variant=peer)
            if k and v:
                unit = rows(doc, part="userspace", metric=metric)[0]["unit"]
                out.append(
                    {
                        "comparison": f"userspace: {what}, kproxy / {LABELS[peer]}",
                        "at": "loopback, 1 stream" if metric == "throughput" else "ab -c 16",
                        "ratio": round(k / v, 3),
                        "reads": "rate ratio (> 1: kproxy faster)",
                        "numbers": f"{_fmt(k, unit)} vs {_fmt(v, unit)}",
                        "kproxy_first": True,
                    }
                )
    ratios = []
    for r in rows(doc, part="selection", metric="picks", variant="kproxy"):
        py = value(
            doc, part="selection", metric="picks", case=r["case"], variant="python_reference"
        )
        if py:
            ratios.append(r["median"] / py)
    if ratios:
        out.append(
            {
                "comparison": "selection: Rust picks/s / Python reference (median of algorithms)",
                "at": "10 endpoints",
                "ratio": round(statistics.median(ratios), 1),
                "reads": "rate ratio",
                "numbers": f"{min(ratios):.0f}x to {max(ratios):.0f}x",
                "kproxy_first": True,
            }
        )
    return out


def headline_markdown(doc: dict[str, Any]) -> str:
    lines = [
        "| comparison | at | ratio | medians | reads |",
        "|---|---|---:|---|---|",
    ]
    for h in doc.get("headline") or headline(doc):
        lines.append(
            f"| {h['comparison']} | {h['at']} | {h['ratio']:.2f} | {h['numbers']} | {h['reads']} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# per-part tables (README sections between <!-- bench:<part>:start/end --> markers)


def cell(c: dict[str, Any], key: str, kind: str) -> str:
    """One table cell from a results row; "-" when the row lacks the value."""
    v = c.get(key)
    if kind == "str":
        return "-" if v is None else str(v)
    if not isinstance(v, int | float):
        return "-"
    return {
        "s": _fmt_s,
        "rate": "{:,.0f}".format,
        "x": "{:.1f}x".format,
        "2f": "{:.2f}".format,
        "mib": "{:.0f} MiB".format,
        "g": "{:g}".format,
    }[kind](v)


Column = tuple[str, str, str]  # (title, key in the row, cell kind)


def _table(columns: list[Column], rows: Iterable[dict[str, Any]]) -> str:
    """A markdown table: the first column left-aligned, the numbers right-aligned."""
    lines = [
        "| " + " | ".join(title for title, _, _ in columns) + " |",
        "|---|" + "---:|" * (len(columns) - 1),
    ]
    for r in rows:
        lines.append("| " + " | ".join(cell(r, key, kind) for _, key, kind in columns) + " |")
    return "\n".join(lines) + "\n"


def _ipvs_table(data: dict[str, Any]) -> str:
    rows = [
        dict(c, label=f"{c.get('services', 0):,} x {c.get('real_servers_per_service', '?')}")
        for c in data.get("cases", [])
    ]
    return _table(
        [
            ("Services x real servers", "label", "str"),
            ("kproxy (netlink)", "kproxy_seconds", "s"),
            ("objects/s", "kproxy_objects_per_second", "rate"),
            ("`ipvsadm -R`", "ipvsadm_restore_seconds", "s"),
            ("objects/s", "ipvsadm_objects_per_second", "rate"),
            ("speed-up", "ratio_kproxy_over_ipvsadm", "x"),
            ("one-endpoint change (median)", "one_endpoint_change_seconds_median", "s"),
            ("same change, whole-model plan", "whole_model_change_seconds_median", "s"),
            ("full resync, nothing to do", "kproxy_full_resync_seconds", "s"),
        ],
        rows,
    )


def _userspace_table(data: dict[str, Any]) -> str:
    r = data.get("results", {})
    names = {
        "direct": "direct",
        "kproxy": "kproxy userspace",
        "haproxy": "HAProxy (tcp)",
        "socat": "socat",
    }
    direct = r.get("direct", {}).get("throughput_gbit_s") or 1.0
    rows = []
    for key, name in names.items():
        x = dict(r.get(key) or {}, label=name)
        if len(x) == 1:
            continue
        if isinstance(x.get("throughput_gbit_s"), int | float):
            x["vs_direct"] = x["throughput_gbit_s"] / direct
        rows.append(x)
    return _table(
        [
            ("path", "label", "str"),
            ("single-stream throughput (Gbit/s)", "throughput_gbit_s", "2f"),
            ("vs direct", "vs_direct", "2f"),
            ("new connections/s", "connections_per_s", "rate"),
            ("added p50 (µs)", "added_latency_p50_us", "g"),
            ("added p99 (µs)", "added_latency_p99_us", "g"),
            ("KiB per idle connection", "idle_kib_per_connection", "g"),
        ],
        rows,
    ) + _paired_line(r)


def _paired_line(r: dict[str, Any]) -> str:
    """kproxy / HAProxy as the median of per-round ratios, when the run kept them."""
    k = r.get("kproxy") or {}
    parts = [
        f"{what} {k[key]:.2f}"
        for key, what in (
            ("throughput_gbit_s_vs_haproxy_paired", "throughput"),
            ("connections_per_s_vs_haproxy_paired", "new connections/s"),
        )
        if isinstance(k.get(key), int | float)
    ]
    if not parts:
        return ""
    n = len((k.get("rounds") or {}).get("connections_per_s") or [])
    return (
        f"\nkproxy / HAProxy as the median of the {n} per-round ratios (each pair ran "
        f"seconds apart): {', '.join(parts)}."
    )


def _apiserver_table(data: dict[str, Any]) -> str:
    rows = [
        dict(
            c,
            label=f"{c.get('services', 0):,} x {c.get('endpoints_per_service', '?')}",
            changes=f"{cell(c, 'measured', 'g')} ({cell(c, 'change_rate_per_second', 'g')}/s)",
        )
        for c in data.get("cases", [])
    ]
    return _table(
        [
            ("Services x endpoints", "label", "str"),
            ("changes (rate)", "changes", "str"),
            ("first sync", "first_sync_seconds", "s"),
            ("change to kernel p50", "latency_p50_seconds", "s"),
            ("p99", "latency_p99_seconds", "s"),
            ("daemon RSS after changes", "rss_mib_after_changes", "mib"),
        ],
        rows,
    )


def part_markdown(doc: dict[str, Any], part: str) -> str | None:
    """The README table of one part, from the results file the suite recorded for it,
    headed by when and how that part was run; None when the part has no results."""
    entry = doc.get("parts", {}).get(part)
    if not entry or not entry.get("measurements"):
        return None
    source = Path(entry["source"])
    path = source if source.is_absolute() else ROOT / source
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if part == "iptables":
        from bench import iptables_sync

        table = data.get("markdown") or iptables_sync.markdown_table(data)
    elif part == "nftables":
        from bench import bench_nftables

        table = data.get("markdown") or bench_nftables.markdown(data)
    elif part == "ipvs":
        table = _ipvs_table(data)
    elif part == "userspace":
        table = _userspace_table(data)
    elif part == "apiserver":
        table = _apiserver_table(data)
    else:
        return None
    if not table:
        return None
    run = entry.get("run") or {}
    h = doc.get("host", {})
    if run:
        load = run.get("load_average_at_start")
        started = str(run.get("started", "?"))[:16].replace("T", " ")
        how = (
            f"From the bench suite's run of this part, {started} UTC "
            f"(status {entry['status']}, "
            f"{run.get('elapsed_s', 0):.0f} s"
            + (f", load average {load[0]:.1f} at start" if load else "")
            + f"), kernel {h.get('kernel', '?')}, {h.get('cores', '?')} cores"
        )
    else:
        how = "Imported by `python -m bench collect` (this part's own last run, not the suite's)"
    return f"{how}; data: `{entry['source']}`.\n\n{table.rstrip()}\n"


def _replace_block(text: str, start: str, end: str, body: str) -> str | None:
    if start not in text or end not in text:
        return None
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}{end}{tail}"


# --------------------------------------------------------------------------------------
# charts


def _errors(rs: list[dict[str, Any]]) -> tuple[list[float], list[float]] | None:
    lo, hi = [], []
    any_spread = False
    for r in rs:
        top = r["p90"] if r.get("p90") is not None else r.get("p99")
        bottom = r["p10"] if r.get("p10") is not None else r["median"]
        top = r["median"] if top is None else top
        lo.append(max(0.0, r["median"] - bottom))
        hi.append(max(0.0, top - r["median"]))
        any_spread = any_spread or lo[-1] > 0 or hi[-1] > 0
    return (lo, hi) if any_spread else None


def _line(ax: Any, rs: list[dict[str, Any]], label: str, colour: str, style: str = "-") -> None:
    rs = [r for r in rs if r.get("x")]
    if not rs:
        return
    xs = [r["x"] for r in rs]
    ys = [r["median"] for r in rs]
    ax.errorbar(
        xs,
        ys,
        yerr=_errors(rs),
        label=label,
        color=colour,
        linestyle=style,
        marker="o",
        markersize=4,
        capsize=3,
    )


def _loglog(ax: Any, seconds: bool = True) -> None:
    """Log-log axes with plain tick labels (1,000 Services, 120 ms) instead of 10^n."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    if seconds:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_s(v)))
    ax.grid(True, which="both", alpha=0.3)


def _subtitle(doc: dict[str, Any]) -> str:
    h = doc.get("host", {})
    return (
        f"kernel {h.get('kernel', '?')}, {h.get('cores', '?')} cores ({h.get('cpu_model', '?')}); "
        "medians, bars p10-p90 (p50-p99 where only those are reported)"
    )


def plot_sync_time(doc: dict[str, Any], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    cases = [c for c in RAW_TOOL if rows(doc, case=c, metric="sync_full")]
    if not cases:
        return None
    fig, axes = plt.subplots(1, len(cases), figsize=(4.6 * len(cases), 4.4), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        for variant, style in (("kproxy", "-"), ("raw", "--"), ("upstream", ":")):
            label = LABELS[variant]
            if variant == "raw":
                label = f"raw `{RAW_TOOL[case]}`"
            _line(
                ax,
                rows(doc, case=case, metric="sync_full", variant=variant),
                label,
                COLOURS[variant],
                style,
            )
        _loglog(ax)
        ax.set_title(case + (" (qemu TCG guest)" if case == "ipvs" else ""))
        ax.set_xlabel("Services (2 endpoints each)")
        ax.set_ylabel("full sync into an empty namespace")
        ax.legend(fontsize=8)
    fig.suptitle("Full sync time against the number of Services\n" + _subtitle(doc), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_change_latency(doc: dict[str, Any], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    series = []
    styles = {"iptables-legacy": "s", "iptables-nft": "^", "nftables": "o", "ipvs": "D"}
    for case in styles:
        for variant in ("kproxy", "upstream"):
            rs = rows(doc, case=case, metric="change", variant=variant)
            if rs:
                series.append((case, variant, rs))
    e2e = rows(doc, metric="e2e_change")
    if not series and not e2e:
        return None
    panels = 2 if e2e else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 4.6), squeeze=False)
    ax = axes[0][0]
    palette = {"iptables-legacy": "#1f77b4", "iptables-nft": "#2ca02c", "nftables": "#9467bd"}
    palette["ipvs"] = "#8c564b"
    for case, variant, rs in series:
        where = f"{case} (qemu TCG guest)" if case == "ipvs" else case
        label = f"{where}: {'kproxy' if variant == 'kproxy' else 'upstream-shape restore'}"
        style = "-" if variant == "kproxy" else ":"
        _line(ax, rs, label, palette[case], style)
    _loglog(ax)
    ax.set_title("One-endpoint change: incremental sync")
    ax.set_xlabel("Services in the table")
    ax.set_ylabel("sync latency")
    ax.legend(fontsize=7)
    if e2e:
        ax2 = axes[0][1]
        _line(ax2, e2e, "API server -> kernel rules (p50, bar to p99)", "#d62728")
        _loglog(ax2)
        rate = e2e[0].get("note") or ""
        ax2.set_title(f"EndpointSlice change end to end ({rate})")
        ax2.set_xlabel("Services")
        ax2.set_ylabel("latency")
        ax2.legend(fontsize=8)
    fig.suptitle("Incremental change latency\n" + _subtitle(doc), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_forwarding(doc: dict[str, Any], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    metrics = [
        ("throughput", "single-stream throughput (Gbit/s)"),
        ("connection_rate", "new connections per second"),
        ("rr_latency", "1-byte request/response p50 (µs)"),
    ]
    present = [(k, t) for k, t in metrics if rows(doc, part="userspace", metric=k)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 4.0), squeeze=False)
    for ax, (metric, title) in zip(axes[0], present, strict=True):
        names, vals, cols = [], [], []
        for variant in ("direct", "kproxy", "haproxy", "socat"):
            v = value(doc, part="userspace", metric=metric, variant=variant)
            if v is not None:
                names.append(LABELS[variant])
                vals.append(v)
                cols.append(COLOURS[variant])
        bars = ax.bar(names, vals, color=cols)
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in vals])
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(
        "userspace mode against its peers (median of interleaved rounds; same run, one netns)\n"
        + _subtitle(doc).split(";")[0],
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_selection(doc: dict[str, Any], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    algos = [r["case"] for r in rows(doc, part="selection", metric="picks", variant="kproxy")]
    if not algos:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    width = 0.27
    for k, variant in enumerate(("kproxy", "kproxy_many", "python_reference")):
        vals = [
            value(doc, part="selection", metric="picks", case=a, variant=variant) or 0.0
            for a in algos
        ]
        ax.bar(
            [i + (k - 1) * width for i in range(len(algos))],
            vals,
            width,
            label=LABELS[variant],
            color=COLOURS[variant],
        )
    ax.set_xticks(range(len(algos)), algos)
    ax.set_yscale("log")
    ax.set_ylabel("picks per second (from Python)")
    ax.set_title("Backend selection, 10 endpoints", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(results: Path, out_dir: Path | None = None) -> list[Path]:
    """Draw every chart that the results have data for; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    doc = json.loads(Path(results).read_text())
    out = Path(out_dir or Path(results).parent)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for fn, name in (
        (plot_sync_time, "sync_time.png"),
        (plot_change_latency, "change_latency.png"),
        (plot_forwarding, "forwarding.png"),
        (plot_selection, "selection.png"),
    ):
        p = fn(doc, out / name)
        if p is not None:
            written.append(p)
    table = out / "headline.md"
    table.write_text(headline_markdown(doc))
    written.append(table)
    return written


def update_readme(readme: Path, doc: dict[str, Any], charts: Iterable[Path]) -> bool:
    """Replace the block between the markers; False when the markers are absent."""
    text = readme.read_text()
    if START not in text or END not in text:
        return False
    h = doc.get("host", {})
    images = "\n".join(
        f"![{p.stem.replace('_', ' ')}]({os.path.relpath(p, readme.parent)})"
        for p in charts
        if p.suffix == ".png"
    )
    block = (
        f"{START}\n"
        f"Measured {doc.get('updated', '?')[:10]}, kernel {h.get('kernel', '?')}, "
        f"{h.get('cores', '?')} cores, kproxy {h.get('git_commit', '?')} "
        "(read ratios, not absolute times: client, proxy, server and tools share the "
        "cores)."
        + (
            " Parts whose status in `bench/results/suite.json` is `imported` come from "
            "their own last run of the same module (`python -m bench collect`)."
            if any(e.get("status") == "imported" for e in doc.get("parts", {}).values())
            else " Every part was run by the suite; each mode section above names its run."
        )
        + "\n\n"
        f"{headline_markdown(doc)}\n{images}\n{END}"
    )
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    text = head + block + tail
    for part in ("iptables", "nftables", "ipvs", "userspace", "apiserver"):
        body = part_markdown(doc, part)
        if body is not None:
            replaced = _replace_block(
                text, f"<!-- bench:{part}:start -->", f"<!-- bench:{part}:end -->", body
            )
            text = replaced if replaced is not None else text
    readme.write_text(text)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench plot", description=__doc__)
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "suite.json")
    p.add_argument("--out", type=Path, help="directory for the PNGs (beside the results)")
    p.add_argument("--readme", type=Path, help="README to update between the markers")
    args = p.parse_args(argv)
    if not args.results.exists():
        print(f"{args.results}: no results (python -m bench all)", file=sys.stderr)
        return 1
    written = plot(args.results, args.out)
    for w in written:
        print(f"wrote {os.path.relpath(w.resolve(), ROOT)}")
    if args.readme:
        doc = json.loads(args.results.read_text())
        if not update_readme(args.readme, doc, written):
            print(f"{args.readme}: markers {START} / {END} not found", file=sys.stderr)
            return 1
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
