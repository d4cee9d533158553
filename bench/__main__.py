"""`python -m bench [iptables|gen|table] ...`; with no subcommand, the iptables benchmark."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import gen, iptables_sync


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="command")

    ipt = sub.add_parser("iptables", help="iptables-mode sync benchmark (needs root)")
    ipt.add_argument("--sizes", type=_sizes, help="Service counts (1000,10000,30000)")
    ipt.add_argument("--backends", type=_backends, help="legacy,nft (both)")
    ipt.add_argument("--quick", action="store_true", help="small sizes (200,1000)")
    ipt.add_argument(
        "--case-timeout",
        type=float,
        default=480.0,
        help="seconds per (backend, size) case; the rest of a case is recorded as skipped",
    )
    ipt.add_argument("-o", "--output", help="results file (bench/results/iptables.json)")
    _common(ipt)

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
    return iptables_sync.main(args)


if __name__ == "__main__":
    sys.exit(main())
