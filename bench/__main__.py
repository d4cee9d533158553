"""`python -m bench all|<part>|plot|collect|gen|table`, parts iptables, nftables, ipvs,
userspace, selection, apiserver; with no subcommand, the iptables part. `all` and the parts
run through bench/suite.py (progress bar, time budget per part, bench/results/suite.json)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from bench import gen, iptables_sync, plot, suite


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s.replace("_", "")) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of counts: {text}") from e
    if not sizes or any(s <= 0 or s > gen.MAX_SERVICES for s in sizes):
        raise argparse.ArgumentTypeError(f"counts must be in 1..{gen.MAX_SERVICES}")
    return sizes


def _backends(text: str) -> list[str]:
    return [b.strip() for b in text.split(",") if b.strip()]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoints", type=int, default=2, help="endpoints per Service (2)")
    p.add_argument("--repeats", type=int, default=5, help="samples of full render/sync (5)")
    p.add_argument("--changes", type=int, default=7, help="one-endpoint changes (7)")
    p.add_argument(
        "--partial-min",
        type=int,
        default=1000,
        help="measure one-endpoint changes from this many Services on (1000)",
    )


def _iptables_options(ipt: argparse.ArgumentParser, case_timeout: float | None) -> None:
    ipt.add_argument("--sizes", type=_sizes, help="Service counts (1000,10000,30000)")
    ipt.add_argument("--backends", type=_backends, help="legacy,nft (both)")
    if case_timeout is not None:  # the suite's parser has its own --quick
        ipt.add_argument("--quick", action="store_true", help="small sizes (200,1000)")
    ipt.add_argument(
        "--case-timeout",
        type=float,
        default=case_timeout,
        help="seconds per (backend, size) case; the rest of a case is recorded as skipped"
        + ("" if case_timeout else " (default: the part's budget / number of cases)"),
    )
    ipt.add_argument(
        "--nft-max-services",
        type=int,
        help="skip nft cases above this many Services (iptables-nft-restore needs minutes "
        "per cold load from 10k up; the full suite passes 10000)",
    )
    ipt.add_argument("-o", "--output", help="results file (bench/results/iptables.json)")
    _common(ipt)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="command")

    a = sub.add_parser("all", help="every part of the suite (or --parts a,b)")
    suite.add_options(a)
    a.add_argument("--parts", type=_backends, help=f"subset of {','.join(suite.PARTS)}")

    # `iptables` keeps its own options and runs through the suite like the other parts.
    ipt = sub.add_parser("iptables", help="iptables-mode sync benchmark (needs root)")
    suite.add_options(ipt)
    _iptables_options(ipt, case_timeout=None)
    ipt.set_defaults(endpoints=None, repeats=None, changes=None, partial_min=None)
    for name in suite.PARTS[1:]:
        part = sub.add_parser(name, help=f"the {name} part of the suite")
        suite.add_options(part)
        part.add_argument("--part-args", default="", help="extra arguments for the part")

    pl = sub.add_parser("plot", help="charts and headline table from suite.json")
    pl.add_argument("--results", default=str(suite.RESULTS / "suite.json"))
    pl.add_argument("--out", help="directory for the PNGs (beside the results)")
    pl.add_argument("--readme", help="README whose bench:headline block is replaced")

    co = sub.add_parser("collect", help="import the parts' existing results into suite.json")
    co.add_argument("--results", type=Path, help="results directory (bench/results)")
    co.add_argument("--force", action="store_true", help="also replace parts the suite ran")

    run = sub.add_parser("_iptables-run", help=argparse.SUPPRESS)
    _iptables_options(run, case_timeout=480.0)

    g = sub.add_parser("gen", help="write N Services x M endpoints as a manifests file")
    g.add_argument("--services", type=int, required=True)
    g.add_argument("--endpoints", type=int, default=2)
    g.add_argument("-o", "--output", required=True)

    t = sub.add_parser("table", help="print the markdown table of a results file")
    t.add_argument("results", nargs="?", default=str(iptables_sync.RESULTS / "iptables.json"))

    case = sub.add_parser("_iptables-case", help=argparse.SUPPRESS)
    case.add_argument("--backend", choices=iptables_sync.BACKENDS, required=True)
    case.add_argument("--services", type=int, required=True)
    case.add_argument("--budget", type=float, required=True)
    _common(case)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "iptables")
    args = parser().parse_args(argv)
    if args.command == "gen":
        path = gen.write_manifests(args.output, args.services, args.endpoints)
        print(f"wrote {args.services} Services x {args.endpoints} endpoints to {path}")
        return 0
    if args.command == "table":
        results = json.loads(Path(args.results).read_text())
        print(iptables_sync.markdown_table(results), end="")
        return 0
    if args.command == "_iptables-case":
        iptables_sync.run_case(args)
        return 0
    if args.command == "_iptables-run":
        return iptables_sync.main(args)
    if args.command == "plot":
        argv = ["--results", args.results]
        argv += ["--out", args.out] if args.out else []
        argv += ["--readme", args.readme] if args.readme else []
        return plot.main(argv)
    if args.command == "collect":
        return suite.collect(args.results, force=args.force)
    parts = list(suite.PARTS) if args.command == "all" else [args.command]
    if args.command == "all" and args.parts:
        unknown = [p for p in args.parts if p not in suite.PARTS]
        if unknown:
            print(f"--parts: unknown {', '.join(unknown)}", file=sys.stderr)
            return 2
        parts = args.parts
    return suite.run_parts(
        parts,
        quick=args.quick,
        budget=args.budget,
        results=args.results,
        dry_run=args.dry_run,
        plots=not args.no_plot,
        extra=shlex.split(getattr(args, "part_args", "") or ""),
        iptables=args if args.command == "iptables" else None,
    )


if __name__ == "__main__":
    sys.exit(main())
