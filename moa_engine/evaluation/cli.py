"""`moa eval`: score held-out records through the serving engine (see moa_engine.evaluation)."""

from __future__ import annotations

import sys

from moa_engine._argtypes import positive_int


def add_eval_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="per-domain perplexity, router accuracy and exact match of a MoA directory",
        description="Scores held-out records through the serving engine (Engine.forward): per-domain "
        "perplexity over the response tokens (chat records) or every token (text records), for each "
        "mode: base (no expert), label (each record's own expert), a routing strategy (per_layer, last, "
        "vote: routed over the prompt as at serving, with the routers' accuracy), or an expert's name. "
        "Exact match compares greedy generations with the responses of --exact-match domains.",
    )
    p.add_argument("--moa", default=None, metavar="MOA_DIR", help="the MoA directory (omit for the base model alone)")
    p.add_argument("--model", default=None, help="base model (default: the MoA directory's)")
    p.add_argument("--data", required=True, metavar="VAL.jsonl")
    p.add_argument(
        "--modes",
        default=None,
        metavar="M,M",
        help="default: base,label and every strategy when the directory has routers",
    )
    p.add_argument("--max-len", type=positive_int, default=512)
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="at most N records per domain")
    p.add_argument("--exact-match", default="math", metavar="D,D", help="domains scored by exact match (default math)")
    p.add_argument("--max-new-tokens", type=positive_int, default=24)
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--compare",
        default=None,
        metavar="A:B[,A:B]",
        help="also compare mode A against mode B: the change in average perplexity with a paired "
        "bootstrap interval over the records (e.g. last:label,label:base); both must be in --modes",
    )
    p.add_argument("--bootstrap", type=positive_int, default=2000, metavar="N", help="bootstrap draws for --compare")
    p.add_argument(
        "--routing-only",
        action="store_true",
        help="the routers alone: route every record's prompt (Engine.route, no scoring) and report each "
        "strategy's accuracy per domain with 95%% Wilson intervals, and the confusion counts",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON (atomically)")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from moa_engine import Engine
    from moa_engine._io import atomic_write_json
    from moa_engine.data.records import read_records

    from . import compare, comparison_table, evaluate, markdown_table

    if args.routing_only:
        return _run_routing_eval(args)
    try:
        engine = Engine(args.model, experts=args.moa, dtype=args.dtype)
        if args.modes:
            modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        else:
            modes = (
                ["base"]
                + (["label"] if engine.experts else [])
                + (["per_layer", "last", "vote"] if engine.router_domains else [])
            )
        pairs = _compare_pairs(args.compare, modes) if args.compare else []
        results = evaluate(
            engine,
            read_records(args.data),
            modes,
            max_len=args.max_len,
            limit=args.limit,
            exact_match_domains=tuple(d for d in args.exact_match.split(",") if d),
            max_new_tokens=args.max_new_tokens,
        )
        comparisons = {f"{a} vs {b}": compare(results[a], results[b], n_boot=args.bootstrap) for a, b in pairs}
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"moa eval: error: {exc}", file=sys.stderr)
        return 1
    print(markdown_table(results))
    if comparisons:
        print()
        print(comparison_table(comparisons))
    if args.json:
        atomic_write_json(args.json, {**results, "comparisons": comparisons} if comparisons else results)
    return 0


def _run_routing_eval(args) -> int:
    from moa_engine import Engine
    from moa_engine._io import atomic_write_json
    from moa_engine.data.records import read_records

    from . import STRATEGIES, first_per_domain, routing_accuracy, routing_table

    try:
        if args.modes or args.compare:
            raise ValueError("--routing-only reports every routing strategy; it takes no --modes or --compare")
        if args.moa is None:
            raise ValueError("--routing-only needs --moa (a MoA directory with routers)")
        engine = Engine(args.model, experts=args.moa, dtype=args.dtype)
        records = read_records(args.data)
        if args.limit is not None:
            records = first_per_domain(records, args.limit)
        result = routing_accuracy(engine, records, STRATEGIES, max_len=args.max_len)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"moa eval: error: {exc}", file=sys.stderr)
        return 1
    print(routing_table(result))
    default = engine.moa_dir.config.router.strategy
    print(f"\nconfusion ({default}: own domain -> chosen expert, records)")
    for own, row in result[default]["confusion"].items():
        print(f"  {own}: " + ", ".join(f"{d} {n}" for d, n in sorted(row.items(), key=lambda kv: -kv[1])))
    if args.json:
        atomic_write_json(args.json, {"routing": result})
    return 0


def _compare_pairs(spec: str, modes: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for part in (x.strip() for x in spec.split(",")):
        if not part:
            continue
        a, sep, b = part.partition(":")
        if not sep or not a or not b:
            raise ValueError(f"--compare: {part!r} is not A:B (two modes joined by a colon)")
        for m in (a, b):
            if m not in modes:
                raise ValueError(f"--compare: {m!r} is not one of the evaluated modes {modes}")
        pairs.append((a, b))
    return pairs
