"""Training throughput: stage-1 MoA training of several experts at once vs PEFT LoRA training of one.

Systems, trained on the same model, dtype, sequence length, rank and total batch:
- PEFT: `peft.get_peft_model(model, LoraConfig(r, lora_alpha, the 7 target modules, dropout 0,
  CAUSAL_LM))`, AdamW over its trainable parameters (fused=True: the optimizer transformers'
  Trainer picks by default with torch >= 2.8, "adamw_torch_fused"), the standard loop:
  loss = model(input_ids, attention_mask, labels=input_ids).loss; backward; clip_grad_norm_(1.0);
  step; zero_grad. One adapter.
- ours (E experts): `moa_engine.training.trainer.train` (the loop `moa-engine train experts`
  runs) with `stages.stage1_loss` on a MoAModel holding E experts, E domains, all E experts
  trained concurrently in every step (per-expert AdamW groups, fused, per-group clipping at 1.0;
  the LM loss through training/linear_ce.py, the frozen head in row chunks).
- ours (1 expert): the same loop with one domain and one expert, the whole batch in it; the gap
  between the two "ours" rows is the cost of training E experts at once instead of one.

Fairness.
- The batch is split per domain: a step processes --batch sequences in all on every system.
  PEFT's step takes all of them through its one adapter; ours (E experts) takes --batch / E of
  each domain, each through its own expert (the trainer's `batch` is samples per domain), so the
  three systems do the same number of sequences and tokens per step. PEFT's step k sees exactly
  the sequences ours (E experts) sees at step k (dataset.domain_samples, concatenated).
- Data: fixed-length sequences (--seq-len) of random token ids (seeded), attention mask all ones,
  no padding, loss on every token (each sequence scores its seq_len - 1 next-token predictions,
  on every system).
- "tokens" counts input tokens processed per step: --batch * --seq-len (the trainer's
  record["tokens"], real non-pad tokens). tokens/s = tokens per step / median step time.
- Same rank and alpha (scale alpha / r), all 7 projections (q, k, v, o, gate, up, down), AdamW
  (weight decay 0), the same lr, float32 weights; --dtype bfloat16 is torch.autocast(bfloat16)
  on both (the trainer's bfloat16 mode). Both HF models are put in train() mode (dropout is 0 in
  these configs; HF applies gradient checkpointing only in train mode), and --grad-checkpointing
  enables the same non-reentrant checkpointing (modules.enable_checkpointing) on both.
- PEFT's batches are tensors prepared before timing; ours collates its examples inside the
  timed loop, as the trainer does (this favours PEFT slightly).
- Step time: the wall time between the ends of consecutive optimizer.step() calls (the device
  synchronized at each), so a step is one whole loop iteration: data, forward, backward,
  clipping, optimizer, logging. Ours is measured from outside the trainer with a global
  optimizer step post-hook; the trainer's own logged tokens_per_s is kept in the JSON as a
  cross-check. The first --warmup steps of every round are not timed (every round starts a fresh
  optimizer on both sides, as a new run would).
- Rounds (--rounds) interleave the systems, their order reversed every other round, so drift on
  a noisy machine hits all of them alike; figures are medians over every timed step of every
  round, the ratio ours / PEFT is taken in the same run.

Goal (the issue): ours with 4 experts concurrently >= 1.0x PEFT's single-adapter tokens/s.

    python benchmarks/train.py                         # full run: float32, seq 256, batch 8, 4 experts
    python benchmarks/train.py --dtype float32,bfloat16
    python benchmarks/train.py --quick                 # smoke run: seq 32, batch 4, 2 steps, 1 round
    python benchmarks/train.py --device cuda --dtype float32,bfloat16 --seq-len 512 --batch 16

Output: a markdown table, JSON at benchmarks/results/train.json (--out) and a plot beside it
(same name, .png). Rows taken while other processes kept the CPU busy, or with a wide spread,
are marked NOISY: rerun them on a quiet machine.
"""

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace

import torch

if __package__:
    from . import _timing as timing
else:
    import _timing as timing

try:
    import moa_engine  # noqa: F401
except ImportError:  # run from a source checkout without an (importable) install
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = ("float32", "bfloat16")
FULL = dict(seq_len=256, batch=8, steps=8, warmup=2, rounds=3)
QUICK = dict(seq_len=32, batch=4, steps=2, warmup=1, rounds=1)
GOAL = 1.0  # ours (4 experts) tokens/s / PEFT (1 adapter) tokens/s
NOISY_LOAD_CORES = 0.2  # a row taken while other processes kept more cores busy is flagged
NOISY_SPREAD = 0.10  # ... and one whose step times' IQR exceeds this fraction of their median
DATA_SEED = 1234


# ---------------------------------------------------------------------------------------------
# Data: the same random sequences for every system
# ---------------------------------------------------------------------------------------------


def make_data(args, vocab):
    """({domain: [Example]}, per-domain batch). Domain d's examples are enough for one round's
    steps without repeats; loss on every token but the first (which nothing predicts)."""
    from moa_engine.training.dataset import Example

    per_domain = args.batch // args.experts
    count = per_domain * (args.warmup + args.steps)
    gen = torch.Generator().manual_seed(DATA_SEED)
    examples = {}
    for k in range(args.experts):
        d = f"d{k}"
        ids = torch.randint(0, vocab, (count, args.seq_len), generator=gen).tolist()
        mask = [i > 0 for i in range(args.seq_len)]
        examples[d] = [Example(row, list(mask), args.seq_len, d) for row in ids]
    return examples, per_domain


def peft_batches(examples, per_domain, steps, seed):
    """PEFT's step k: the sequences ours (E experts) trains on at step k, concatenated [batch, T]."""
    from moa_engine.training.dataset import domain_samples

    out = []
    for step in range(steps):
        rows = [
            examples[d][i].input_ids
            for d in examples
            for i in domain_samples(len(examples[d]), per_domain, step, seed, d)
        ]
        out.append(torch.tensor(rows, dtype=torch.int64))
    return out


# ---------------------------------------------------------------------------------------------
# The systems: each runs one round (a fresh optimizer, warmup + steps) and returns its step times
# ---------------------------------------------------------------------------------------------


class StepClock:
    """End-of-step timestamps: `tick()` synchronizes the device and records the time.
    intervals(warmup): the times between consecutive ends, the first `warmup` steps dropped."""

    def __init__(self, device):
        self.device = device
        self.ends = []

    def start(self):
        timing.synchronize(self.device)
        self.ends = [time.perf_counter()]

    def tick(self, *_):
        timing.synchronize(self.device)
        self.ends.append(time.perf_counter())

    def intervals(self, warmup):
        gaps = [b - a for a, b in zip(self.ends, self.ends[1:])]
        return gaps[warmup:]


def load_hf(folder, args):
    """The frozen float32 HF model, on the device, in train mode (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    from moa_engine.training.modules import enable_checkpointing

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    hf.config.use_cache = False
    hf.to(args.device)
    if args.grad_checkpointing:
        enable_checkpointing(hf)
    return hf.train()


class PeftSystem:
    key = "PEFT"

    def __init__(self, folder, args, batches):
        from peft import LoraConfig, get_peft_model

        from moa_engine.moa_format import TARGET_MODULES

        config = LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            target_modules=list(TARGET_MODULES),
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(load_hf(folder, args), config).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.batches = [b.to(args.device) for b in batches]
        self.mask = torch.ones_like(self.batches[0])
        self.args = args
        self.label = "PEFT (1 adapter)"
        self.experts = 1

    def trainable(self):
        return sum(p.numel() for p in self.params)

    def run_round(self, dtype):
        args = self.args
        device = torch.device(args.device)
        opt = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=0.0, fused=True)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
        clock = StepClock(args.device)
        losses = []
        clock.start()
        for ids in self.batches:
            with autocast:
                loss = self.model(input_ids=ids, attention_mask=self.mask, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            opt.step()
            clock.tick()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        return {"step_s": clock.intervals(args.warmup), "loss": [float(x) for x in losses], "log_time_s": None}


class OursSystem:
    """trainer.train on a MoAModel with `experts` experts, one domain each."""

    def __init__(self, folder, args, examples, per_domain, key, label):
        from moa_engine.moa_format import TARGET_MODULES
        from moa_engine.training.modules import MoAModel
        from moa_engine.training.stages import expert_seed

        self.module = MoAModel(load_hf(folder, args), TARGET_MODULES)
        for d in examples:
            self.module.add_expert(d, args.rank, args.alpha, seed=expert_seed(0, d))
        self.module.to(args.device)
        self.examples = examples
        self.per_domain = per_domain
        self.args = args
        self.key, self.label, self.experts = key, label, len(examples)

    def trainable(self):
        return sum(p.numel() for d in self.examples for p in self.module.expert_parameters(d))

    def run_round(self, dtype):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        from moa_engine.training.stages import stage1_loss
        from moa_engine.training.trainer import Group, Plan, TrainConfig, train

        args = self.args
        total = args.warmup + args.steps
        cfg = TrainConfig(
            batch=self.per_domain,
            steps=total,
            lr=args.lr,
            dtype=dtype,
            device=args.device,
            max_grad_norm=1.0,
            weight_decay=0.0,
            progress=False,
        )
        names = list(self.examples)
        plan = Plan(self.examples, {d: total for d in names}, {d: k for k, d in enumerate(names)})
        groups = [Group(d, self.module.expert_parameters(d), total, args.lr) for d in names]
        clock = StepClock(args.device)
        handle = register_optimizer_step_post_hook(clock.tick)
        try:
            clock.start()
            records = train(self.module, groups, plan, stage1_loss(list(range(len(names)))), cfg)
        finally:
            handle.remove()
        if len(clock.ends) != total + 1:
            raise RuntimeError(f"expected {total} optimizer steps, saw {len(clock.ends) - 1}")
        log = [r["time_s"] for r in records[args.warmup :]]
        return {"step_s": clock.intervals(args.warmup), "loss": [r["loss"] for r in records], "log_time_s": log}


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def peak_device_bytes(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


def measure_dtype(systems, dtype, args):
    """Every system's rounds, interleaved; returns {key: raw results}."""
    raw = {
        s.key: {"rounds": [], "loss": [], "log_time_s": [], "other_load": [], "peak_device_bytes": None}
        for s in systems
    }
    for r in range(args.rounds):
        order = systems if r % 2 == 0 else systems[::-1]
        for s in order:
            if torch.device(args.device).type == "cuda":
                torch.cuda.reset_peak_memory_stats(args.device)
            with timing.OtherLoad() as load:
                result = s.run_round(dtype)
            entry = raw[s.key]
            entry["rounds"].append(result["step_s"])
            entry["loss"].append(result["loss"])
            entry["log_time_s"] += result["log_time_s"] or []
            entry["other_load"].append(load.cores)
            peak = peak_device_bytes(args.device)
            if peak is not None:
                entry["peak_device_bytes"] = max(entry["peak_device_bytes"] or 0, peak)
            ms = statistics.median(result["step_s"]) * 1e3
            print(f"  {dtype} round {r + 1}/{args.rounds}: {s.label}: {ms:.0f} ms/step", flush=True)
    return raw


def build_rows(systems, raw, dtype, args):
    tokens = args.batch * args.seq_len
    rows = []
    for s in systems:
        entry = raw[s.key]
        steps = [t for rnd in entry["rounds"] for t in rnd]
        t = timing.Timing(steps)
        loads = [c for c in entry["other_load"] if c is not None]
        other = max(loads) if loads else None
        spread = t.iqr / t.median
        log = entry["log_time_s"]
        row = {
            "dtype": dtype,
            "system": s.key,
            "label": s.label,
            "experts": s.experts,
            "sequences_per_step": args.batch,
            "sequences_per_expert": args.batch // s.experts,
            "tokens_per_step": tokens,
            "trainable_parameters": s.trainable(),
            "step": t.to_json(),
            "step_s_per_round": entry["rounds"],
            "tokens_per_s": tokens / t.median,
            "trainer_log_tokens_per_s": tokens / statistics.median(log) if log else None,
            "loss_per_round": entry["loss"],
            "other_load_cores": other,
            "spread": spread,
            "peak_device_bytes": entry["peak_device_bytes"],
            "noisy": (other is not None and other > NOISY_LOAD_CORES) or spread > NOISY_SPREAD,
        }
        rows.append(row)
    peft = next(r for r in rows if r["system"] == "PEFT")
    for row in rows:
        row["over_peft"] = row["tokens_per_s"] / peft["tokens_per_s"]
        pairs = zip(row["step_s_per_round"], peft["step_s_per_round"])
        row["over_peft_per_round"] = [statistics.median(p) / statistics.median(o) for o, p in pairs]
    return rows


def ratios(rows):
    """Per dtype: ours (E experts) / PEFT, ours (1 expert) / PEFT, ours (E) / ours (1)."""
    out = {}
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        by = {r["system"]: r for r in rows if r["dtype"] == dtype}
        ours, one, peft = by["ours"], by.get("ours_1"), by["PEFT"]
        entry = {
            "ours_over_peft": ours["tokens_per_s"] / peft["tokens_per_s"],
            "ours_over_peft_per_round": ours["over_peft_per_round"],
            "goal": GOAL,
            "goal_met": ours["tokens_per_s"] / peft["tokens_per_s"] >= GOAL,
        }
        if one is not None:
            entry["ours_1_over_peft"] = one["tokens_per_s"] / peft["tokens_per_s"]
            entry["ours_over_ours_1"] = ours["tokens_per_s"] / one["tokens_per_s"]
        out[dtype] = entry
    return out


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(rows):
    headers = [
        "dtype",
        "system",
        "experts",
        "seqs/step",
        "tokens/step",
        "step ms",
        "IQR",
        "tokens/s",
        "vs PEFT",
        "trainer log tok/s",
        "others",
        "noisy",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        cells = [
            r["dtype"],
            r["label"],
            str(r["experts"]),
            str(r["sequences_per_step"]),
            str(r["tokens_per_step"]),
            f"{r['step']['median_ms']:.0f}",
            f"{r['spread']:.0%}",
            f"{r['tokens_per_s']:.1f}",
            f"{r['over_peft']:.2f}x",
            _fmt(r["trainer_log_tokens_per_s"], ".1f"),
            _fmt(r["other_load_cores"], ".2f"),
            "NOISY" if r["noisy"] else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_report(rows, summary, args, peak_rss):
    print(markdown_table(rows))
    print()
    for dtype, entry in summary.items():
        met = "MET" if entry["goal_met"] else "NOT MET"
        extra = ""
        if "ours_over_ours_1" in entry:
            extra = f"; {args.experts} experts vs 1: {entry['ours_over_ours_1']:.2f}x the single-expert tokens/s"
        rounds = ", ".join(f"{x:.2f}" for x in entry["ours_over_peft_per_round"])
        print(
            f"{dtype}: ours ({args.experts} experts) / PEFT (1 adapter) = {entry['ours_over_peft']:.2f}x "
            f"(per round {rounds}); goal >= {GOAL:.1f}x: {met}{extra}"
        )
    print(
        f"\ntokens = sequences x seq_len per step ({args.batch} x {args.seq_len}); step time = wall time between "
        f"consecutive optimizer.step() ends, median over {args.steps} steps x {args.rounds} rounds "
        f"({args.warmup} warmup steps per round untimed). IQR: interquartile range / median. others: CPU cores "
        f"other processes kept busy; NOISY above {NOISY_LOAD_CORES} or when IQR > {NOISY_SPREAD:.0%}: rerun "
        f"on a quiet machine. Peak RSS of the process (all systems loaded): {peak_rss / 2**20:.0f} MiB."
    )


def write_plot(rows, summary, path, title):
    """tokens/s bars per system, grouped by dtype, each annotated with its ratio to PEFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moa_engine._io import atomic_copy

    dtypes = list(summary)
    systems = list(dict.fromkeys(r["system"] for r in rows))
    labels = {r["system"]: r["label"] for r in rows}
    colors = {"PEFT": "tab:orange", "ours": "tab:blue", "ours_1": "tab:cyan"}
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.4 + 2.6 * len(dtypes)), 4.4))
    for i, system in enumerate(systems):
        xs, values = [], []
        for j, dtype in enumerate(dtypes):
            match = [r for r in rows if (r["dtype"], r["system"]) == (dtype, system)]
            if match:
                xs.append(j + (i - (len(systems) - 1) / 2) * width)
                values.append(match[0]["tokens_per_s"])
                ax.annotate(
                    f"{match[0]['over_peft']:.2f}x",
                    (xs[-1], values[-1]),
                    textcoords="offset points",
                    xytext=(0, 2),
                    ha="center",
                    fontsize=8,
                )
        ax.bar(xs, values, width, label=labels[system], color=colors.get(system))
    ax.set_xticks(range(len(dtypes)), dtypes)
    ax.margins(y=0.15)
    ax.set_ylabel("training tokens / s")
    noisy = any(r["noisy"] for r in rows)
    ax.set_title(title + (" (NOISY)" if noisy else ""), fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as folder:
        scratch = os.path.join(folder, "plot.png")
        fig.savefig(scratch, dpi=110)
        atomic_copy(scratch, path)
    plt.close(fig)


def build_payload(args, env, folder, rows, summary, peak_rss, elapsed):
    return {
        "benchmark": "train",
        "model": str(folder),
        "environment": env,
        "settings": {
            "dtypes": args.dtype,
            "seq_len": args.seq_len,
            "batch": args.batch,
            "experts": args.experts,
            "sequences_per_domain": args.batch // args.experts,
            "rank": args.rank,
            "alpha": args.alpha,
            "target_modules": "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj",
            "lr": args.lr,
            "optimizer": "AdamW (weight decay 0, fused, on both)",
            "max_grad_norm": 1.0,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "grad_checkpointing": args.grad_checkpointing,
            "threads": torch.get_num_threads(),
            "device": args.device,
            "quick": args.quick,
            "single_expert_row": not args.no_single,
            "data_seed": DATA_SEED,
            "noisy_above_other_load_cores": NOISY_LOAD_CORES,
            "noisy_above_spread": NOISY_SPREAD,
        },
        "method": {
            "tokens": "input tokens per step = batch * seq_len (no padding); seq_len - 1 scored per sequence",
            "step": "wall time between consecutive optimizer.step() ends, device synchronized; the first "
            "warmup steps of every round dropped; median over every timed step of every round",
            "tokens_per_s": "tokens per step / median step time",
            "PEFT": "get_peft_model(LoraConfig(r, alpha, 7 modules, dropout 0, CAUSAL_LM)); AdamW(fused=True); "
            "model(input_ids, attention_mask, labels=input_ids).loss; backward; clip 1.0; step; zero_grad",
            "ours": "moa_engine.training.trainer.train + stages.stage1_loss, MoAModel with E experts, "
            "E domains of batch / E sequences each per step",
            "ours_1": "the same with one domain and one expert, the whole batch",
            "trainer_log_tokens_per_s": "tokens per step / median of the trainer's own logged time_s (from the "
            "start of its step to after zero_grad: its logging left out; a cross-check)",
            "over_peft": "tokens_per_s / PEFT's tokens_per_s, same dtype, same run",
            "over_peft_per_round": "per round: PEFT's median step / this system's median step",
            "rounds": "systems interleaved, order reversed every other round",
            "peak_rss_bytes": "the process's peak RSS (ru_maxrss) with every system loaded",
            "peak_device_bytes": "CUDA only: torch.cuda.max_memory_allocated over the system's rounds",
        },
        "rows": rows,
        "ratios": summary,
        "peak_rss_bytes": peak_rss,
        "total_s": elapsed,
    }


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", default=None, help="a model folder or .gguf (default: the default model)")
    add("--dtype", default="float32", help="float32, bfloat16 or both comma-separated (default float32)")
    add("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    add("--seq-len", type=int, default=None, help="tokens per sequence (default 256; --quick 32)")
    add("--batch", type=int, default=None, help="sequences per step in all, every system (default 8; --quick 4)")
    add("--experts", type=int, default=4, help="experts trained concurrently by ours, batch / experts each (default 4)")
    add("--rank", type=int, default=16, help="LoRA rank (default 16)")
    add("--alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    add("--lr", type=float, default=2e-4, help="learning rate, every system (default 2e-4)")
    add("--steps", type=int, default=None, help="timed steps per round (default 8; --quick 2)")
    add(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps at the start of every round, >= 1 (default 2; --quick 1)",
    )
    add("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    add("--grad-checkpointing", action="store_true", help="activation checkpointing of the decoder layers, both sides")
    add("--no-single", action="store_true", help="skip the ours (1 expert) row")
    add("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: all)")
    add("--quick", action="store_true", help="smoke run: seq 32, batch 4, 2 steps, 1 warmup, 1 round")
    add(
        "--out",
        default=os.path.join(RESULTS_DIR, "train.json"),
        help="JSON path (default results/train.json); plot: .png beside",
    )
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = list(dict.fromkeys(d.strip() for d in args.dtype.split(",") if d.strip()))
    bad = [d for d in args.dtype if d not in DTYPES]
    if bad or not args.dtype:
        parser.error(f"--dtype: {bad or 'empty'}; choose from {list(DTYPES)}, comma-separated")
    for name in ("seq_len", "batch", "experts", "rank", "steps", "warmup", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq_len < 2:
        parser.error("--seq-len must be >= 2 (a sequence of one token has nothing to predict)")
    if args.batch % args.experts:
        parser.error(f"--batch ({args.batch}) must be a multiple of --experts ({args.experts})")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    args.plot = os.path.splitext(args.out)[0] + ".png"
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars, three models
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft
    from transformers import AutoConfig

    from moa_engine.models import resolve_model

    started = time.perf_counter()
    folder = resolve_model(args.model)
    env = timing.environment(args.device)
    print(f"torch {env['torch']}, {env['threads']} threads, {env['device_name']}, model {folder}")
    vocab = AutoConfig.from_pretrained(str(folder)).vocab_size
    examples, per_domain = make_data(args, vocab)
    peft = PeftSystem(folder, args, peft_batches(examples, per_domain, args.warmup + args.steps, seed=0))
    systems = [peft, OursSystem(folder, args, examples, per_domain, "ours", f"ours ({args.experts} experts)")]
    if not args.no_single:
        single = {"all": [replace(e, domain="all") for d in examples for e in examples[d]]}
        systems.append(OursSystem(folder, args, single, args.batch, "ours_1", "ours (1 expert)"))
    print(
        f"loaded {len(systems)} systems in {time.perf_counter() - started:.1f} s; {args.batch} x {args.seq_len} "
        f"tokens per step, rank {args.rank}",
        flush=True,
    )
    rows = []
    for dtype in args.dtype:
        rows += build_rows(systems, measure_dtype(systems, dtype, args), dtype, args)
    summary = ratios(rows)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print()
    print_report(rows, summary, args, peak_rss)
    elapsed = time.perf_counter() - started
    timing.write_json_atomic(args.out, build_payload(args, env, folder, rows, summary, peak_rss, elapsed))
    title = (
        f"stage-1 training tokens/s, {env['device_name']}, {env['threads']} threads\n{args.batch} x "
        f"{args.seq_len} tokens/step, rank {args.rank}, {args.experts} experts; x: vs PEFT"
    )
    write_plot(rows, summary, args.plot, title)
    print(f"\nwrote {args.out} and {args.plot} in {elapsed:.1f} s")
    noisy = [f"{r['dtype']}/{r['system']}" for r in rows if r["noisy"]]
    if noisy:
        print(f"NOISY rows (rerun on a quiet machine): {', '.join(noisy)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
