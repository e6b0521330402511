"""What the paths that round activations cost in quality: held-out perplexity on the packaged
domains and greedy agreement, for a GGUF file served four ways.

  float32      Engine(file, quantization=None): the file's weights dequantized to float32 (the
               gguf package's dequantizers); the reference.
  weight_only  Engine(file) with MOA_ENGINE_QUANT_ISA=weight_only: quantized weights, float
               activations (must equal float32 to float rounding).
  int8         Engine(file) with MOA_ENGINE_QUANT_ISA=avx512_vnni, the opt-in int8 kernels:
               activations quantized per block of 32 as llama.cpp does. Perplexity is scored
               with every matrix product of the forward on the int8 kernels (MOA_ENGINE_SMALL_M
               and MOA_ENGINE_INT8_M raised above the scored rows; in serving only decode rows
               take them), greedy decoding with the engine's other defaults.
  bf16         Engine(file) with MOA_ENGINE_QUANT_ISA=avx512_bf16, the opt-in bfloat16 kernels:
               activations and dequantized weights rounded to bfloat16, products by vdpbf16ps
               in float. Scored with every product of more than 4 rows on them
               (MOA_ENGINE_SMALL_M raised; in serving, decode steps of 5 to 32 rows).

Perplexity: the val split of `moa data build` (--records per domain), each record encoded as in
training (chat template, loss on the answer), exp(mean NLL) per domain; the change against
float32 is 100 * (avg ppl / avg ppl float32 - 1) over the domains, with a paired,
domain-stratified bootstrap interval (moa_engine.evaluation.comparison.compare). Goal: within
0.5%. Greedy agreement: --prompts prompts (the records' prompts), --new-tokens greedy tokens
each; the share of tokens before each sequence's first difference from float32, and the share
of sequences identical throughout.

Each variant runs in its own process (the kernel choice and the limits are read once per
process). The int8 rows need a CPU with AVX512-VNNI, the bf16 rows one with AVX512-BF16 (each
is skipped on a CPU without it).

    python benchmarks/quant_quality.py                       # the default model's Q4_1 file
    python benchmarks/quant_quality.py --model x.gguf --records 100 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VARIANTS = {
    "float32": {},
    "weight_only": {"MOA_ENGINE_QUANT_ISA": "weight_only"},
    "int8": {"MOA_ENGINE_QUANT_ISA": "avx512_vnni", "MOA_ENGINE_SMALL_M": "1000000", "MOA_ENGINE_INT8_M": "1000000"},
    "bf16": {"MOA_ENGINE_QUANT_ISA": "avx512_bf16", "MOA_ENGINE_SMALL_M": "1000000"},
}
GREEDY_ENV = {
    "float32": {},
    "weight_only": {"MOA_ENGINE_QUANT_ISA": "weight_only"},
    "int8": {"MOA_ENGINE_QUANT_ISA": "avx512_vnni"},
    "bf16": {"MOA_ENGINE_QUANT_ISA": "avx512_bf16"},
}
# The variants that round activations, and the kernels each needs.
ROUNDING = {"int8": "avx512_vnni", "bf16": "avx512_bf16"}
GOAL_PCT = 0.5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", default=None, help="a .gguf file (default: the default model's Q4_1 file)")
    add("--records", type=int, default=60, help="held-out records per domain (default 60; --quick 12)")
    add("--max-len", type=int, default=256, help="tokens per scored record (default 256)")
    add("--prompts", type=int, default=32, help="prompts for greedy agreement (default 32; --quick 8)")
    add("--new-tokens", type=int, default=48, help="greedy tokens per prompt (default 48; --quick 16)")
    add("--threads", type=int, default=len(os.sched_getaffinity(0)))
    add("--quick", action="store_true", help="smoke run: 12 records per domain, 8 prompts of 16 tokens")
    add("--out", default=os.path.join(RESULTS_DIR, "quant_quality.json"))
    add("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # a child process's one variant
    add("--work", help=argparse.SUPPRESS)
    add("--greedy", action="store_true", help=argparse.SUPPRESS)  # the child decodes instead of scoring
    args = parser.parse_args(argv)
    if args.quick:
        args.records, args.prompts, args.new_tokens = min(args.records, 12), min(args.prompts, 8), 16
    return args


def held_out(args, work):
    """The val records (at most --records per domain) of the default domain build."""
    from moa_engine.data import build_corpora, read_records

    build_corpora(os.path.join(work, "data"), max_per_domain=max(200, 20 * args.records), progress=False)
    records = read_records(os.path.join(work, "data", "val.jsonl"))
    out, count = [], {}
    for r in records:
        if count.get(r.domain, 0) < args.records:
            out.append(r)
            count[r.domain] = count.get(r.domain, 0) + 1
    return out


def run_variant(args):
    """In a child process: score the records and decode the prompts with one variant."""
    import torch

    from moa_engine import _C, Engine
    from moa_engine.data import read_records
    from moa_engine.evaluation.scoring import _items, perplexity

    torch.set_num_threads(args.threads)
    path = model_file(args)
    engine = Engine(path, quantization=None if args.variant == "float32" else "auto", max_batch=8, max_seq_len=512)
    records = read_records(os.path.join(args.work, "records.jsonl"))
    result = {"variant": args.variant, "quant_isa": _C._quant_isa()}
    if args.greedy:
        spread = records[:: max(1, len(records) // args.prompts)][: args.prompts]  # every domain
        prompts = [engine._encode(r.prompt, True) if r.prompt else engine._encode(r.text, False)[:64] for r in spread]
        done = engine.generate(prompts, max_new_tokens=args.new_tokens, ignore_eos=True)
        result["greedy"] = [list(c.token_ids) for c in done]
    else:
        started = time.perf_counter()
        result["perplexity"] = perplexity(engine, _items(engine, records, args.max_len), "base")
        result["seconds"] = time.perf_counter() - started
    with open(os.path.join(args.work, f"{args.variant}-{'greedy' if args.greedy else 'ppl'}.json"), "w") as f:
        json.dump(result, f)


def model_file(args):
    from moa_engine.models import default_gguf_path

    return os.path.abspath(args.model) if args.model else str(default_gguf_path())


def child(args, variant, greedy, work):
    env = {**os.environ, **(GREEDY_ENV if greedy else VARIANTS)[variant]}
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--work", work]
    cmd += ["--records", str(args.records), "--max-len", str(args.max_len), "--prompts", str(args.prompts)]
    cmd += ["--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    if args.model:
        cmd += ["--model", args.model]
    if greedy:
        cmd.append("--greedy")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(work, f"{variant}-{'greedy' if greedy else 'ppl'}.json")) as f:
        return json.load(f)


def agreement(ours, ref):
    prefix, same = [], 0
    for a, b in zip(ours, ref):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        prefix.append(n / max(1, len(a)))
        same += a == b
    return {"prefix_share": sum(prefix) / len(prefix), "identical_share": same / len(ours)}


def main(argv=None):
    args = parse_args(argv)
    if args.variant:
        return run_variant(args)
    from moa_engine.data import write_records
    from moa_engine.evaluation.comparison import compare

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _timing as timing

    started = time.perf_counter()
    variants = [v for v in VARIANTS if v not in ROUNDING or timing.quant_isa_available(ROUNDING[v])]
    env = timing.environment("cpu")
    print(f"{env['cpu']}; flags {' '.join(env['cpu_flags'] or [])}; variants {', '.join(variants)}")
    with tempfile.TemporaryDirectory() as work:
        records = held_out(args, work)
        write_records(os.path.join(work, "records.jsonl"), records)
        print(f"{len(records)} held-out records over {len({r.domain for r in records})} domains; {model_file(args)}")
        ppl = {v: child(args, v, False, work) for v in variants}
        greedy = {v: child(args, v, True, work) for v in variants}
    rows = {}
    for v in variants:
        row = {
            "quant_isa": ppl[v]["quant_isa"],
            "domains": ppl[v]["perplexity"]["domains"],
            "seconds": ppl[v]["seconds"],
        }
        if v != "float32":
            row["vs_float32"] = compare(ppl[v]["perplexity"], ppl["float32"]["perplexity"])
            row["greedy"] = agreement(greedy[v]["greedy"], greedy["float32"]["greedy"])
        rows[v] = row
    domains = sorted(rows["float32"]["domains"])
    print(
        f"\n{'variant':<12} {'kernels':<12} "
        + " ".join(f"{d[:10]:>10}" for d in domains)
        + "   change vs float32 (95% CI)   greedy prefix / identical"
    )
    for v, row in rows.items():
        cells = " ".join(f"{row['domains'][d]['ppl']:>10.3f}" for d in domains)
        if "vs_float32" in row:
            c = row["vs_float32"]
            lo, hi = c["interval_pct"]
            g = row["greedy"]
            tail = f"   {c['change_pct']:+.3f}% [{lo:+.3f}, {hi:+.3f}]        {g['prefix_share']:.3f} / {g['identical_share']:.3f}"
        else:
            tail = "   (reference)"
        print(f"{v:<12} {row['quant_isa']:<12} {cells}{tail}")
    for v in (v for v in ROUNDING if v in rows):
        lo, hi = rows[v]["vs_float32"]["interval_pct"]
        verdict = "met" if max(abs(lo), abs(hi)) <= GOAL_PCT else "NOT met"
        print(f"goal: {v} perplexity within {GOAL_PCT}% of float32 (the whole 95% interval): {verdict}")
    payload = {
        "benchmark": "quant_quality",
        "model": model_file(args),
        "environment": env,
        "settings": {k: getattr(args, k) for k in ("records", "max_len", "prompts", "new_tokens", "threads", "quick")},
        "variants": {v: {**VARIANTS[v]} for v in variants},
        "rows": rows,
        "total_s": time.perf_counter() - started,
    }
    timing.write_json_atomic(args.out, payload)
    print(f"wrote {args.out} in {payload['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
