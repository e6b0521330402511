"""benchmarks/throughput.py: what is timed. The workload (the prompts, the same token ids for both
sides), the two sides (our engine and HF transformers / PEFT, each turning prompts into
zero-argument callables) and how each mode builds them (the models, the cached random adapters
and MoA directory)."""

import gc
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROMPT_TOKENS = (32, 64)  # each prompt's length lies in [min, max]
FORWARD_BATCH = 4  # the forward row's shape is [FORWARD_BATCH, prefill_tokens / FORWARD_BATCH]
MOA_RANK, MOA_ALPHA = 16, 32  # the experts' LoRA rank and alpha (scale alpha / r = 2), all seven projections
ROUTER_BATCH = 16  # prompts in a routing row
ROUTER_SEED = 0

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
    return max(most, ROUTER_BATCH) if any(m.startswith("moa") for m in args.mode) else most


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
        options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=self.pad_id)
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
    extra: list = field(default_factory=list)  # more runners timed beside them (GGUF modes: ours_f32)

    def runners(self):
        return [self.ours] + self.extra + ([self.hf] if self.hf is not None else [])


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


@dataclass
class MoASides:
    ours: OursRunner  # one engine with every expert loaded
    peft: PeftRunner | None  # one PeftModel with every adapter loaded
    experts: list  # the experts' names, e0 .. e<max E - 1>: request i gets experts[i % E]
    base_weight_bytes: int  # the base model's weights (Engine.weight_bytes)
    expert_bytes: int  # one expert's LoRA weights as the engine holds them (in its dtype)
    mode: str = "moa"
    engine_model: str | None = None  # what the engine serves (moa_q4_1: the Q4_1 file), else model_path


def quantized_base(args):
    """The Q4_1 GGUF file that the q4_1 and moa_q4_1 modes serve: --model when it is a .gguf,
    else the default model's shipped file."""
    from moa_engine.models import default_gguf_path

    if args.model is not None and str(args.model).lower().endswith(".gguf"):
        return os.path.abspath(args.model)
    return str(default_gguf_path())


def moa_mode(model_path, dtype, workload, args, mode="moa"):
    """The engine with max(--experts) PEFT LoRA experts; PEFT (float) with the same adapters.
    mode moa_q4_1: the engine serves the Q4_1 GGUF file natively, the experts in float."""
    import moa_engine

    adapters = ensure_adapters(model_path, max(args.experts), args)  # {name: PEFT folder}
    engine_model = quantized_base(args) if mode == "moa_q4_1" else str(model_path)
    started = time.perf_counter()
    engine = moa_engine.Engine(
        engine_model,
        experts=adapters,
        dtype=dtype,
        device=args.device,
        max_batch=max(args.mode_batches[mode]),
        max_seq_len=workload.longest_prompt + max(args.new_tokens, args.peft_new_tokens) + 1,
        max_prefill_tokens=max(4096, sum(map(len, workload.decode_prompts))),
    )
    print(f"  {mode} {dtype}: engine with {len(adapters)} experts loaded in {time.perf_counter() - started:.1f} s")
    peft = None
    if not args.no_hf:
        started = time.perf_counter()
        model = load_peft_model(model_path, dtype, adapters, args)
        peft = PeftRunner(model, hf_pad_id(model, engine))
        print(
            f"  {mode} {dtype}: PeftModel with {len(adapters)} adapters loaded in {time.perf_counter() - started:.1f} s"
        )
    element = torch.empty((), dtype=DTYPES[dtype]).element_size()
    expert_bytes = lora_parameters(next(iter(adapters.values()))) * element
    return MoASides(OursRunner(engine), peft, list(adapters), engine.weight_bytes, expert_bytes, mode, engine_model)


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
