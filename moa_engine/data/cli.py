"""The ``data`` subcommand: ``moa data build --out DIR [--domains code,math,...]``.

`add_data_subcommand(subparsers)` adds it to an argparse subparsers object; the chosen
handler is stored as ``func`` and returns the exit status.
"""

from __future__ import annotations

import argparse
import sys

from .._argtypes import positive_int as _positive_int
from .build import build_corpora, parse_domains
from .corpora import CORPORA, CorpusUnavailable


def _domains_arg(value: str):
    """--domains: parse_domains, with its message as the argparse error."""
    try:
        return parse_domains(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_data_subcommand(subparsers) -> None:
    data = subparsers.add_parser(
        "data",
        help="build the domain training data from installed packages",
        description="Training data for the Mixture-of-LoRAs pipeline.",
    )
    commands = data.add_subparsers(dest="data_command", required=True)
    build = commands.add_parser(
        "build",
        help="build train.jsonl, val.jsonl and manifest.json",
        description="Builds the chosen domain corpora from installed packages, dedups, shuffles "
        "(seeded), caps each domain, splits train/val and writes DIR/train.jsonl, DIR/val.jsonl "
        "and DIR/manifest.json. Results are cached in $MOA_ENGINE_CACHE/data (default "
        "~/.cache/moa_engine/data).",
    )
    build.add_argument("--out", required=True, metavar="DIR", help="output folder")
    build.add_argument(
        "--domains",
        type=_domains_arg,
        default=None,
        help=f"comma-separated domains (default: all installed); known: {','.join(CORPORA)}",
    )
    build.add_argument(
        "--max-per-domain", type=_positive_int, default=2000, metavar="N", help="cap per domain (default 2000)"
    )
    build.add_argument("--seed", type=int, default=0, metavar="S", help="seed (default 0)")
    build.add_argument("--cache-dir", default=None, metavar="DIR", help="cache folder (default: see above)")
    build.set_defaults(func=run_data_build)


def run_data_build(args) -> int:
    try:
        result = build_corpora(
            args.out,
            domains=args.domains,
            max_per_domain=args.max_per_domain,
            seed=args.seed,
            cache_dir=args.cache_dir,
        )
    except CorpusUnavailable as e:
        print(f"moa data build: {e}", file=sys.stderr)
        return 2
    print(format_counts(result))
    return 0


def format_counts(result: dict) -> str:
    """A per-domain table of train/val/total counts and sources."""
    rows = [("domain", "train", "val", "total", "source version")]
    for name in result["domains"]:
        c = result["counts"][name]
        version = result["sources"][name].get("version") or "?"
        rows.append((name, str(c["train"]), str(c["val"]), str(c["total"]), version))
    total = result["total"]
    rows.append(("all", str(total["train"]), str(total["val"]), str(total["train"] + total["val"]), ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:4], widths[1:4])] + [row[4]]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(rows) - 2:
            lines.append("-" * len(lines[0]))
    origin = "cache" if result.get("cache_hit") else "built"
    lines.append(f"{origin}; wrote {result['out_dir']}/{{train.jsonl,val.jsonl,manifest.json}}")
    return "\n".join(lines)
