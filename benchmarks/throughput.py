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

Modes: `base` is the plain model. A mode builds the two sides (see MODES); modes that serve
adapters add themselves there and reuse the rest unchanged.

    python benchmarks/throughput.py                       # full run: B = 1 8 32, float32 + bfloat16
    python benchmarks/throughput.py --quick               # smoke run (CI), under a minute
    python benchmarks/throughput.py --batches 1 8 --new-tokens 16 --repeats 1 --dtype float32

Output: a table, JSON at benchmarks/results/throughput-<device>.json (--out) and a plot beside it
(same name, .png). Rows taken while other processes kept the CPU busy, or with a wide spread,
are marked NOISY: rerun them on a quiet machine.
"""

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

if __package__:
    from . import _timing as timing
else:
    import _timing as timing

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROMPT_TOKENS = (32, 64)  # each prompt's length lies in [min, max]
FORWARD_BATCH = 4  # the forward row's shape is [FORWARD_BATCH, prefill_tokens / FORWARD_BATCH]
MIN_REPEATS = 3  # rounds a row always gets (fewer if --repeats is lower), whatever --budget says
NOISY_LOAD_CORES = 0.2  # a row taken while other processes kept more cores busy is flagged
NOISY_SPREAD = 0.10  # ... and one whose timings' IQR exceeds this fraction of their median
FULL = dict(batches=[1, 8, 32], new_tokens=64, repeats=5, dtype=["float32", "bfloat16"], prefill_tokens=768)
QUICK = dict(batches=[1, 8], new_tokens=8, repeats=1, dtype=["float32"], prefill_tokens=256)

PASSAGE = (
    "The river rises in the hills to the north, where snow lingers on the high ground until late "
    "spring. As the weather warms, meltwater gathers in narrow channels that cut through the rock, "
    "and by the time it reaches the first village the stream is wide enough to turn a mill wheel. "
    "For centuries the people who lived along its banks depended on it for water, for fish and for "
    "transport. Barges carried grain and timber down to the coast, and on the return journey they "
    "brought salt, cloth and news from the cities. When the railway arrived in the middle of the "
    "nineteenth century, the barge trade declined within a generation, and many of the old wharves "
    "fell into disrepair. Today the river is valued mostly for recreation. Walkers follow the towpath "
    "from one market town to the next, and in summer the water is busy with canoes and small boats. "
    "Scientists have also taken an interest in it: the river's clean, cold water supports several "
    "species of fish that have disappeared from more polluted rivers nearby, and volunteers count "
    "the salmon that return each autumn to spawn. Their records, kept for more than forty years, "
    "show how the population responds to dry summers, to floods and to changes in farming upstream. "
    "Questions for discussion: why did the railway change the life of the river so quickly? What "
    "would a visitor notice first about the villages along its banks? How should the council balance "
    "the needs of farmers, anglers and tourists when water is scarce? Write a short answer to each "
    "question, giving reasons and, where you can, an example from another place you know. A good "
    "answer explains the causes as well as the effects, and it considers who gains and who loses "
    "from each decision. Finally, suggest one practical step that the people living by the river "
    "could take this year to protect it for the next generation, and explain how they would know "
    "whether it had worked."
)


# ---------------------------------------------------------------------------------------------
# Workload: the prompts, the same token ids for both sides
# ---------------------------------------------------------------------------------------------


@dataclass
class Workload:
    decode_prompts: list  # [max B] token-id lists; batch B uses the first B
    prefill_prompts: list  # token-id lists, ~prefill_tokens in all
    forward_ids: torch.Tensor  # [FORWARD_BATCH, P] int64

    @property
    def longest_prompt(self):
        return max(len(p) for p in self.decode_prompts + self.prefill_prompts)


def passage_ids(tokenizer):
    ids = list(tokenizer(PASSAGE, add_special_tokens=False)["input_ids"])
    if len(ids) < 2 * PROMPT_TOKENS[1]:
        need = 2 * PROMPT_TOKENS[1]
        raise ValueError(f"the passage is {len(ids)} tokens with this tokenizer; need at least {need}")
    return ids


def make_prompts(ids, count, first=0):
    """`count` windows of `ids`, 32-64 tokens each, at spread-out starts (prompt i is fixed)."""
    lo, hi = PROMPT_TOKENS
    prompts = []
    for i in range(first, first + count):
        length = lo + (i * 13) % (hi - lo + 1)
        start = (i * 53) % (len(ids) - length)
        prompts.append(ids[start : start + length])
    return prompts


def prompts_totalling(ids, total, first):
    """Prompts, from index `first` on, until they hold at least `total` tokens."""
    prompts = []
    while sum(map(len, prompts)) < total:
        prompts += make_prompts(ids, 1, first + len(prompts))
    return prompts


def forward_batch(ids, batch, length):
    """[batch, length] windows of the passage (repeated if it is shorter than length)."""
    reps = -(-(length + batch * 17) // len(ids))
    ids = ids * reps
    return torch.tensor([ids[b * 17 : b * 17 + length] for b in range(batch)], dtype=torch.int64)


def make_workload(tokenizer, args):
    ids = passage_ids(tokenizer)
    length = max(1, args.prefill_tokens // FORWARD_BATCH)
    return Workload(
        decode_prompts=make_prompts(ids, max(args.batches)),
        prefill_prompts=prompts_totalling(ids, args.prefill_tokens, first=max(args.batches)),
        forward_ids=forward_batch(ids, FORWARD_BATCH, length),
    )


# ---------------------------------------------------------------------------------------------
# The two sides: each turns prompts into zero-argument callables that return the new token ids
# ---------------------------------------------------------------------------------------------


class OursRunner:
    """The engine's C++ generate loop, token ids in and out (no detokenization)."""

    label = "ours"

    def __init__(self, engine):
        self.engine = engine

    def generate_fn(self, prompts, new_tokens):
        requests = [self._greedy_request(p, new_tokens) for p in prompts]
        core = self.engine._core

        def run():
            return [list(r.token_ids) for r in core.generate(requests)]

        return run

    def forward_fn(self, ids):
        return lambda: self.engine.forward(ids)  # [B, P] -> logits [B, P, V]

    @staticmethod
    def _greedy_request(prompt, new_tokens):
        from moa_engine import _C

        r = _C.GenerationRequest()
        r.prompt = list(prompt)
        r.max_new_tokens = new_tokens
        r.sampling.temperature = 0.0
        r.ignore_eos = True
        return r


class HFRunner:
    """HF transformers `generate`, batched with left padding and an attention mask."""

    label = "HF"

    def __init__(self, model, pad_id):
        self.model = model
        self.pad_id = pad_id

    def generate_fn(self, prompts, new_tokens):
        input_ids, attention_mask = left_pad(prompts, self.pad_id)  # [B, max P] each
        options = dict(
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=self.pad_id
        )

        def run():
            with torch.inference_mode():
                out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
            return out[:, input_ids.shape[1] :].tolist()  # [B, new_tokens]

        return run

    def forward_fn(self, ids):
        def run():
            with torch.inference_mode():
                return self.model(input_ids=ids).logits  # [B, P, V]

        return run

    def weight_bytes(self):
        return sum(p.numel() * p.element_size() for p in self.model.parameters())  # tied: once


def left_pad(prompts, pad_id):
    """Token-id lists -> input_ids, attention_mask [B, max P], padding on the left."""
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


@dataclass
class Sides:
    ours: OursRunner
    hf: HFRunner | None
    weight_bytes: int  # read once per decode step

    def runners(self):
        return [self.ours] + ([self.hf] if self.hf is not None else [])


# ---------------------------------------------------------------------------------------------
# Modes: how the two sides are built
# ---------------------------------------------------------------------------------------------


def base_mode(model_path, dtype, workload, args):
    """The plain model on both sides."""
    import moa_engine

    engine = moa_engine.Engine(
        str(model_path),
        dtype=dtype,
        device=args.device,
        max_batch=max(max(args.batches), len(workload.prefill_prompts), FORWARD_BATCH),
        max_seq_len=max(workload.longest_prompt + args.new_tokens + 1, workload.forward_ids.shape[1]),
        max_prefill_tokens=max(4096, sum(map(len, workload.decode_prompts + workload.prefill_prompts))),
    )
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=DTYPES[dtype]).to(args.device).eval()
        pad_id = model.generation_config.pad_token_id
        if pad_id is None:
            pad_id = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
        hf = HFRunner(model, pad_id)
    return Sides(OursRunner(engine), hf, engine.weight_bytes)


MODES = {"base": base_mode}


# ---------------------------------------------------------------------------------------------
# Measurements: each returns one JSON-ready row
# ---------------------------------------------------------------------------------------------


def time_interleaved(fns, args):
    """Warm up, then time the variants round by round; with the other load meanwhile."""
    with timing.OtherLoad() as other_load:
        timings = timing.time_fns(
            fns,
            device=args.device,
            warmup=args.warmup,
            repeats=args.repeats,
            min_repeats=min(MIN_REPEATS, args.repeats),
            max_seconds=args.budget,
        )
    return timings, other_load.cores


def recording(fn, outputs, key):
    """fn, keeping its latest result in outputs[key]."""

    def run():
        outputs[key] = fn()

    return run


def check_lengths(outputs, batch, new_tokens):
    """Every sequence must have exactly new_tokens new tokens, or the figure is wrong."""
    for side, sequences in outputs.items():
        lengths = sorted({len(s) for s in sequences})
        if len(sequences) != batch or lengths != [new_tokens]:
            raise RuntimeError(
                f"{side} generated {len(sequences)} sequences of lengths {lengths}; "
                f"expected {batch} of exactly {new_tokens} tokens"
            )


def agreement(ours, hf):
    """Mean over sequences of the fraction of tokens before the first ours / HF divergence."""
    fractions = []
    for a, b in zip(ours, hf):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        fractions.append(same / max(len(a), 1))
    return statistics.mean(fractions)


def measure_decode(sides, prompts, new_tokens, args):
    """Decode tokens/s at batch len(prompts): [N + 1 new tokens] - [1 new token], paired by round."""
    fns, outputs = {}, {}
    for side in sides.runners():
        fns[f"{side.label} ttft"] = side.generate_fn(prompts, 1)
        fns[f"{side.label} gen"] = recording(side.generate_fn(prompts, new_tokens + 1), outputs, side.label)
    timings, other_load = time_interleaved(fns, args)
    check_lengths(outputs, len(prompts), new_tokens + 1)
    row = {"kind": "decode", "batch": len(prompts), "tokens": new_tokens, "prompt_tokens": sum(map(len, prompts))}
    for side in sides.runners():
        first, whole = timings[f"{side.label} ttft"], timings[f"{side.label} gen"]
        decode = timing.Timing([w - f for w, f in zip(whole.samples, first.samples)])
        row[side.label] = side_figures(len(prompts) * new_tokens, decode, per_step=new_tokens)
        row[side.label]["ttft_ms"] = first.median * 1e3
    if sides.hf is not None:
        row["agreement"] = agreement(outputs["ours"], outputs["HF"])
    return finish_row(row, timings, other_load)


def measure_prefill(sides, prompts, args):
    """Prefill tokens/s: time to the first token of a batch of ragged prompts."""
    fns = {f"{side.label} ttft": side.generate_fn(prompts, 1) for side in sides.runners()}
    timings, other_load = time_interleaved(fns, args)
    tokens = sum(map(len, prompts))
    row = {"kind": "prefill", "batch": len(prompts), "tokens": tokens, "prompt_tokens": tokens}
    for side in sides.runners():
        row[side.label] = side_figures(tokens, timings[f"{side.label} ttft"])
    return finish_row(row, timings, other_load)


def measure_forward(sides, ids, args):
    """Forward tokens/s over an equal-length [B, P] batch (no padding on either side)."""
    fns = {f"{side.label} forward": side.forward_fn(ids) for side in sides.runners()}
    timings, other_load = time_interleaved(fns, args)
    batch, length = ids.shape
    row = {"kind": "forward", "batch": batch, "tokens": batch * length, "prompt_tokens": batch * length}
    for side in sides.runners():
        row[side.label] = side_figures(batch * length, timings[f"{side.label} forward"])
    return finish_row(row, timings, other_load)


def side_figures(tokens, t, per_step=None):
    """tokens/s from a Timing of the work that produced `tokens`; ms per step if given."""
    ok = t.median > 0
    figures = {
        "tokens_per_s": tokens / t.median if ok else None,
        "median_ms": t.median * 1e3,
        "spread": t.iqr / t.median if ok else None,
    }
    if per_step:
        figures["step_ms"] = t.median * 1e3 / per_step if ok else None
    return figures


def finish_row(row, timings, other_load):
    """Ratio ours / HF, the raw timings and the noise flag."""
    ours, hf = row["ours"]["tokens_per_s"], row.get("HF", {}).get("tokens_per_s")
    row["ours_over_hf"] = ours / hf if ours and hf else None
    row["times"] = {name: t.to_json() for name, t in timings.items()}
    row["other_load_cores"] = other_load
    spreads = [row[s]["spread"] for s in ("ours", "HF") if s in row and row[s]["spread"] is not None]
    row["noisy"] = (other_load or 0.0) > NOISY_LOAD_CORES or any(s > NOISY_SPREAD for s in spreads)
    return row


def add_roofline(rows, copy):
    """Per decode row: the weights-read bound (weight_bytes / copy GB/s) over the step time."""
    for row in rows:
        if row["kind"] != "decode":
            continue
        bound_ms = row["weight_bytes"] / (copy["gb_per_s"] * 1e9) * 1e3
        row["roofline_step_ms"] = bound_ms
        for side in ("ours", "HF"):
            step = row.get(side, {}).get("step_ms")
            if step:
                row[side]["weight_gb_per_s"] = row["weight_bytes"] / (step * 1e-3) / 1e9
                row[side]["roofline_fraction"] = bound_ms / step


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def run_mode(mode, dtype, model_path, workload, args):
    """Every row of one mode and dtype; the models are freed afterwards."""
    sides = MODES[mode](model_path, dtype, workload, args)
    rows = [measure_decode(sides, workload.decode_prompts[:b], args.new_tokens, args) for b in args.batches]
    rows.append(measure_prefill(sides, workload.prefill_prompts, args))
    rows.append(measure_forward(sides, workload.forward_ids, args))
    for row in rows:
        row.update(mode=mode, dtype=dtype, weight_bytes=sides.weight_bytes)
        if sides.hf is not None:
            row["hf_weight_bytes"] = sides.hf.weight_bytes()
        print(f"  {mode} {dtype} {describe(row)}", flush=True)
    del sides
    gc.collect()
    return rows


def describe(row):
    parts = [f"{row['kind']} B={row['batch']}"]
    for side in ("ours", "HF"):
        if side in row and row[side]["tokens_per_s"]:
            parts.append(f"{side} {row[side]['tokens_per_s']:.0f} tok/s")
    return ", ".join(parts)


def load_tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


# ---------------------------------------------------------------------------------------------
# Report: table, JSON, plot
# ---------------------------------------------------------------------------------------------


def _fmt(value, spec, suffix=""):
    return "-" if value is None else format(value, spec) + suffix


def print_table(rows, copy, has_hf):
    headers = ["mode", "dtype", "kind", "B", "tokens", "ours tok/s", "HF tok/s", "ours/HF",
               "ours ms/step", "HF ms/step", "ours % roof", "HF % roof", "agree", "others"]  # fmt: skip
    table = []
    for r in rows:
        ours, hf = r["ours"], r.get("HF", {})
        table.append([
            r["mode"], r["dtype"], r["kind"], r["batch"], r["tokens"],
            _fmt(ours["tokens_per_s"], ".0f"), _fmt(hf.get("tokens_per_s"), ".0f"),
            _fmt(r["ours_over_hf"], ".2f", "x"),
            _fmt(ours.get("step_ms"), ".2f"), _fmt(hf.get("step_ms"), ".2f"),
            _fmt(ours.get("roofline_fraction"), ".0%"), _fmt(hf.get("roofline_fraction"), ".0%"),
            _fmt(r.get("agreement"), ".2f"),
            _fmt(r["other_load_cores"], ".2f", " NOISY" if r["noisy"] else ""),
        ])  # fmt: skip
    print(timing.format_table(headers, table))
    print(
        "\ndecode: tokens = N new tokens per sequence timed; tok/s = B * N / ([N + 1 tokens] - [1 token]) "
        "generate time, median of per-round differences.\n"
        "prefill: tokens = real prompt tokens of B ragged prompts; tok/s = tokens / time to first token "
        "(HF left-pads).\n"
        "forward: one forward over [B, tokens / B] equal-length ids, full logits.\n"
        f"% roof = (weight_bytes / copy bandwidth) / step time; copy bandwidth {copy['gb_per_s']:.1f} GB/s "
        "counts read + write bytes (a copy of X bytes moves 2X); weights counted as read bytes only.\n"
        "agree: mean fraction of each sequence's tokens before ours and HF first differ (greedy).\n"
        f"others: CPU cores other processes kept busy; NOISY above {NOISY_LOAD_CORES} or when a "
        f"timing's IQR exceeds {NOISY_SPREAD:.0%} of its median: rerun on a quiet machine."
        + ("" if has_hf else "\n--no-hf: HF was not run, so there are no ratios.")
    )


def build_payload(args, env, model_path, copy, rows, elapsed):
    return {
        "benchmark": "throughput",
        "model": str(model_path),
        "environment": env,
        "settings": {
            "modes": args.mode, "dtypes": args.dtype, "batches": args.batches, "new_tokens": args.new_tokens,
            "prefill_tokens": args.prefill_tokens, "repeats": args.repeats, "warmup": args.warmup,
            "budget_s_per_row": args.budget, "min_repeats": MIN_REPEATS, "quick": args.quick,
            "hf": not args.no_hf, "threads": torch.get_num_threads(),
            "prompt_tokens_range": list(PROMPT_TOKENS), "forward_batch": FORWARD_BATCH,
            "variants interleaved": True, "noisy_above_other_load_cores": NOISY_LOAD_CORES,
            "noisy_above_spread": NOISY_SPREAD,
        },  # fmt: skip
        "method": {
            "decode": "B * N / median over rounds of (t[generate N + 1 new tokens] - t[generate 1 new token])",
            "step_ms": "that difference / N",
            "ttft_ms": "median t[generate 1 new token]: prefill of the B prompts + the first token",
            "prefill": "real prompt tokens / median t[generate 1 new token] (HF left-padded)",
            "forward": "B * P / median t[forward over equal-length ids [B, P]], full logits",
            "ours": "moa_engine._C.Engine.generate(requests), greedy, ignore_eos=True",
            "HF": "transformers generate, greedy, min_new_tokens = max_new_tokens, left padding + attention mask",
            "roofline_fraction": "(weight_bytes / copy gb_per_s) / step time; weights counted as read bytes, "
            "copy gb_per_s counts read + write bytes",
            "agreement": "mean over sequences of (tokens before the first ours / HF difference) / N + 1",
            "spread": "IQR / median of the timed quantity (max - min below 4 samples)",
        },
        "copy_bandwidth": copy,
        "rows": rows,
        "total_s": elapsed,
    }


def write_plot(rows, path, title):
    """Decode tokens/s vs batch, one panel per dtype (ours and HF), and a prefill panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moa_engine._io import atomic_copy

    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(dtypes) + 1, figsize=(5 * (len(dtypes) + 1), 4.2), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        plot_decode_panel(ax, [r for r in rows if r["dtype"] == dtype], modes, dtype)
    plot_prefill_panel(axes[0][-1], rows, dtypes, modes)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as folder:
        scratch = os.path.join(folder, "plot.png")
        fig.savefig(scratch, dpi=110)
        atomic_copy(scratch, path)
    plt.close(fig)


def _series_label(side, mode, modes):
    return side if len(modes) == 1 else f"{side} ({mode})"


def plot_decode_panel(ax, rows, modes, dtype):
    for mode in modes:
        decode = sorted((r for r in rows if r["mode"] == mode and r["kind"] == "decode"), key=lambda r: r["batch"])
        batches = [r["batch"] for r in decode]
        for side, style in (("ours", "o-"), ("HF", "s--")):
            values = [r.get(side, {}).get("tokens_per_s") for r in decode]
            if any(v is not None for v in values):
                label = _series_label(side, mode, modes)
                ax.plot(batches, [v or float("nan") for v in values], style, label=label)
        for r in decode:
            if r["ours_over_hf"]:
                ax.annotate(f"{r['ours_over_hf']:.1f}x", (r["batch"], r["ours"]["tokens_per_s"]),
                            textcoords="offset points", xytext=(4, 6), fontsize=8)  # fmt: skip
        if batches:
            ax.margins(x=0.15, y=0.12)
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
    noisy = any(r["noisy"] for r in rows if r["kind"] == "decode")
    ax.set_title(f"decode, {dtype}" + (" (NOISY)" if noisy else ""))
    ax.set_xlabel("batch size")
    ax.set_ylabel("new tokens / s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_prefill_panel(ax, rows, dtypes, modes):
    groups = [(m, d, k) for m in modes for d in dtypes for k in ("prefill", "forward")]
    width = 0.38
    for offset, side in ((-width / 2, "ours"), (width / 2, "HF")):
        values = []
        for mode, dtype, kind in groups:
            match = [r for r in rows if (r["mode"], r["dtype"], r["kind"]) == (mode, dtype, kind)]
            values.append(match[0].get(side, {}).get("tokens_per_s") if match else None)
        if any(v is not None for v in values):
            xs = [i + offset for i in range(len(groups))]
            ax.bar(xs, [v or 0 for v in values], width, label=side)
    for i, (mode, dtype, kind) in enumerate(groups):
        match = [r for r in rows if (r["mode"], r["dtype"], r["kind"]) == (mode, dtype, kind)]
        if match and match[0]["ours_over_hf"]:
            top = max(match[0]["ours"]["tokens_per_s"], match[0]["HF"]["tokens_per_s"])
            ax.annotate(f"{match[0]['ours_over_hf']:.2f}x", (i, top), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=8)  # fmt: skip
    ax.margins(y=0.12)
    names = [f"{d}\n{k}" if len(modes) == 1 else f"{m} {d}\n{k}" for m, d, k in groups]
    ax.set_xticks(range(len(groups)), names, fontsize=8)
    noisy = any(r["noisy"] for r in rows if r["kind"] != "decode")
    ax.set_title("prefill (time to first token) and forward" + (" (NOISY)" if noisy else ""))
    ax.set_ylabel("prompt tokens / s")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def plot_title(env, copy, args):
    return (
        f"moa_engine vs HF transformers, {env['device_name']}, {env['threads']} threads, "
        f"N={args.new_tokens} new tokens, copy {copy['gb_per_s']:.1f} GB/s (read+write)"
    )


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--mode", nargs="+", choices=list(MODES), default=["base"], help="what the engine serves (default base)")
    add("--dtype", nargs="+", choices=list(DTYPES), default=None, help="default: both (--quick: float32)")
    add("--batches", nargs="+", type=int, default=None, help="decode batch sizes (default 1 8 32; --quick: 1 8)")
    add("--new-tokens", type=int, default=None, help="N, decode tokens timed per sequence (default 64; quick 8)")
    add("--prefill-tokens", type=int, default=None, help="prompt tokens per prefill row (default 768; quick 256)")
    add("--repeats", type=int, default=None, help="timed rounds, median taken (default 5; --quick: 1)")
    add("--warmup", type=int, default=1, help="untimed calls per variant before timing (default 1)")
    add("--budget", type=float, default=120.0,
        help=f"seconds per row after which no new round starts, once {MIN_REPEATS} are in (default 120)")
    add("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads, both sides (all)")
    add("--quick", action="store_true", help="smoke run: B = 1 8, N = 8, 1 repeat, float32 (CI)")
    add("--no-hf", action="store_true", help="skip the HF baseline (no ratios)")
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
    for name in ("new_tokens", "prefill_tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or min(args.batches) < 1:
        parser.error(f"--warmup must be >= 0 and --batches >= 1, got {args.warmup} and {args.batches}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    args.batches = sorted(set(args.batches))
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
    print_table(rows, copy, not args.no_hf)
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
