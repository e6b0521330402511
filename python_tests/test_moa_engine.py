"""moa_engine.Engine with Mixture-of-LoRAs experts, against PEFT and a plain-torch routing reference.

- Fidelity: Engine.forward with a named expert equals PeftModel.from_pretrained(base, expert) to
  float32 rounding on every tiny architecture and on the default model, with experts of several
  ranks, alphas, rslora, rank/alpha patterns and module subsets loaded together in one engine.
- Mixed batches: experts and "base" in one batch give each sequence the tokens it gets alone
  (and PEFT's), also with fewer KV-cache slots than prompts.
- Routing: per_layer, last and vote decisions, router probabilities, logits and tokens equal
  RoutedPeft, a reference that runs PEFT with every expert loaded and, from a forward hook on
  each decoder layer's input_layernorm, pools the normed input (float32 mean over the tokens),
  scores it with the layer's router and switches that layer's LoRA modules to the choice.
- Hot changes: experts added and removed while requests are in flight (moa_engine._C.Engine
  submit / step).

Dimensions: B batch, T tokens, V vocabulary, L decoder layers, D router domains, H hidden size.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from tiny_models import VARIANTS, tiny_dirs  # noqa: F401  (fixture)

import moa_engine
from moa_engine import _C, models
from moa_engine.moa_format import (
    TARGET_MODULES,
    MoAConfig,
    MoADir,
    RouterConfig,
    load_router,
)
from moa_engine.testing import make_random_peft_adapter

ARCHS = list(VARIANTS)
FLOAT32_REL_TOL = 1e-4  # max |engine - reference| / max |reference|
PROB_TOL = 1e-4  # router probabilities, absolute
MAX_SEQ_LEN = 96

# Adapters loaded together in one engine: ranks 2-16, several alphas, rslora, rank and alpha
# patterns, module subsets and a layer subset. init_scale keeps each expert's effect clear
# (several % of the logits) without swamping the base model.
ADAPTERS = {
    "r4": dict(r=4, alpha=8),
    "r16_rslora": dict(r=16, alpha=6, use_rslora=True),
    "attn_r8": dict(r=8, alpha=32, target_modules=["q_proj", "v_proj", "o_proj"]),
    "mlp_patterns": dict(
        r=6,
        alpha=12,
        target_modules=["k_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"k_proj": 2, "down_proj": 12},
        alpha_pattern={"gate_proj": 3},
        layers_to_transform=[1],
    ),
}


# ---------------------------------------------------------------------------------------------
# HF / PEFT references
# ---------------------------------------------------------------------------------------------


def hf_model(folder, **kwargs):
    """A fresh float32 HF model (PEFT modifies the model it wraps, so nothing is shared)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()


def peft_model(folder, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_model(folder, attn_implementation="eager"), str(adapter_dir)).eval()


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def greedy(model, prompt, n):
    """HF greedy generation of exactly n tokens (no EOS stop) for one unpadded prompt."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    tokens = out[0, len(prompt) :].tolist()
    assert len(tokens) == n, f"HF stopped after {len(tokens)} of {n} tokens"
    return tokens


def relative_error(got, ref):
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


def random_prompts(gen, vocab, lengths):
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def summary(domains):
    """Completion.domain for a list of per-layer domains."""
    return domains[0] if len(set(domains)) == 1 else "mixed"


def decide(choices, strategy):
    """The experts per layer that serve a request, from the per-layer routing pass's choices."""
    if strategy == "per_layer":
        return list(choices)
    if strategy == "last":
        return [choices[-1]] * len(choices)
    votes = Counter(choices)
    best = max(votes.values())
    # A tie goes to the domain chosen at the latest layer.
    winner = next(c for c in reversed(choices) if votes[c] == best)
    return [winner] * len(choices)


class RoutedPeft:
    """The routing reference: PEFT with every expert loaded as a named adapter.

    A forward hook on each decoder layer's input_layernorm sees the layer's normed input; when
    recording it keeps the float32 mean over the prompt's tokens (batch 1) and, given a router,
    probs = softmax(router[l] @ pooled). When routing it also switches layer l's LoRA modules to
    argmax over the loaded domains, before the layer's projections run.
    """

    def __init__(self, folder, experts: dict, router=None, domains=None):
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        names = list(experts)
        model = PeftModel.from_pretrained(
            hf_model(folder, attn_implementation="eager"), str(experts[names[0]]), adapter_name=names[0]
        )
        for name in names[1:]:
            model.load_adapter(str(experts[name]), adapter_name=name)
        self.model = model.eval()
        layers = model.base_model.model.model.layers
        self.lora = [[m for m in layer.modules() if isinstance(m, LoraLayer)] for layer in layers]
        self.n_layers = len(layers)
        self.router, self.domains = router, domains
        self.loaded = set(names)
        self.mode = None  # None: hooks idle; "record"; "route"
        self.pooled, self.probs, self.choices = {}, {}, {}
        for l, layer in enumerate(layers):
            layer.input_layernorm.register_forward_hook(self._hook(l))

    def _hook(self, l):
        def hook(module, args, out):
            if self.mode is None:
                return
            pooled = out[0].float().mean(0)  # [H]
            self.pooled[l] = pooled
            if self.router is None:
                return
            probs = torch.softmax(self.router[l].float() @ pooled, 0)  # [D]
            self.probs[l] = probs
            if self.mode == "route":
                loaded = [i for i, d in enumerate(self.domains) if d in self.loaded]
                choice = self.domains[max(loaded, key=lambda i: probs[i])] if loaded else "base"
                self.choices[l] = choice
                self.set_layer(l, choice)

        return hook

    def set_layer(self, l, domain):
        for m in self.lora[l]:
            m.set_adapter([] if domain == "base" else domain)

    def run(self, prompt, layer_domains=None):
        """Logits [T, V] for one prompt: routed per layer (layer_domains None) or with the
        given expert per layer. Records pooled inputs and probs (and the choices when routed)."""
        self.pooled, self.probs, self.choices = {}, {}, {}
        if layer_domains is not None:
            for l, d in enumerate(layer_domains):
                self.set_layer(l, d)
        self.mode = "route" if layer_domains is None else "record"
        try:
            logits = logits_of(self.model, torch.tensor([prompt]))[0]
        finally:
            self.mode = None
        return logits

    def route(self, prompt, strategy):
        """(layer_domains, probs [L][D], logits [T, V]) as the engine should serve the prompt."""
        logits = self.run(prompt)
        choices = [self.choices[l] for l in range(self.n_layers)]
        probs = [self.probs[l].tolist() for l in range(self.n_layers)]
        layer_domains = decide(choices, strategy)
        if strategy != "per_layer":
            logits = self.run(prompt, layer_domains)
        return layer_domains, probs, logits

    def margins(self):
        """Per layer of the last routed run, the gap between the two best loaded domains' probs."""
        out = []
        for l in range(self.n_layers):
            p = sorted((float(self.probs[l][i]) for i, d in enumerate(self.domains) if d in self.loaded), reverse=True)
            out.append(p[0] - p[1] if len(p) > 1 else 1.0)
        return out

    def generate(self, prompt, layer_domains, n):
        for l, d in enumerate(layer_domains):
            self.set_layer(l, d)
        return greedy(self.model, prompt, n)


def make_request(prompt, domain, max_new_tokens=12):
    """A low-level greedy request (moa_engine._C.GenerationRequest) that ignores EOS."""
    r = _C.GenerationRequest()
    r.prompt = list(prompt)
    r.max_new_tokens = max_new_tokens
    r.ignore_eos = True
    r.domain = domain
    return r


def assert_probs_close(got, ref, what):
    got, ref = torch.tensor(got, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    assert got.shape == ref.shape, f"{what}: router_probs shape {list(got.shape)} != {list(ref.shape)}"
    err = float((got - ref).abs().max())
    assert err <= PROB_TOL, f"{what}: router_probs differ by {err:.2e}\n got {got}\n ref {ref}"


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on the 2 shared cores these tests run on, parallel regions of a
    tiny model spend most of their time waiting for a descheduled thread (~100 ms a step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_dirs, tmp_path_factory):
    """adapter_dirs(arch) -> {ADAPTERS key: PEFT folder} made by real PEFT on the variant (cached)."""
    root = tmp_path_factory.mktemp("moa_adapters")
    cache = {}

    def get(arch):
        if arch not in cache:
            base = hf_model(tiny_dirs[arch])
            cache[arch] = {
                key: make_random_peft_adapter(
                    base,
                    root / arch / key,
                    r=spec["r"],
                    alpha=spec["alpha"],
                    target_modules=spec.get("target_modules", TARGET_MODULES),
                    seed=100 + k,
                    init_scale=0.5,
                    **{o: v for o, v in spec.items() if o not in ("r", "alpha", "target_modules")},
                )
                for k, (key, spec) in enumerate(ADAPTERS.items())
            }
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def llama(tiny_dirs, adapter_dirs):
    """(llama_gqa's folder, {A, B, C: PEFT folders}): ranks 4, 8 (attention only) and 16 (rslora)."""
    folder = tiny_dirs["llama_gqa"]
    dirs = adapter_dirs("llama_gqa")
    experts = {"A": dirs["r4"], "B": dirs["attn_r8"], "C": dirs["r16_rslora"]}
    return folder, experts


# ---------------------------------------------------------------------------------------------
# Fidelity against PEFT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_with_each_expert_matches_peft(arch, tiny_dirs, adapter_dirs, gen):
    folder, dirs = tiny_dirs[arch], adapter_dirs(arch)
    engine = moa_engine.Engine(folder, experts=dirs, max_batch=2, max_seq_len=MAX_SEQ_LEN)
    assert engine.experts == list(dirs) and engine.router_domains == []
    vocab = VARIANTS[arch][1]["vocab_size"]
    ids = torch.randint(0, vocab, (3, 21), generator=gen)  # longer than mistral's window of 8

    base = logits_of(hf_model(folder, attn_implementation="eager"), ids)
    assert relative_error(engine.forward(ids, domain="base"), base) <= FLOAT32_REL_TOL
    refs = {}
    for name, path in dirs.items():
        refs[name] = logits_of(peft_model(folder, path), ids)
        err = relative_error(engine.forward(ids, domain=name), refs[name])
        assert err <= FLOAT32_REL_TOL, f"{arch}, expert {name}: relative error {err:.2e} against PEFT"
        assert relative_error(base, refs[name]) > 0.02, f"expert {name} barely changes the model: a weak test"

    # One forward mixing every expert and the base model, one row each.
    names = ["mlp_patterns", "base", "r4", "attn_r8", "r16_rslora"]
    rows = torch.randint(0, vocab, (len(names), 17), generator=gen)
    got = engine.forward(rows, domain=names)
    for b, name in enumerate(names):
        model = hf_model(folder, attn_implementation="eager") if name == "base" else peft_model(folder, dirs[name])
        ref = logits_of(model, rows[b : b + 1])[0]
        err = relative_error(got[b], ref)
        assert err <= FLOAT32_REL_TOL, f"{arch}, row {b} ({name}) of a mixed forward: relative error {err:.2e}"


def test_default_model_expert_matches_peft(tmp_path, gen):
    """SmolLM2-135M-Instruct (30 layers, hidden 576) with a rank-8 expert on every target module."""
    from peft import PeftModel

    engine = moa_engine.Engine(max_batch=1, max_seq_len=64)  # its Q4_1 file
    hf = hf_model(models.default_model_dir(progress=False))  # the same weights in float32
    adapter = make_random_peft_adapter(hf, tmp_path / "smol_r8", r=8, alpha=16, seed=7, init_scale=0.05)
    engine.add_expert("tuned", adapter)
    assert engine.experts == ["tuned"]
    ids = torch.randint(0, engine.config["vocab_size"], (2, 24), generator=gen)
    peft = PeftModel.from_pretrained(hf, str(adapter)).eval()
    ref = logits_of(peft, ids)
    with peft.disable_adapter():
        base = logits_of(peft, ids)
    err = relative_error(engine.forward(ids, domain="tuned"), ref)
    assert err <= FLOAT32_REL_TOL, f"default model + rank-8 expert: relative error {err:.2e} against PEFT"
    assert relative_error(base, ref) > 1e-2, "the expert barely changes the model: a weak test"
    assert relative_error(engine.forward(ids, domain="base"), base) <= FLOAT32_REL_TOL


# ---------------------------------------------------------------------------------------------
# Mixed batches
# ---------------------------------------------------------------------------------------------

NEW_TOKENS = 16


@pytest.mark.parametrize("max_batch", [8, 2], ids=["one_batch", "continuous"])
def test_mixed_batch_equals_each_sequence_alone(max_batch, llama, gen):
    folder, experts = llama
    engine = moa_engine.Engine(folder, experts=experts, max_batch=max_batch, max_seq_len=MAX_SEQ_LEN)
    domains = ["A", "B", "base", "C", "A", "base", "C"]
    prompts = random_prompts(gen, 517, [9, 4, 13, 1, 7, 21, 11])
    batch = engine.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True, domain=domains)
    for i, (c, d) in enumerate(zip(batch, domains)):
        assert (c.domain, c.layer_domains, c.router_probs) == (d, [d] * 3, None), f"prompt {i}"
        assert len(c.token_ids) == NEW_TOKENS and c.finish_reason == "length"
        [alone] = engine.generate([prompts[i]], max_new_tokens=NEW_TOKENS, ignore_eos=True, domain=d)
        assert c.token_ids == alone.token_ids, f"prompt {i} ({d}): batched tokens differ from alone"
    # The experts do change the output: the same prompt under each domain.
    outs = {
        d: engine.generate([prompts[0]], max_new_tokens=NEW_TOKENS, ignore_eos=True, domain=d)[0].token_ids
        for d in ("A", "B", "C", "base")
    }
    assert len({tuple(t) for t in outs.values()}) == 4, f"experts give identical tokens: {outs}"
    if max_batch == 8:  # PEFT's greedy generation for one sequence of each expert and the base
        for i in (0, 1, 2, 3):
            model = peft_model(folder, experts[domains[i]]) if domains[i] != "base" else hf_model(folder)
            assert batch[i].token_ids == greedy(model, prompts[i], NEW_TOKENS), f"prompt {i} ({domains[i]}) vs PEFT"


# ---------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------

DOMAINS = ["code", "math", "law"]
STRATEGIES = ["per_layer", "last", "vote"]
C, M, W = DOMAINS  # short names for the tables below

# The designed router makes each prompt choose these domains per layer (per_layer routing),
# with a clear margin: router logits 8 for the choice, 4 for the next domain in DOMAINS order
# (cyclically), 0 for the third.
DESIGNED = [  # (prompt length, choices per layer)
    (12, [C, C, C]),
    (12, [M, M, W]),
    (12, [C, M, W]),
    (7, [W, C, W]),
    (19, [W, M, M]),
    (12, [W, W, C]),
]
# What each strategy serves for each designed prompt (hand-written, so the test states the rules).
EXPECTED = {
    "per_layer": [[C, C, C], [M, M, W], [C, M, W], [W, C, W], [W, M, M], [W, W, C]],
    "last": [[C] * 3, [W] * 3, [W] * 3, [W] * 3, [M] * 3, [C] * 3],
    # The majority; a three-way tie goes to the later layer's choice (law in prompt 2).
    "vote": [[C] * 3, [M] * 3, [W] * 3, [W] * 3, [M] * 3, [W] * 3],
}
EQUAL_LENGTH = [0, 1, 2, 5]  # designed prompts of length 12, for forward()


def designed_router(ref, prompts, patterns, scale=8.0):
    """Per layer a [D, H] router whose logits on prompt i, with the layers before routed as
    patterns[i], are `scale` for patterns[i][l], scale / 2 for the next domain, 0 otherwise.
    Solved in float64 with the minimum norm: R_l = (pinv(pooled_l) @ targets_l)^T."""
    pooled = defaultdict(list)
    for prompt, pattern in zip(prompts, patterns):
        ref.run(prompt, pattern)
        for l in range(ref.n_layers):
            pooled[l].append(ref.pooled[l].double())
    router = []
    for l in range(ref.n_layers):
        P = torch.stack(pooled[l])  # [n, H]
        target = torch.zeros(len(prompts), len(DOMAINS), dtype=torch.float64)  # [n, D]
        for i, pattern in enumerate(patterns):
            d = DOMAINS.index(pattern[l])
            target[i, d] = scale
            target[i, (d + 1) % len(DOMAINS)] = scale / 2
        router.append((torch.linalg.pinv(P) @ target).T.float().contiguous())  # [D, H]
    return router


def save_moa_dir(path, base_folder, experts, router, strategy="last"):
    """A MoA directory naming the base model by a path relative to itself."""
    base = os.path.relpath(base_folder, path)
    config = MoAConfig(base_model=base, domains=list(experts), router=RouterConfig(strategy=strategy))
    return MoADir.save(path, config, experts=experts, router=router)


@pytest.fixture(scope="module")
def routing(tiny_dirs, adapter_dirs, tmp_path_factory):
    """llama_gqa with experts code / math / law, the designed prompts, a MoA dir with the
    designed router (strategy "vote"), and its reference."""
    folder = tiny_dirs["llama_gqa"]
    dirs = adapter_dirs("llama_gqa")
    experts = {C: dirs["r4"], M: dirs["r16_rslora"], W: dirs["attn_r8"]}
    gen = torch.Generator().manual_seed(1234)
    prompts = random_prompts(gen, 517, [n for n, _ in DESIGNED])
    ref = RoutedPeft(folder, experts, domains=DOMAINS)
    router = designed_router(ref, prompts, [p for _, p in DESIGNED])
    moa_dir = save_moa_dir(tmp_path_factory.mktemp("moa") / "designed", folder, experts, router, strategy="vote")
    ref.router = load_router(moa_dir / "router.safetensors")  # the float32 routers as saved
    return dict(folder=folder, experts=experts, prompts=prompts, ref=ref, moa_dir=moa_dir)


def test_moa_dir_loads_experts_router_and_base_model(routing):
    engine = moa_engine.Engine(experts=routing["moa_dir"], max_seq_len=MAX_SEQ_LEN)
    assert engine.model_path.resolve() == Path(routing["folder"]).resolve()  # relative base_model
    assert engine.experts == DOMAINS and engine.router_domains == DOMAINS
    # The directory's strategy (vote) serves requests that name none.
    out = engine.generate(routing["prompts"], max_new_tokens=3, ignore_eos=True)
    assert [c.layer_domains for c in out] == EXPECTED["vote"]


def test_designed_router_reference_takes_the_designed_choices(routing):
    """The reference itself routes as designed, with the probabilities the router was solved for."""
    ref = routing["ref"]
    target = torch.softmax(torch.tensor([8.0, 4.0, 0.0]), 0)
    for prompt, (_, pattern) in zip(routing["prompts"], DESIGNED):
        layer_domains, probs, _ = ref.route(prompt, "per_layer")
        assert layer_domains == pattern
        for l, d in enumerate(pattern):
            i = DOMAINS.index(d)
            order = [i, (i + 1) % 3, (i + 2) % 3]
            assert torch.allclose(torch.tensor(probs[l])[order], target, atol=1e-3)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_generate_routes_as_the_reference(strategy, routing):
    engine = moa_engine.Engine(experts=routing["moa_dir"], max_batch=8, max_seq_len=MAX_SEQ_LEN)
    ref, prompts = routing["ref"], routing["prompts"]
    out = engine.generate(prompts, max_new_tokens=8, ignore_eos=True, routing=strategy)
    for i, (c, prompt) in enumerate(zip(out, prompts)):
        layer_domains, probs, _ = ref.route(prompt, strategy)
        assert layer_domains == EXPECTED[strategy][i], f"prompt {i}: the reference disagrees with the table"
        assert c.layer_domains == layer_domains, f"prompt {i} ({strategy})"
        assert c.domain == summary(layer_domains), f"prompt {i} ({strategy})"
        assert_probs_close(c.router_probs, probs, f"prompt {i} ({strategy})")
        assert c.token_ids == ref.generate(prompt, layer_domains, 8), f"prompt {i} ({strategy}): tokens"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_forward_routes_as_the_reference(strategy, routing):
    """forward() routes each row over all its tokens, with the engine's strategy."""
    engine = moa_engine.Engine(experts=routing["moa_dir"], max_seq_len=MAX_SEQ_LEN, routing=strategy)
    ref = routing["ref"]
    rows = [routing["prompts"][i] for i in EQUAL_LENGTH]
    logits, infos = engine.forward(torch.tensor(rows), return_routing=True)
    assert logits.shape == (len(rows), 12, 517) and len(infos) == len(rows)
    for row, (i, info) in enumerate(zip(EQUAL_LENGTH, infos)):
        layer_domains, probs, ref_logits = ref.route(rows[row], strategy)
        assert list(info.layer_domains) == layer_domains == EXPECTED[strategy][i], f"row {row} ({strategy})"
        assert info.domain == summary(layer_domains)
        assert_probs_close(info.router_probs, probs, f"row {row} ({strategy})")
        err = relative_error(logits[row], ref_logits)
        assert err <= FLOAT32_REL_TOL, f"row {row} ({strategy}): logits relative error {err:.2e}"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_forward_takes_the_strategy_per_call(strategy, routing):
    """forward(routing=...) overrides the engine's strategy (the MoA dir's "vote") for that call
    only; the three strategies route these prompts differently, so a call that ignored the
    argument would fail for two of them."""
    engine = moa_engine.Engine(experts=routing["moa_dir"], max_seq_len=MAX_SEQ_LEN)
    ref = routing["ref"]
    rows = [routing["prompts"][i] for i in EQUAL_LENGTH]
    route_len = [5, 12, 9, 7]  # routed over a prefix, as evaluation routes over the prompt
    for _ in range(2):  # the second call checks the first left the engine's strategy alone
        logits, infos = engine.forward(torch.tensor(rows), return_routing=True, route_len=route_len, routing=strategy)
        for row, n in enumerate(route_len):
            layer_domains, probs, _ = ref.route(rows[row][:n], strategy)
            assert list(infos[row].layer_domains) == layer_domains, f"row {row} ({strategy})"
            assert_probs_close(infos[row].router_probs, probs, f"row {row} ({strategy})")
            if strategy == "per_layer":  # the route_len tokens pool, the rest follow per layer
                continue
            err = relative_error(logits[row], ref.run(rows[row], layer_domains))
            assert err <= FLOAT32_REL_TOL, f"row {row} ({strategy}): logits relative error {err:.2e}"
        _, default = engine.forward(torch.tensor(rows), return_routing=True, route_len=route_len)
        for row, n in enumerate(route_len):
            assert list(default[row].layer_domains) == ref.route(rows[row][:n], "vote")[0], f"row {row}: default"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_route_alone_chooses_as_the_reference(strategy, routing):
    """Engine.route gives, for prompts of any lengths, the choices and probabilities of the
    reference's routing, and the same as generate() reports for those prompts; a small
    max_prefill_tokens splits the prompts into several routing passes without changing them."""
    ref, prompts = routing["ref"], routing["prompts"]
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    extra = [
        torch.randint(0, 517, (int(n),), generator=gen).tolist() for n in torch.randint(1, 20, (5,), generator=gen)
    ]
    for max_prefill in (4096, 13):
        engine = moa_engine.Engine(experts=routing["moa_dir"], max_seq_len=MAX_SEQ_LEN, max_prefill_tokens=max_prefill)
        infos = engine.route(prompts + extra, routing=strategy)
        assert len(infos) == len(prompts) + len(extra)
        for i, (p, info) in enumerate(zip(prompts + extra, infos)):
            layer_domains, probs, _ = ref.route(list(p), strategy)
            if i < len(prompts):
                assert layer_domains == EXPECTED[strategy][i]
            assert_probs_close(info.router_probs, probs, f"prompt {i} ({strategy})")
            if i < len(prompts):  # designed to route clearly (random ones may be near a tie)
                assert list(info.layer_domains) == layer_domains and info.domain == summary(layer_domains), (
                    f"prompt {i}"
                )
    served = engine.generate(prompts, max_new_tokens=1, ignore_eos=True, routing=strategy)
    assert [c.layer_domains for c in served] == [list(r.layer_domains) for r in infos[: len(prompts)]]
    # evaluation.routing_accuracy reads every strategy off one per_layer pass: the same choice
    from moa_engine.evaluation import _collapse

    per_layer = engine.route(prompts + extra, routing="per_layer")
    for i, (a, b) in enumerate(zip(per_layer, infos)):
        want = (
            list(a.layer_domains)
            if strategy == "per_layer"
            else [_collapse(list(a.layer_domains), strategy)] * len(a.layer_domains)
        )
        assert list(b.layer_domains) == want, f"prompt {i} ({strategy})"


def test_route_errors(routing, tiny_dirs):
    engine = moa_engine.Engine(experts=routing["moa_dir"], max_seq_len=MAX_SEQ_LEN)
    with pytest.raises(ValueError, match=r"routing strategy 'majority' is not one of per_layer, last, vote"):
        engine.route([[1, 2]], routing="majority")
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.route([[1, 2], []])
    with pytest.raises(ValueError, match="token id 517 is not in"):
        engine.route([[1, 2], [3, 517]])
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        engine.route([[1] * (MAX_SEQ_LEN + 1)])
    with pytest.raises(ValueError, match="prompts is empty"):
        engine.route([])
    base = moa_engine.Engine(tiny_dirs["llama_gqa"], max_seq_len=MAX_SEQ_LEN)
    with pytest.raises(ValueError, match="route: the engine has no router"):
        base.route([[1, 2]])


def test_forward_routing_errors(routing, tiny_dirs):
    engine = moa_engine.Engine(experts=routing["moa_dir"], max_seq_len=MAX_SEQ_LEN)
    rows = torch.tensor([routing["prompts"][i] for i in EQUAL_LENGTH])
    with pytest.raises(ValueError, match=r"routing strategy 'majority' is not one of per_layer, last, vote"):
        engine.forward(rows, routing="majority")
    with pytest.raises(ValueError, match="routing: expected a strategy name"):
        engine.forward(rows, routing=1)
    base = moa_engine.Engine(tiny_dirs["llama_gqa"], max_seq_len=MAX_SEQ_LEN)
    with pytest.raises(ValueError, match="engine has no router"):
        base.forward(rows, routing="last")


def test_evaluation_scores_each_strategy_as_it_routes(routing):
    """evaluation.perplexity in a strategy mode serves every record with that strategy (it once
    ran the engine's own for all three): its per-record NLL is the reference's under the
    strategy's routing, and its router accuracy counts the strategy's choices."""
    from moa_engine.evaluation import _Item, perplexity

    engine = moa_engine.Engine(experts=routing["moa_dir"], max_seq_len=MAX_SEQ_LEN)
    ref = routing["ref"]
    prompts = routing["prompts"]
    labels = [C, M, W, W, M, C]
    items = [_Item(list(p), [False] + [True] * (len(p) - 1), len(p), d, None) for p, d in zip(prompts, labels)]
    seen = {}
    for strategy in STRATEGIES:
        res = perplexity(engine, items, strategy, batch=4)
        hits, total = Counter(), Counter()
        for i, (p, d) in enumerate(zip(prompts, labels)):
            layer_domains, _, ref_logits = ref.route(list(p), strategy)
            logp = torch.log_softmax(torch.as_tensor(ref_logits, dtype=torch.float64), -1)
            nll = -float(logp[torch.arange(len(p) - 1), torch.tensor(p[1:])].sum())
            k = labels[:i].count(d)  # its place among its domain's records
            assert res["records"][d]["nll"][k] == pytest.approx(nll, rel=1e-4), f"prompt {i} ({strategy})"
            if strategy == "per_layer":
                hits[d] += sum(x == d for x in layer_domains)
                total[d] += len(layer_domains)
            else:
                hits[d] += summary(layer_domains) == d
                total[d] += 1
        assert res["router_accuracy"] == {d: hits[d] / total[d] for d in total}, strategy
        seen[strategy] = res["records"]
    assert seen["last"] != seen["vote"] != seen["per_layer"], "the strategies scored alike: a weak test"


def test_forward_mixes_routed_named_and_base_rows(routing):
    engine = moa_engine.Engine(experts=routing["moa_dir"], max_seq_len=MAX_SEQ_LEN, routing="per_layer")
    ref = routing["ref"]
    rows = [routing["prompts"][i] for i in EQUAL_LENGTH]
    domains = [None, M, "base", None]
    logits, infos = engine.forward(torch.tensor(rows), domain=domains, return_routing=True)
    for row, d in enumerate(domains):
        if d is None:
            layer_domains, probs, ref_logits = ref.route(rows[row], "per_layer")
            assert_probs_close(info_probs := infos[row].router_probs, probs, f"row {row}")
            assert len(info_probs) == 3
        else:
            layer_domains, ref_logits = [d] * 3, ref.run(rows[row], [d] * 3)
            assert not infos[row].router_probs, f"row {row} named {d!r} but reports router probabilities"
        assert list(infos[row].layer_domains) == layer_domains and infos[row].domain == summary(layer_domains)
        err = relative_error(logits[row], ref_logits)
        assert err <= FLOAT32_REL_TOL, f"row {row} ({d}): logits relative error {err:.2e}"


@pytest.mark.parametrize("max_batch", [8, 2], ids=["one_batch", "continuous"])
def test_generate_mixes_routed_named_and_base_requests(max_batch, routing):
    """One batch of requests naming experts, naming "base" and routed with each strategy
    (per-request strategies through the low-level request's .routing)."""
    engine = moa_engine.Engine(experts=routing["moa_dir"], max_batch=max_batch, max_seq_len=MAX_SEQ_LEN)
    ref, prompts = routing["ref"], routing["prompts"]
    # (designed prompt, domain, routing); prompt 0 routes to code in every layer.
    plan = [
        (1, "", "per_layer"),
        (0, W, ""),
        (2, "base", ""),
        (0, "", "last"),
        (4, M, ""),
        (5, "", "vote"),
        (0, C, ""),
        (3, "", "per_layer"),
        (1, "", "vote"),
        (2, "", "last"),
    ]

    def requests(entries):
        out = []
        for i, domain, strategy in entries:
            r = make_request(prompts[i], domain, 10)
            r.routing = strategy
            out.append(r)
        return out

    batch = engine._core.generate(requests(plan))
    for k, ((i, d, strategy), r) in enumerate(zip(plan, batch)):
        [alone] = engine._core.generate(requests([(i, d, strategy)]))
        assert r.token_ids == alone.token_ids, f"request {k}: batched tokens differ from alone"
        if d == "":
            layer_domains, probs, _ = ref.route(prompts[i], strategy)
            assert layer_domains == EXPECTED[strategy][i]
            assert_probs_close(r.routing.router_probs, probs, f"request {k}")
        else:
            layer_domains = [d] * 3
            assert not r.routing.router_probs, f"request {k} named {d!r} but reports router probabilities"
        assert list(r.routing.layer_domains) == layer_domains, f"request {k}"
        assert r.routing.domain == summary(layer_domains), f"request {k}"
        if k in (0, 1, 2, 3):
            assert r.token_ids == ref.generate(prompts[i], layer_domains, 10), f"request {k}: tokens vs reference"
    # Routed to code in every layer is served exactly as naming code.
    assert batch[3].token_ids == batch[6].token_ids

    # The Python face: domain None / a name / "base" in one call; Completion fields.
    out = engine.generate(
        [prompts[1], prompts[4], prompts[2]],
        max_new_tokens=10,
        ignore_eos=True,
        domain=[None, M, "base"],
        routing="per_layer",
    )
    assert [c.token_ids for c in out] == [batch[0].token_ids, batch[4].token_ids, batch[2].token_ids]
    assert [c.domain for c in out] == ["mixed", M, "base"]
    assert out[0].layer_domains == EXPECTED["per_layer"][1] and len(out[0].router_probs) == 3
    assert out[1].router_probs is None and out[2].router_probs is None


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_random_router_probabilities_and_decisions(strategy, routing, tmp_path, gen):
    """A random router: probabilities to 1e-4 and the decisions of prompts whose reference
    margins are clear (>= 2e-3) equal the reference's; some prompts end mixed."""
    ref = routing["ref"]
    H = 96
    # Scale the router so logits spread by a few units on these pooled inputs.
    ref.run(routing["prompts"][0], [C, C, C])
    scale = 3.0 / float(torch.stack([ref.pooled[l] for l in range(3)]).norm(dim=1).mean())
    router = [torch.randn(len(DOMAINS), H, generator=gen) * scale for _ in range(3)]
    moa_dir = save_moa_dir(tmp_path / "random", routing["folder"], routing["experts"], router)
    saved = load_router(moa_dir / "router.safetensors")
    engine = moa_engine.Engine(experts=moa_dir, max_batch=4, max_seq_len=MAX_SEQ_LEN, routing=strategy)

    designed_router_of_ref = ref.router
    ref.router = saved
    try:
        candidates = random_prompts(gen, 517, [15] * 10)
        clear, references = [], []
        for prompt in candidates:
            references.append(ref.route(prompt, strategy))
            if min(ref.margins()) >= 2e-3:
                clear.append(len(references) - 1)
        assert len(clear) >= 4, f"only {len(clear)} of 10 random prompts route clearly: pick another seed"
        out = engine.generate(candidates, max_new_tokens=4, ignore_eos=True)
        logits, infos = engine.forward(torch.tensor(candidates), return_routing=True)
        for i in range(len(candidates)):
            layer_domains, probs, ref_logits = references[i]
            assert_probs_close(out[i].router_probs, probs, f"prompt {i} ({strategy}), generate")
            assert_probs_close(infos[i].router_probs, probs, f"prompt {i} ({strategy}), forward")
            if i in clear:
                assert out[i].layer_domains == layer_domains == list(infos[i].layer_domains), f"prompt {i}"
                assert out[i].domain == infos[i].domain == summary(layer_domains)
                assert out[i].token_ids == ref.generate(candidates[i], layer_domains, 4), f"prompt {i}: tokens"
                assert relative_error(logits[i], ref_logits) <= FLOAT32_REL_TOL, f"prompt {i}: logits"
        if strategy == "per_layer":
            assert any(out[i].domain == "mixed" for i in clear), "no random prompt routes mixed: a weak test"
    finally:
        ref.router = designed_router_of_ref


def test_routers_choose_among_loaded_experts_only(routing):
    """Removing law: layers that would choose it take their next-best loaded domain; added back,
    it is chosen again; with no expert loaded, routed requests run the base model."""
    engine = moa_engine.Engine(experts=routing["moa_dir"], max_seq_len=MAX_SEQ_LEN, routing="per_layer")
    ref, prompts = routing["ref"], routing["prompts"]
    # Prompts 1 and 2 choose law in the last layer only; there the next domain is code.
    subset = [prompts[i] for i in (0, 1, 2)]
    expected = {"all": [[C, C, C], [M, M, W], [C, M, W]], "no_law": [[C, C, C], [M, M, C], [C, M, C]]}

    def check(case, loaded):
        ref.loaded = set(loaded)
        try:
            out = engine.generate(subset, max_new_tokens=5, ignore_eos=True)
            for i, (c, prompt) in enumerate(zip(out, subset)):
                layer_domains, probs, _ = ref.route(prompt, "per_layer")
                if case in expected:
                    assert layer_domains == expected[case][i]
                assert c.layer_domains == layer_domains, f"{case}, prompt {i}"
                assert c.domain == summary(layer_domains)
                assert_probs_close(c.router_probs, probs, f"{case}, prompt {i}")  # over all router domains
                assert c.token_ids == ref.generate(prompt, layer_domains, 5), f"{case}, prompt {i}: tokens"
        finally:
            ref.loaded = set(DOMAINS)

    check("all", DOMAINS)
    engine.remove_expert(W)
    assert engine.experts == [C, M] and engine.router_domains == DOMAINS
    check("no_law", [C, M])
    engine.add_expert(W, routing["experts"][W])
    check("all", DOMAINS)
    for d in DOMAINS:
        engine.remove_expert(d)
    out = engine.generate(subset, max_new_tokens=5, ignore_eos=True)
    for c, prompt in zip(out, subset):
        assert c.domain == "base" and c.layer_domains == ["base"] * 3 and len(c.router_probs) == 3
        assert c.token_ids == engine.generate([prompt], max_new_tokens=5, ignore_eos=True, domain="base")[0].token_ids


# ---------------------------------------------------------------------------------------------
# Hot changes: experts added and removed while requests are in flight
# ---------------------------------------------------------------------------------------------


class Collector:
    """Gathers the step events of submitted requests: tokens, finish reason, first routing."""

    def __init__(self, core):
        self.core = core
        self.tokens = defaultdict(list)
        self.finished = {}
        self.routing = {}

    def step(self, n=1):
        for _ in range(n):
            for e in self.core.step():
                if e.token >= 0:
                    self.tokens[e.request_id].append(e.token)
                if e.routing is not None:
                    assert e.request_id not in self.routing, "routing reported twice"
                    self.routing[e.request_id] = e.routing.domain
                if e.finished:
                    self.finished[e.request_id] = e.finish_reason

    def run_to_idle(self, limit=200):
        """step() until idle, then once more: events of these requests that a generate() call
        stepped past wait for the next step()."""
        for _ in range(limit):
            if self.core.idle():
                self.step()
                return
            self.step()
        raise AssertionError("the engine never became idle")


def test_add_and_remove_experts_while_generating(llama, adapter_dirs, gen):
    folder, experts = llama
    dirs = adapter_dirs("llama_gqa")
    engine = moa_engine.Engine(
        folder, experts={"A": experts["A"], "B": experts["B"]}, max_batch=2, max_seq_len=MAX_SEQ_LEN
    )
    prompts = random_prompts(gen, 517, [8, 13, 5, 10, 9])
    plan = [(prompts[0], "A"), (prompts[1], "A"), (prompts[2], "A"), (prompts[3], "B")]
    undisturbed = [
        c.token_ids
        for c in engine.generate([p for p, _ in plan], max_new_tokens=12, ignore_eos=True, domain=[d for _, d in plan])
    ]

    core = engine._core
    run = Collector(core)
    ids = [core.submit(make_request(p, d)) for p, d in plan]  # two slots: two requests wait
    run.step(3)
    engine.remove_expert("A")
    # C reaches rank 12 (down_proj), above A's 4 and B's 8: the stacks are rebuilt while A's requests run.
    engine.add_expert("C", dirs["mlp_patterns"])
    assert engine.experts == ["B", "C"]
    with pytest.raises(ValueError, match=r"unknown domain 'A' \(known: base, B, C\)"):
        engine.generate([prompts[4]], max_new_tokens=4, domain="A")
    with pytest.raises(ValueError, match=r"unknown domain 'A'"):
        core.submit(make_request(prompts[4], "A"))
    # A request naming C runs alongside the in-flight ones (generate() steps them too).
    [c] = engine.generate([prompts[4]], max_new_tokens=12, ignore_eos=True, domain="C")
    assert c.domain == "C"
    assert c.token_ids == greedy(peft_model(folder, dirs["mlp_patterns"]), prompts[4], 12)
    run.run_to_idle()
    for k, rid in enumerate(ids):
        assert run.finished[rid] == "length" and run.routing[rid] == plan[k][1], f"request {k}"
        assert run.tokens[rid] == undisturbed[k], f"in-flight request {k} ({plan[k][1]}) changed"

    engine.add_expert("A", experts["A"])  # A is free again once its requests are done
    assert sorted(engine.experts) == ["A", "B", "C"]
    again = engine.generate([p for p, _ in plan], max_new_tokens=12, ignore_eos=True, domain=[d for _, d in plan])
    assert [c.token_ids for c in again] == undisturbed


def test_readding_a_removed_expert_while_its_requests_run(llama, adapter_dirs, gen):
    """Re-adding "A" with new weights while requests of the old "A" still run: either the new
    A serves new requests (the old ones finish with theirs), or the error says why it cannot
    be added yet. "already loaded (remove it first)" contradicts engine.experts."""
    folder, experts = llama
    new_a = adapter_dirs("llama_gqa")["r16_rslora"]
    engine = moa_engine.Engine(folder, experts={"A": experts["A"]}, max_batch=2, max_seq_len=MAX_SEQ_LEN)
    prompts = random_prompts(gen, 517, [8, 11])
    undisturbed = engine.generate([prompts[0]], max_new_tokens=12, ignore_eos=True, domain="A")[0].token_ids
    core = engine._core
    run = Collector(core)
    rid = core.submit(make_request(prompts[0], "A"))
    run.step(2)
    engine.remove_expert("A")
    assert engine.experts == []
    try:
        engine.add_expert("A", new_a)
    except ValueError as exc:
        assert any(w in str(exc) for w in ("in flight", "in use", "running", "still")), (
            f"re-adding a removed expert fails with a misleading message: {exc}"
        )
        run.run_to_idle()
        assert run.tokens[rid] == undisturbed
        return
    assert engine.experts == ["A"]
    [c] = engine.generate([prompts[1]], max_new_tokens=12, ignore_eos=True, domain="A")
    assert c.token_ids == greedy(peft_model(folder, new_a), prompts[1], 12), "the new A does not serve new requests"
    run.run_to_idle()
    assert run.tokens[rid] == undisturbed, "the in-flight request of the old A changed"
