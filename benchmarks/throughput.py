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
(`moa_format.make_random_peft_adapter`, seed i for expert e<i>) and cached under
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

import argparse
import gc
import json
import math
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
FULL = dict(new_tokens=64, repeats=5, dtype=["float32", "bfloat16"], prefill_tokens=768,
            experts=[1, 4, 8, 32], peft_new_tokens=16, router_experts=8)  # fmt: skip
QUICK = dict(new_tokens=8, repeats=1, dtype=["float32"], prefill_tokens=256,
             experts=[1, 4], peft_new_tokens=4, router_experts=4)  # fmt: skip
MODE_BATCHES = {"base": ([1, 8, 32], [1, 8]), "moa": ([16, 32], [16])}  # default --batches: (full, quick)
MOA_RANK, MOA_ALPHA = 16, 32  # the experts' LoRA rank and alpha (scale alpha / r = 2), all seven projections
ROUTER_BATCH = 16  # prompts in a routing row
ROUTINGS = ("last", "per_layer", "vote")  # routed variants of a routing row
ROUTER_SEED = 0
QUICK_ROUTING_VARIANTS = ("named", "last", "per_layer")  # --quick times only these
OVERHEAD_GOAL, PEFT_GOAL = 1.15, 8.0  # moa step / base step at E = 8, B = 32; ours / PEFT tokens/s

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


def max_decode_batch(args):
    """The most decode prompts any row of the chosen modes uses."""
    most = max(max(args.mode_batches[mode]) for mode in args.mode)
    return max(most, ROUTER_BATCH) if "moa" in args.mode else most


def make_workload(tokenizer, args):
    ids = passage_ids(tokenizer)
    length = max(1, args.prefill_tokens // FORWARD_BATCH)
    most = max_decode_batch(args)
    # the base rows' prompts do not depend on which other modes run
    first = max(args.mode_batches["base"]) if "base" in args.mode else most
    return Workload(
        decode_prompts=make_prompts(ids, most),
        prefill_prompts=prompts_totalling(ids, args.prefill_tokens, first=first),
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

    def generate_fn(self, prompts, new_tokens, domains=None, routing=None, on_results=None):
        """domains: one per prompt (an expert, "base", or None to route with `routing`);
        None leaves the requests' default. on_results, if given, sees the raw results."""
        requests = [self._greedy_request(p, new_tokens) for p in prompts]
        if domains is not None:
            for r, domain in zip(requests, domains, strict=True):
                r.domain = domain or ""
                r.routing = routing or ""
        core = self.engine._core

        def run():
            results = core.generate(requests)
            if on_results is not None:
                on_results(results)
            return [list(r.token_ids) for r in results]

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

    def generate_fn(self, prompts, new_tokens, **extra):
        """extra: more generate() arguments (PEFT: adapter_names, one per prompt)."""
        input_ids, attention_mask = left_pad(prompts, self.pad_id)  # [B, max P] each
        options = dict(
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=self.pad_id
        )
        options.update(extra)

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


class PeftRunner(HFRunner):
    """HF transformers + PEFT: a PeftModel holding every adapter, mixed-batch generate with
    adapter_names (one per row)."""

    label = "PEFT"


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
        max_batch=max(max(args.mode_batches["base"]), len(workload.prefill_prompts), FORWARD_BATCH),
        max_seq_len=max(workload.longest_prompt + args.new_tokens + 1, workload.forward_ids.shape[1]),
        max_prefill_tokens=max(4096, sum(map(len, workload.decode_prompts + workload.prefill_prompts))),
    )
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=DTYPES[dtype]).to(args.device).eval()
        hf = HFRunner(model, hf_pad_id(model, engine))
    return Sides(OursRunner(engine), hf, engine.weight_bytes)


def hf_pad_id(model, engine):
    pad_id = model.generation_config.pad_token_id
    if pad_id is None:
        pad_id = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
    return pad_id


def measure_base(sides, model_path, dtype, workload, args):
    """The base mode's rows: decode at each batch, prefill, forward."""
    measurements = [lambda b=b: measure_decode(sides, workload.decode_prompts[:b], args.new_tokens, args)
                    for b in args.mode_batches["base"]]  # fmt: skip
    measurements.append(lambda: measure_prefill(sides, workload.prefill_prompts, args))
    measurements.append(lambda: measure_forward(sides, workload.forward_ids, args))
    for measure in measurements:
        row = measure()
        row["weight_bytes"] = sides.weight_bytes
        if sides.hf is not None:
            row["hf_weight_bytes"] = sides.hf.weight_bytes()
        yield row


@dataclass
class MoASides:
    ours: OursRunner  # one engine with every expert loaded
    peft: PeftRunner | None  # one PeftModel with every adapter loaded
    experts: list  # the experts' names, e0 .. e<max E - 1>: request i gets experts[i % E]
    base_weight_bytes: int  # the base model's weights (Engine.weight_bytes)
    expert_bytes: int  # one expert's LoRA weights as the engine holds them (in its dtype)


def moa_mode(model_path, dtype, workload, args):
    """The engine with max(--experts) PEFT LoRA experts; PEFT with the same adapters."""
    import moa_engine

    adapters = ensure_adapters(model_path, max(args.experts), args)  # {name: PEFT folder}
    started = time.perf_counter()
    engine = moa_engine.Engine(
        str(model_path),
        experts=adapters,
        dtype=dtype,
        device=args.device,
        max_batch=max(args.mode_batches["moa"]),
        max_seq_len=workload.longest_prompt + max(args.new_tokens, args.peft_new_tokens) + 1,
        max_prefill_tokens=max(4096, sum(map(len, workload.decode_prompts))),
    )
    print(f"  moa {dtype}: engine with {len(adapters)} experts loaded in {time.perf_counter() - started:.1f} s")
    peft = None
    if not args.no_hf:
        started = time.perf_counter()
        model = load_peft_model(model_path, dtype, adapters, args)
        peft = PeftRunner(model, hf_pad_id(model, engine))
        print(f"  moa {dtype}: PeftModel with {len(adapters)} adapters loaded in {time.perf_counter() - started:.1f} s")
    element = torch.empty((), dtype=DTYPES[dtype]).element_size()
    expert_bytes = lora_parameters(next(iter(adapters.values()))) * element
    return MoASides(OursRunner(engine), peft, list(adapters), engine.weight_bytes, expert_bytes)


def load_peft_model(model_path, dtype, adapters, args):
    """One PeftModel holding every adapter: from_pretrained with the first, load_adapter the rest."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=DTYPES[dtype])
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.to(args.device).eval()


def lora_parameters(adapter_dir):
    """Numbers in one PEFT adapter's lora_A and lora_B matrices."""
    from moa_engine.moa_format import load_peft_adapter

    expert = load_peft_adapter(adapter_dir)
    return sum(A.numel() + B.numel() for A, B, _ in expert.targets.values())


def adapter_cache_folder(model_path, args):
    name = os.path.basename(os.path.normpath(str(model_path)))
    return os.path.join(args.adapter_cache, f"{name}-r{MOA_RANK}-a{MOA_ALPHA}")


def ensure_adapters(model_path, count, args):
    """{e<i>: folder} for i < count: PEFT LoRA adapters (rank MOA_RANK, all seven projections,
    seed i) made by `make_random_peft_adapter`, cached across runs (each written atomically)."""
    from moa_engine.moa_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from moa_engine.testing import make_random_peft_adapter

    folder = adapter_cache_folder(model_path, args)
    adapters = {f"e{i}": os.path.join(folder, f"e{i}") for i in range(count)}
    missing = [
        i
        for i, path in enumerate(adapters.values())
        if not all(os.path.isfile(os.path.join(path, name)) for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    ]
    if missing:
        from transformers import AutoModelForCausalLM

        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)  # loaded once
        for i in missing:
            make_random_peft_adapter(model, adapters[f"e{i}"], r=MOA_RANK, alpha=MOA_ALPHA, seed=i)
        del model
        gc.collect()
        print(f"made {len(missing)} PEFT adapters in {time.perf_counter() - started:.1f} s, cached in {folder}")
    return adapters


def ensure_moa_dir(model_path, count, args):
    """A MoA directory (cached) with experts e0 .. e<count - 1> and random routers, one
    [count, hidden] float32 matrix per layer (seed ROUTER_SEED, scaled by 1 / sqrt(hidden))."""
    from moa_engine.moa_format import MoAConfig, MoADir, RouterConfig

    adapters = ensure_adapters(model_path, count, args)
    path = os.path.join(adapter_cache_folder(model_path, args), f"moa-{count}-router-seed{ROUTER_SEED}")
    try:
        MoADir.load(path)
        return path
    except (FileNotFoundError, ValueError):
        pass
    with open(os.path.join(str(model_path), "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    generator = torch.Generator().manual_seed(ROUTER_SEED)
    router = [torch.randn(count, hidden, generator=generator) / math.sqrt(hidden) for _ in range(layers)]
    moa_config = MoAConfig(base_model=str(model_path), domains=list(adapters), router=RouterConfig(strategy="last"))
    MoADir.save(path, moa_config, experts=adapters, router=router, overwrite=True)
    return path


def measure_moa(sides, model_path, dtype, workload, args):
    """The moa mode's rows: decode at each batch and number of experts, then routing TTFT."""
    for batch in args.mode_batches["moa"]:
        for n_experts in sorted({min(e, batch) for e in args.experts}):  # at most one expert per request
            yield measure_moa_decode(sides, workload.decode_prompts[:batch], n_experts, args)
    sides.ours = sides.peft = None  # free the decode engine and PeftModel before the next engine
    gc.collect()
    yield measure_routing(model_path, dtype, workload.decode_prompts[:ROUTER_BATCH], args)


@dataclass
class Mode:
    build: object  # (model_path, dtype, workload, args) -> the sides
    measure: object  # (sides, model_path, dtype, workload, args) -> JSON-ready rows, one at a time


MODES = {"base": Mode(base_mode, measure_base), "moa": Mode(moa_mode, measure_moa)}


# ---------------------------------------------------------------------------------------------
# Measurements: each returns one JSON-ready row
# ---------------------------------------------------------------------------------------------


def time_interleaved(fns, args, cold=()):
    """Warm up, then time the variants round by round; with the other load meanwhile.
    Variants named in `cold` get no warm-up (--quick: PEFT, whose calls are long)."""
    warmup = args.warmup
    with timing.OtherLoad() as other_load:
        if cold:  # time_fns' warm-up, for the others only
            seconds = None if args.budget is None else args.budget / 4 / len(fns)
            for name, fn in fns.items():
                if name not in cold:
                    timing.warm_up(fn, device=args.device, calls=warmup, max_seconds=seconds)
            warmup = 0
        timings = timing.time_fns(
            fns,
            device=args.device,
            warmup=warmup,
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
        row[side.label], _ = decode_figures(timings, side.label, len(prompts), new_tokens)
    if sides.hf is not None:
        row["agreement"] = agreement(outputs["ours"], outputs["HF"])
    return finish_row(row, timings, other_load)


def decode_figures(timings, label, batch, new_tokens):
    """Figures of `label`'s decode: per round [N + 1 tokens] - [1 token]; and that Timing."""
    first, whole = timings[f"{label} ttft"], timings[f"{label} gen"]
    decode = timing.Timing([w - f for w, f in zip(whole.samples, first.samples)])
    figures = side_figures(batch * new_tokens, decode, per_step=new_tokens)
    figures["ttft_ms"] = first.median * 1e3
    return figures, decode


def measure_moa_decode(sides, prompts, n_experts, args):
    """Decode tokens/s at batch len(prompts) with n_experts distinct experts, round-robin: the
    engine with experts, the same engine with domain="base", and PEFT mixed-batch generate."""
    batch, new_tokens, peft_tokens = len(prompts), args.new_tokens, args.peft_new_tokens
    names = [sides.experts[i % n_experts] for i in range(batch)]
    fns, outputs = {}, {}
    for label, domains in (("ours", names), ("ours_base", ["base"] * batch)):
        fns[f"{label} ttft"] = sides.ours.generate_fn(prompts, 1, domains)
        fns[f"{label} gen"] = recording(sides.ours.generate_fn(prompts, new_tokens + 1, domains), outputs, label)
    if sides.peft is not None:
        fns["PEFT ttft"] = sides.peft.generate_fn(prompts, 1, adapter_names=names)
        peft_gen = sides.peft.generate_fn(prompts, peft_tokens + 1, adapter_names=names)
        fns["PEFT gen"] = recording(peft_gen, outputs, "PEFT")
    cold = ("PEFT ttft", "PEFT gen") if args.quick else ()
    timings, other_load = time_interleaved(fns, args, cold=cold)
    check_lengths({k: v for k, v in outputs.items() if k != "PEFT"}, batch, new_tokens + 1)
    row = {
        "kind": "decode", "batch": batch, "experts": len(set(names)), "experts_loaded": len(sides.experts),
        "tokens": new_tokens, "prompt_tokens": sum(map(len, prompts)),
        "base_weight_bytes": sides.base_weight_bytes, "expert_bytes": sides.expert_bytes,
        # a step reads the base weights and each expert in the batch once
        "weight_bytes": sides.base_weight_bytes + len(set(names)) * sides.expert_bytes,
    }  # fmt: skip
    row["ours"], moa = decode_figures(timings, "ours", batch, new_tokens)
    row["ours_base"], base = decode_figures(timings, "ours_base", batch, new_tokens)
    row["overhead"] = ratio(row["ours"]["step_ms"], row["ours_base"]["step_ms"])
    paired = [m / b for m, b in zip(moa.samples, base.samples) if b > 0]
    row["overhead_paired"] = statistics.median(paired) if paired else None
    row["ours_over_peft"] = None
    if sides.peft is not None:
        check_lengths({"PEFT": outputs["PEFT"]}, batch, peft_tokens + 1)
        row["peft_tokens"] = peft_tokens
        row["PEFT"], _ = decode_figures(timings, "PEFT", batch, peft_tokens)
        row["ours_over_peft"] = ratio(row["ours"]["tokens_per_s"], row["PEFT"]["tokens_per_s"])
        shared = min(new_tokens, peft_tokens) + 1  # agreement over the tokens both sides made
        row["agreement"] = agreement([s[:shared] for s in outputs["ours"]], [s[:shared] for s in outputs["PEFT"]])
    return flag_noise(row, ("ours", "ours_base", "PEFT"), timings, other_load)


def measure_routing(model_path, dtype, prompts, args):
    """Time to first token of a batch of prompts on a MoA directory's engine: domain="base",
    named experts (round-robin), and routed (domain=None) with each routing strategy."""
    import moa_engine

    moa_dir = ensure_moa_dir(model_path, args.router_experts, args)
    engine = moa_engine.Engine(
        str(model_path),
        experts=moa_dir,
        dtype=dtype,
        device=args.device,
        max_batch=len(prompts),
        max_seq_len=max(map(len, prompts)) + 2,
        max_prefill_tokens=max(4096, sum(map(len, prompts))),
    )
    ours, batch = OursRunner(engine), len(prompts)
    domains = engine.router_domains
    variants = {"base": (["base"] * batch, None), "named": ([domains[i % len(domains)] for i in range(batch)], None)}
    variants.update({strategy: ([None] * batch, strategy) for strategy in ROUTINGS})
    if args.quick:
        variants = {label: variants[label] for label in QUICK_ROUTING_VARIANTS}
    fns, results = {}, {}
    for label, (names, routing) in variants.items():
        keep = (lambda label: lambda r: results.__setitem__(label, r))(label)  # a reference only
        fns[label] = ours.generate_fn(prompts, 1, names, routing, on_results=keep)
    timings, other_load = time_interleaved(fns, args)
    tokens = sum(map(len, prompts))
    row = {"kind": "routing", "batch": batch, "experts": len(domains), "tokens": tokens, "prompt_tokens": tokens}
    row["ttft"] = {}
    for label in variants:
        figures = side_figures(tokens, timings[label])
        figures["ttft_ms"] = figures["median_ms"]
        chosen = {d for r in results[label] for d in r.routing.layer_domains}
        figures["experts_used"] = len(chosen - {"base"})
        row["ttft"][label] = figures
    named = row["ttft"]["named"]["median_ms"]
    row["over_named"] = {label: ratio(row["ttft"][label]["median_ms"], named) for label in variants}
    del engine, ours, fns, results
    gc.collect()
    return flag_noise(row, (), timings, other_load, spreads=[f["spread"] for f in row["ttft"].values()])


def ratio(a, b):
    return a / b if a and b else None


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
    return flag_noise(row, ("ours", "HF"), timings, other_load)


def flag_noise(row, sides, timings, other_load, spreads=()):
    """The raw timings, the other load and the noise flag (from the sides' spreads, and `spreads`)."""
    row["times"] = {name: t.to_json() for name, t in timings.items()}
    row["other_load_cores"] = other_load
    spreads = list(spreads) + [row[s]["spread"] for s in sides if s in row]
    row["noisy"] = (other_load or 0.0) > NOISY_LOAD_CORES or any(s is not None and s > NOISY_SPREAD for s in spreads)
    return row


def add_roofline(rows, copy):
    """Per decode row: the weights-read bound (weight_bytes / copy GB/s) over the step time."""
    for row in rows:
        if row["kind"] != "decode":
            continue
        bound_ms = row["weight_bytes"] / (copy["gb_per_s"] * 1e9) * 1e3
        row["roofline_step_ms"] = bound_ms
        for side in ("ours", "HF", "ours_base"):  # ours_base (moa): the base weights alone
            step = row.get(side, {}).get("step_ms")
            if step:
                nbytes = row["base_weight_bytes"] if side == "ours_base" else row["weight_bytes"]
                row[side]["weight_gb_per_s"] = nbytes / (step * 1e-3) / 1e9
                row[side]["roofline_fraction"] = nbytes / (copy["gb_per_s"] * 1e9) * 1e3 / step


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def run_mode(mode, dtype, model_path, workload, args):
    """Every row of one mode and dtype, each printed as it is taken; the models are freed afterwards."""
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
# Report: table, JSON, plot
# ---------------------------------------------------------------------------------------------


def _fmt(value, spec, suffix=""):
    return "-" if value is None else format(value, spec) + suffix


def print_tables(rows, copy, has_hf):
    base = [r for r in rows if r["mode"] != "moa"]
    moa = [r for r in rows if r["mode"] == "moa"]
    if base:
        print_table(base, copy, has_hf)
    if moa:
        print("\n" if base else "", end="")
        print_moa_tables(moa, copy, has_hf)


def print_moa_tables(rows, copy, has_hf):
    headers = ["mode", "dtype", "kind", "B", "experts", "tokens", "ours tok/s", "PEFT tok/s", "ours/PEFT",
               "ours ms/step", "base ms/step", "overhead", "ours % roof", "agree", "others"]  # fmt: skip
    table = []
    for r in rows:
        if r["kind"] != "decode":
            continue
        ours, base, peft = r["ours"], r["ours_base"], r.get("PEFT", {})
        table.append([
            r["mode"], r["dtype"], r["kind"], r["batch"], r["experts"], r["tokens"],
            _fmt(ours["tokens_per_s"], ".0f"), _fmt(peft.get("tokens_per_s"), ".0f"),
            _fmt(r["ours_over_peft"], ".1f", "x"),
            _fmt(ours["step_ms"], ".2f"), _fmt(base["step_ms"], ".2f"), _fmt(r["overhead"], ".3f", "x"),
            _fmt(ours.get("roofline_fraction"), ".0%"), _fmt(r.get("agreement"), ".2f"),
            _fmt(r["other_load_cores"], ".2f", " NOISY" if r["noisy"] else ""),
        ])  # fmt: skip
    print(timing.format_table(headers, table))
    headers = ["mode", "dtype", "kind", "B", "experts", "prompt tokens", "domain", "TTFT ms", "prefill tok/s",
               "vs named", "experts used", "others"]  # fmt: skip
    table = []
    for r in rows:
        if r["kind"] != "routing":
            continue
        for label, figures in r["ttft"].items():
            domain = label if label in ("base", "named") else f"None, {label}"
            table.append([
                r["mode"], r["dtype"], r["kind"], r["batch"], r["experts"], r["tokens"], domain,
                _fmt(figures["ttft_ms"], ".1f"), _fmt(figures["tokens_per_s"], ".0f"),
                _fmt(r["over_named"][label], ".3f", "x"), figures["experts_used"],
                _fmt(r["other_load_cores"], ".2f", " NOISY" if r["noisy"] else ""),
            ])  # fmt: skip
    if table:
        print()
        print(timing.format_table(headers, table))
    decode = [r for r in rows if r["kind"] == "decode"]
    peft = f"{decode[0]['peft_tokens']}" if decode and "peft_tokens" in decode[0] else "-"
    print(
        f"\nmoa decode: experts = distinct rank-{MOA_RANK} experts in the batch (request i gets e<i mod experts>; "
        f"{decode[0]['experts_loaded'] if decode else '-'} loaded); tokens = N timed per sequence for ours "
        f"(PEFT: N = {peft}); tok/s = B * N / ([N + 1 tokens] - [1 token]) generate time.\n"
        "PEFT: transformers + PEFT generate(adapter_names=[per row]) on one PeftModel holding every adapter.\n"
        "base ms/step: the same engine and prompts with domain=\"base\"; overhead = ours ms/step / base ms/step "
        f"(goal <= {OVERHEAD_GOAL} at 8 experts, B = 32); ours/PEFT goal >= {PEFT_GOAL:g}x.\n"
        "% roof: (base weights + the batch's experts, in the engine dtype) / copy bandwidth / step time.\n"
        "agree: as above, ours against PEFT over the tokens both made.\n"
        "routing: time to first token of the batch; domain None = routed by the MoA directory's random routers "
        "with that strategy; vs named = TTFT / TTFT with named experts (round-robin); experts used = distinct "
        "experts the requests ended up with (any layer)."
        + ("" if has_hf else "\n--no-hf: PEFT was not run.")
    )
    print_goals(rows, has_hf)


def print_goals(rows, has_hf):
    """One line per goal: the figures it is judged on."""
    decode = [r for r in rows if r["kind"] == "decode"]
    at = [r for r in decode if r["experts"] == 8 and r["batch"] == 32]
    for r in at:
        verdict = "met" if r["overhead"] is not None and r["overhead"] <= OVERHEAD_GOAL else "NOT met"
        print(f"goal overhead <= {OVERHEAD_GOAL} at 8 experts, B = 32, {r['dtype']}: {_fmt(r['overhead'], '.3f', 'x')} "
              f"({verdict}{', NOISY' if r['noisy'] else ''})")  # fmt: skip
    if has_hf and decode:
        ratios = [r["ours_over_peft"] for r in decode if r["ours_over_peft"]]
        if ratios:
            short = sum(r < PEFT_GOAL for r in ratios)
            verdict = "met in every row" if not short else f"NOT met in {short}"
            print(f"goal ours/PEFT >= {PEFT_GOAL:g}x: {min(ratios):.1f}x to {max(ratios):.1f}x over "
                  f"{len(ratios)} rows ({verdict})")  # fmt: skip
    for r in rows:
        if r["kind"] == "routing":
            parts = [f"{label} {r['over_named'][label]:.3f}x" for label in ROUTINGS if r["over_named"].get(label)]
            print(f"routing TTFT / named TTFT, {r['dtype']}: {', '.join(parts)}")


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
            "modes": args.mode, "dtypes": args.dtype, "batches": args.mode_batches, "new_tokens": args.new_tokens,
            "moa": {
                "experts": args.experts, "rank": MOA_RANK, "alpha": MOA_ALPHA, "peft_new_tokens": args.peft_new_tokens,
                "router_experts": args.router_experts, "router_batch": ROUTER_BATCH, "routings": list(ROUTINGS),
                "router_seed": ROUTER_SEED, "adapter_cache": args.adapter_cache,
                "goals": {"overhead_at_8_experts_B32_max": OVERHEAD_GOAL, "ours_over_peft_min": PEFT_GOAL},
            },
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
            "moa decode": "rows with 'experts': ours = the engine with every expert loaded, request i naming "
            "expert e<i mod experts>; ours_base = the same engine and prompts with domain='base'; PEFT = "
            "PeftModel.generate(adapter_names=[per row]) with every adapter loaded, left padding, greedy, "
            "min_new_tokens = max_new_tokens, peft_tokens new tokens timed; all six calls interleaved per round",
            "overhead": "ours step_ms / ours_base step_ms (overhead_paired: median over rounds of the ratio of "
            "the decode times)",
            "ours_over_peft": "ours tokens_per_s / PEFT tokens_per_s (each B * its N / its decode time)",
            "moa weight_bytes": "base weights + experts in the batch * expert_bytes (LoRA A and B in the engine "
            "dtype); ours_base's roofline uses base_weight_bytes",
            "routing": "median t[generate 1 new token] of the batch on Engine(model, experts=MoA dir with random "
            "routers): domain 'base', named (round-robin), None with routing last / per_layer / vote; "
            "over_named = TTFT / named TTFT",
        },
        "copy_bandwidth": copy,
        "rows": rows,
        "total_s": elapsed,
    }


def write_plot(rows, path, title):
    """One line of panels per kind of mode. base: decode tokens/s vs batch, one panel per dtype
    (ours and HF), and a prefill panel. moa: decode tokens/s vs experts, one panel per dtype
    (ours, PEFT, ours base-only, per batch), the LoRA overhead, and the routing TTFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moa_engine._io import atomic_copy

    base = [r for r in rows if r["mode"] != "moa"]
    moa = [r for r in rows if r["mode"] == "moa"]
    lines = []
    if base:
        lines.append(("base", base, len(_dtypes(base)) + 1))
    if moa:
        lines.append(("moa", moa, len(_dtypes(moa)) + 2))
    columns = max(count for _, _, count in lines)
    fig, axes = plt.subplots(len(lines), columns, figsize=(5 * columns, 4.2 * len(lines)), squeeze=False)
    for panels, (kind, group, count) in zip(axes, lines):
        for ax in panels[count:]:
            ax.set_visible(False)
        dtypes = _dtypes(group)
        if kind == "base":
            modes = list(dict.fromkeys(r["mode"] for r in group))
            for ax, dtype in zip(panels, dtypes):
                plot_decode_panel(ax, [r for r in group if r["dtype"] == dtype], modes, dtype)
            plot_prefill_panel(panels[count - 1], group, dtypes, modes)
        else:
            for ax, dtype in zip(panels, dtypes):
                plot_moa_decode_panel(ax, [r for r in group if r["dtype"] == dtype and r["kind"] == "decode"], dtype)
            plot_overhead_panel(panels[len(dtypes)], [r for r in group if r["kind"] == "decode"])
            plot_routing_panel(panels[len(dtypes) + 1], [r for r in group if r["kind"] == "routing"])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as folder:
        scratch = os.path.join(folder, "plot.png")
        fig.savefig(scratch, dpi=110)
        atomic_copy(scratch, path)
    plt.close(fig)


def _dtypes(rows):
    return list(dict.fromkeys(r["dtype"] for r in rows))


def _experts_axis(ax, experts):
    if experts:
        ax.margins(x=0.15, y=0.12)
        ax.set_xscale("log", base=2)
        ax.set_xticks(experts, [str(e) for e in experts])
        ax.minorticks_off()
    ax.set_xlabel("distinct experts in the batch")
    ax.grid(alpha=0.3)


def plot_moa_decode_panel(ax, rows, dtype):
    """Decode tokens/s vs experts in the batch: ours and PEFT per batch, ours base-only dotted."""
    batches = sorted({r["batch"] for r in rows})
    colors = dict(zip(batches, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))
    for batch in batches:
        series = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["experts"])
        experts = [r["experts"] for r in series]
        color = colors.get(batch)
        for side, style, name in (("ours", "o-", "ours"), ("PEFT", "s--", "PEFT"), ("ours_base", ":", "ours, base")):
            values = [r.get(side, {}).get("tokens_per_s") for r in series]
            if any(v is not None for v in values):
                ax.plot(experts, [v or float("nan") for v in values], style, color=color, label=f"{name} B={batch}",
                        alpha=0.6 if side == "ours_base" else 1.0)  # fmt: skip
        for r in series:
            if r["ours_over_peft"]:
                ax.annotate(f"{r['ours_over_peft']:.1f}x", (r["experts"], r["ours"]["tokens_per_s"]),
                            textcoords="offset points", xytext=(3, 5), fontsize=7, color=color)  # fmt: skip
    _experts_axis(ax, sorted({r["experts"] for r in rows}))
    ax.set_ylim(bottom=0)
    noisy = any(r["noisy"] for r in rows)
    ax.set_title(f"MoA decode, {dtype}: ours vs PEFT (x: ours/PEFT)" + (" (NOISY)" if noisy else ""), fontsize=9)
    ax.set_ylabel("new tokens / s")
    ax.legend(fontsize=7, ncol=2)


def plot_overhead_panel(ax, rows):
    """LoRA overhead: ours step / the same engine's base-only step, vs experts in the batch."""
    for dtype in _dtypes(rows):
        for batch in sorted({r["batch"] for r in rows}):
            series = sorted((r for r in rows if (r["dtype"], r["batch"]) == (dtype, batch)), key=lambda r: r["experts"])
            if series:
                ax.plot([r["experts"] for r in series], [r["overhead"] or float("nan") for r in series], "o-",
                        label=f"{dtype} B={batch}")  # fmt: skip
    ax.axhline(OVERHEAD_GOAL, color="red", linestyle="--", linewidth=1, label=f"goal {OVERHEAD_GOAL} (8 experts, B=32)")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    _experts_axis(ax, sorted({r["experts"] for r in rows}))
    noisy = any(r["noisy"] for r in rows)
    ax.set_title("LoRA overhead: MoA step / base step, same engine" + (" (NOISY)" if noisy else ""), fontsize=9)
    ax.set_ylabel("step time ratio")
    ax.legend(fontsize=7)


def plot_routing_panel(ax, rows):
    """Time to first token per domain choice, one group per dtype; routed / named annotated."""
    labels = list(dict.fromkeys(label for r in rows for label in r["ttft"]))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [d + (i - (len(labels) - 1) / 2) * width for d in range(len(rows))]
        values = [r["ttft"][label]["ttft_ms"] if label in r["ttft"] else 0 for r in rows]
        name = label if label in ("base", "named") else f"routed, {label}"
        ax.bar(xs, values, width, label=name)
        for x, r in zip(xs, rows):
            if label not in ("base", "named") and r["over_named"].get(label) and label in r["ttft"]:
                ax.annotate(f"{r['over_named'][label]:.2f}x", (x, r["ttft"][label]["ttft_ms"]),
                            textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)  # fmt: skip
    ax.set_xticks(range(len(rows)), [f"{r['dtype']}\nB={r['batch']}, {r['experts']} experts" for r in rows], fontsize=8)
    ax.margins(y=0.15)
    noisy = any(r["noisy"] for r in rows)
    ax.set_title("routing: time to first token (x: vs named)" + (" (NOISY)" if noisy else ""), fontsize=9)
    ax.set_ylabel("ms")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)


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
    peft = f" (PEFT: N={args.peft_new_tokens})" if "moa" in args.mode and not args.no_hf else ""
    return (
        f"moa_engine vs HF transformers, {env['device_name']}, {env['threads']} threads, "
        f"N={args.new_tokens} new tokens{peft}, copy {copy['gb_per_s']:.1f} GB/s (read+write)"
    )


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--mode", nargs="+", choices=list(MODES), default=list(MODES),
        help="what the engine serves: base (the plain model), moa (LoRA experts); default both")
    add("--dtype", nargs="+", choices=list(DTYPES), default=None, help="default: both (--quick: float32)")
    add("--batches", nargs="+", type=int, default=None,
        help="decode batch sizes, every mode (default base 1 8 32, moa 16 32; --quick: base 1 8, moa 16)")
    add("--new-tokens", type=int, default=None, help="N, decode tokens timed per sequence (default 64; quick 8)")
    add("--prefill-tokens", type=int, default=None, help="prompt tokens per prefill row (default 768; quick 256)")
    add("--repeats", type=int, default=None, help="timed rounds, median taken (default 5; --quick: 1)")
    add("--warmup", type=int, default=1, help="untimed calls per variant before timing (default 1)")
    add("--budget", type=float, default=120.0,
        help=f"seconds per row after which no new round starts, once {MIN_REPEATS} are in (default 120)")
    add("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads, both sides (all)")
    add("--quick", action="store_true",
        help="smoke run: N = 8, 1 repeat, float32; base B = 1 8; moa B = 16, experts 1 4, PEFT N = 4 unwarmed (CI)")
    add("--experts", nargs="+", type=int, default=None,
        help="moa: distinct experts in the batch, round-robin (default 1 4 8 32; --quick: 1 4)")
    add("--peft-new-tokens", type=int, default=None,
        help="moa: new tokens timed per sequence for PEFT, which is slow (default 16; --quick: 4)")
    add("--router-experts", type=int, default=None,
        help="moa: experts of the routing rows' MoA dir (default 8; --quick: 4)")
    add("--adapter-cache", default=os.path.join(RESULTS_DIR, "adapters"),
        help="moa: folder of the cached random PEFT adapters and MoA dirs (default results/adapters)")
    add("--no-hf", action="store_true", help="skip the HF and PEFT baselines (no ratios to them)")
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
        parser.error(f"--warmup must be >= 0, --batches and --experts >= 1, got {args.warmup}, "
                     f"{args.batches} and {args.experts}")  # fmt: skip
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
