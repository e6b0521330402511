"""End-to-end throughput of the engine against HF transformers on the same model, dtype and prompts.

Dimensions: B sequences in a batch, P prompt tokens, N new tokens timed per sequence.

Figures, per mode and dtype, every one with its same-run ratio ours / HF:
- decode tokens/s at each batch size B (greedy, exactly N + 1 new tokens per sequence:
  ours with ignore_eos=True, HF with min_new_tokens = max_new_tokens);
- prefill tokens/s: time to first token of a batch of ragged prompts (~--prefill-tokens in all);
- forward tokens/s: one forward over an equal-length [4, P] batch, full logits on both sides;
- at every decode row, the memory roofline: the weights are read once per decode step, so a step
  takes at least weight_bytes / copy bandwidth; "% roof" is that bound over the step time.

Method. Both sides are timed through their public generate call, token ids in and out:
ours `Engine._core.generate(requests)` (the C++ loop that `Engine.generate` runs, without
detokenization), HF `model.generate(input_ids, attention_mask)` with left padding, as users batch.
  ttft(B)       = one call with max_new_tokens = 1: prefill of the B prompts + the first token;
  decode(B, N)  = [call with max_new_tokens = N + 1] - [call with max_new_tokens = 1]: the N decode
                  steps alone, with each side's fixed per-call costs subtracted out. Both calls run
                  in the same round, so the median is taken over per-round differences;
  decode tok/s  = B * N / decode(B, N);   step time = decode(B, N) / N;
  prefill tok/s = real prompt tokens / ttft (HF also computes its padding, as it does in use).
The four calls of a row (ours 1, ours N + 1, HF 1, HF N + 1) are interleaved round by round
(`_timing.time_fns`) after a warm-up, so drift on a busy machine hits both sides alike; --repeats
rounds, or fewer (at least 3) once a row has run for --budget seconds.
Roofline: weight_bytes is `Engine.weight_bytes` (a tied embedding counted once: the LM head reads it
per step). The ceiling is the large-copy bandwidth measured in this run before and after the rows
(the higher kept), counting read + write bytes (a copy of X bytes moves 2X); the weights are
counted as bytes read only, so % roof = (weight_bytes / copy GB/s) / step time, with the copy's
combined read + write rate standing in for a pure read rate.
Threads: torch.set_num_threads(--threads, default every core this process may use). The engine's
C++ loop runs on the same ATen intra-op pool as HF, so both sides get the same cores.
Prompts: windows of a fixed English passage tokenized with the model's tokenizer, 32-64 tokens
each, different for every sequence; the same token ids go to both sides.

Modes (see MODES): `base` is the plain model, with the rows above. `moa` serves LoRA experts:
rank-16 (alpha 32) random adapters on all seven projections, made by PEFT itself
(`moa_engine.testing.make_random_peft_adapter`, seed i for expert e<i>) and cached under
--adapter-cache (results/adapters/<model>-r16-a32/e<i>; delete the folder to remake them).
Its rows, at each batch B (default 16 32) and number E of distinct experts in the batch
(default 1 4 8 32; request i gets expert e<i mod E>, round-robin):
  ours          `Engine(model, experts={"e0": dir, ...})` with all max(E) experts loaded,
                requests naming their expert (GenerationRequest.domain);
  ours base     the same engine, the same prompts, every request domain="base": the base-model
                step with everything else identical, so overhead = ours step / ours base step
                is the cost of the LoRA work alone (goal: <= 1.15 at E = 8, B = 32);
  PEFT          HF transformers + PEFT mixed-batch generate: one PeftModel holding the max(E)
                adapters (PeftModel.from_pretrained, then load_adapter), `generate(...,
                adapter_names=[one per row])`, left padding, greedy, min_new_tokens =
                max_new_tokens; PEFT's own default adapter dtype (autocast_adapter_dtype).
                PEFT is slow, so it decodes only --peft-new-tokens (default 16) tokens per
                sequence; its tokens/s is B * N_peft / decode time, the same per-step figure.
                Goal: ours / PEFT >= 8.
  All six calls of a row (1 and N + 1 tokens for ours and ours base; 1 and N_peft + 1 for PEFT)
  are interleaved round by round, as in the base mode; decode time = [N + 1] - [1], per round.
  routing (one row per dtype): an MoA directory (`MoADir.save`) with --router-experts experts
  (default 8) and random routers, loaded as `Engine(model, experts=moa_dir)`; time to first
  token of ROUTER_BATCH (16) prompts, interleaved: every request domain="base"; named experts
  (round-robin over the directory's); routed (domain=None) with routing "last" (one routing pass
  over the prompt, then the prefill with the chosen expert), "per_layer" and "vote".
  Reported: routed TTFT / named TTFT, and named / base.
  --quick (moa): float32, B = 16, E = 1 4, N = 8, PEFT N = 4 timed in 1 round without warm-up,
  routing row: named, last and per_layer only, 4 experts.

    python benchmarks/throughput.py                       # full run: both modes, float32 + bfloat16
    python benchmarks/throughput.py --quick               # smoke run (CI), about a minute
    python benchmarks/throughput.py --batches 1 8 --new-tokens 16 --repeats 1 --dtype float32
    python benchmarks/throughput.py --mode moa --dtype float32 --batches 16 --experts 1 8 --new-tokens 8

Output: a table, JSON at benchmarks/results/throughput-<device>.json (--out) and a plot beside it
(same name, .png). Rows taken while other processes kept the CPU busy, or with a wide spread,
are marked NOISY: rerun them on a quiet machine.
"""

# This script runs the benchmark; its parts are beside it: _throughput_sides.py (the workload, the
# two sides and how each mode builds them), _throughput_measure.py (the rows, each timed with its
# variants interleaved) and _throughput_report.py (the tables, the JSON and the plot).

import argparse
import functools
import gc
import os
import sys
import time
from dataclasses import dataclass

import torch

if __package__:
    from . import _timing as timing
    from ._throughput_gguf import GGUF_MODES, LlamaCpp, gguf_mode, measure_gguf
    from ._throughput_measure import MIN_REPEATS, add_roofline, measure_base, measure_moa
    from ._throughput_report import build_payload, plot_title, print_tables, write_plot
    from ._throughput_sides import DTYPES, base_mode, make_workload, moa_mode
else:
    import _timing as timing
    from _throughput_gguf import GGUF_MODES, LlamaCpp, gguf_mode, measure_gguf
    from _throughput_measure import MIN_REPEATS, add_roofline, measure_base, measure_moa
    from _throughput_report import build_payload, plot_title, print_tables, write_plot
    from _throughput_sides import DTYPES, base_mode, make_workload, moa_mode

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FULL = dict(
    new_tokens=64,
    repeats=5,
    dtype=["float32", "bfloat16"],
    prefill_tokens=768,
    experts=[1, 4, 8, 32],
    peft_new_tokens=16,
    router_experts=8,
)
QUICK = dict(
    new_tokens=8, repeats=1, dtype=["float32"], prefill_tokens=256, experts=[1, 4], peft_new_tokens=4, router_experts=4
)
MODE_BATCHES = {  # default --batches: (full, quick)
    "base": ([1, 8, 32], [1, 8]),
    "moa": ([16, 32], [16]),
    "q4_1": ([1, 8, 32], [1, 8]),
    "q8_0": ([1, 32], [1]),
    "bf16": ([1, 32], [1]),
    "moa_q4_1": ([16, 32], [16]),
}


@dataclass
class Mode:
    build: object  # (model_path, dtype, workload, args) -> the sides
    measure: object  # (sides, model_path, dtype, workload, args) -> JSON-ready rows, one at a time


MODES = {
    "base": Mode(base_mode, measure_base),
    "moa": Mode(moa_mode, measure_moa),
    **{q: Mode(gguf_mode(q), measure_gguf) for q in GGUF_MODES},
    "moa_q4_1": Mode(functools.partial(moa_mode, mode="moa_q4_1"), measure_moa),
}
# The one activation dtype of the modes that serve a GGUF file: float32 for the quantized
# kernels (weight-only, float32 activations), bfloat16 for the BF16 file.
MODE_DTYPE = {"q4_1": "float32", "q8_0": "float32", "moa_q4_1": "float32", "bf16": "bfloat16"}


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def run_mode(mode, dtype, model_path, workload, args):
    """Every row of one mode and dtype, each printed as it is taken; the models are freed afterwards."""
    if MODE_DTYPE.get(mode, dtype) != dtype:
        print(f"  {mode} {dtype}: skipped (the mode runs in {MODE_DTYPE[mode]} only)", flush=True)
        return []
    started = time.perf_counter()
    sides = MODES[mode].build(model_path, dtype, workload, args)
    rows = []
    for row in MODES[mode].measure(sides, model_path, dtype, workload, args):
        row.update(mode=mode, dtype=dtype)
        rows.append(row)
        print(f"  {mode} {dtype} {describe(row)}", flush=True)
    del sides
    gc.collect()
    print(f"  {mode} {dtype}: {len(rows)} rows in {time.perf_counter() - started:.1f} s", flush=True)
    return rows


def describe(row):
    if row["kind"] == "routing":
        parts = [f"routing B={row['batch']} experts={row['experts']}: TTFT"]
        for label, figures in row["ttft"].items():
            parts.append(f"{label} {figures['ttft_ms']:.0f} ms")
        return ", ".join(parts)
    parts = [f"{row['kind']} B={row['batch']}" + (f" experts={row['experts']}" if "experts" in row else "")]
    for side in ("ours", "ours_base", "HF", "PEFT"):
        if side in row and row[side]["tokens_per_s"]:
            parts.append(f"{side} {row[side]['tokens_per_s']:.0f} tok/s")
    if row.get("overhead"):
        parts.append(f"overhead {row['overhead']:.2f}x")
    return ", ".join(parts)


def load_tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add(
        "--mode",
        nargs="+",
        choices=list(MODES),
        default=list(MODES),
        help="what the engine serves: base (the plain model), moa (LoRA experts), q4_1 / q8_0 / bf16 (a "
        "GGUF file natively, against the float32 engine, HF and llama.cpp; bf16 in bfloat16, the others "
        "in float32), moa_q4_1 (LoRA experts on the Q4_1 file); default all",
    )
    add("--dtype", nargs="+", choices=list(DTYPES), default=None, help="default: both (--quick: float32)")
    add(
        "--batches",
        nargs="+",
        type=int,
        default=None,
        help="decode batch sizes, every mode (default base 1 8 32, moa 16 32; --quick: base 1 8, moa 16)",
    )
    add("--new-tokens", type=int, default=None, help="N, decode tokens timed per sequence (default 64; quick 8)")
    add("--prefill-tokens", type=int, default=None, help="prompt tokens per prefill row (default 768; quick 256)")
    add("--repeats", type=int, default=None, help="timed rounds, median taken (default 5; --quick: 1)")
    add("--warmup", type=int, default=1, help="untimed calls per variant before timing (default 1)")
    add(
        "--budget",
        type=float,
        default=120.0,
        help=f"seconds per row after which no new round starts, once {MIN_REPEATS} are in (default 120)",
    )
    add("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads, both sides (all)")
    add(
        "--quick",
        action="store_true",
        help="smoke run: N = 8, 1 repeat, float32; base B = 1 8; moa B = 16, experts 1 4, PEFT N = 4 unwarmed (CI)",
    )
    add(
        "--experts",
        nargs="+",
        type=int,
        default=None,
        help="moa: distinct experts in the batch, round-robin (default 1 4 8 32; --quick: 1 4)",
    )
    add(
        "--peft-new-tokens",
        type=int,
        default=None,
        help="moa: new tokens timed per sequence for PEFT, which is slow (default 16; --quick: 4)",
    )
    add(
        "--router-experts",
        type=int,
        default=None,
        help="moa: experts of the routing rows' MoA dir (default 8; --quick: 4)",
    )
    add(
        "--adapter-cache",
        default=os.path.join(RESULTS_DIR, "adapters"),
        help="moa: folder of the cached random PEFT adapters and MoA dirs (default results/adapters)",
    )
    add("--no-hf", action="store_true", help="skip the HF and PEFT baselines (no ratios to them)")
    add(
        "--llama-cpp",
        metavar="DIR",
        default=None,
        help="folder of llama.cpp's llama-bench and llama-batched-bench for the GGUF modes "
        "(default: $LLAMA_CPP_BIN_DIR, then PATH; its rows are skipped when neither has them)",
    )
    add("--model", default=None, help="a model folder or .gguf (default: the default model)")
    add("--device", choices=["cpu", "cuda"], default="cpu")
    add("--out", default=None, help="JSON path (default results/throughput-<device>.json); plot: .png beside")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = os.path.join(RESULTS_DIR, f"throughput-{args.device}.json")
    args.plot = os.path.splitext(args.out)[0] + ".png"
    for name in ("new_tokens", "prefill_tokens", "repeats", "threads", "peft_new_tokens", "router_experts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or min(args.batches or [1]) < 1 or min(args.experts) < 1:
        parser.error(
            f"--warmup must be >= 0, --batches and --experts >= 1, got {args.warmup}, {args.batches} and {args.experts}"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    args.mode = list(dict.fromkeys(args.mode))
    args.mode_batches = {
        mode: sorted(set(args.batches or MODE_BATCHES[mode][1 if args.quick else 0])) for mode in args.mode
    }
    args.experts = sorted(set(args.experts))
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from moa_engine.models import resolve_model

    started = time.perf_counter()
    model_path = resolve_model(args.model)
    workload = make_workload(load_tokenizer(model_path), args)
    env = timing.environment(args.device)
    print(f"torch {env['torch']}, {env['threads']} threads, {env['device_name']}, model {model_path}")
    print(f"CPU flags: {' '.join(env['cpu_flags'] or [])}; quantized kernels: {env['quant_isa']}")
    if any(mode in GGUF_MODES for mode in args.mode):
        llama = LlamaCpp.find(args)
        env["llama_cpp"] = None if llama is None else {"bench": llama.bench, "version": llama.version()}
        print(
            f"llama.cpp: {llama.bench} ({env['llama_cpp']['version']})"
            if llama
            else "llama.cpp: not found, its figures are skipped"
        )
    copy_repeats = 5 if args.quick else 10
    copy_start = timing.copy_ceiling(args.device, repeats=copy_repeats)
    print(f"copy bandwidth (start): {copy_start['gb_per_s']:.1f} GB/s (read + write)", flush=True)
    rows = []
    for mode in args.mode:
        for dtype in args.dtype:
            rows += run_mode(mode, dtype, model_path, workload, args)
    copy_end = timing.copy_ceiling(args.device, repeats=copy_repeats)
    copy = timing.combine_copy_ceilings(copy_start, copy_end)
    print(f"copy bandwidth (end): {copy['end']['gb_per_s']:.1f} GB/s (read + write)")
    add_roofline(rows, copy)
    print()
    print_tables(rows, copy, not args.no_hf)
    elapsed = time.perf_counter() - started
    timing.write_json_atomic(args.out, build_payload(args, env, model_path, copy, rows, elapsed))
    write_plot(rows, args.plot, plot_title(env, copy, args))
    print(f"\nwrote {args.out} and {args.plot} in {elapsed:.1f} s")
    noisy = [f"{r['mode']}/{r['dtype']}/{r['kind']}/B={r['batch']}" for r in rows if r["noisy"]]
    if noisy:
        print(f"NOISY rows (rerun on a quiet machine): {', '.join(noisy)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
