"""MoA training: the injected modules against plain torch and PEFT, the per-domain loss
(concurrent == separate), the router stage, add-domain, checkpoints/resume, divergence, DDP,
the data encoding and the CLI.

The models are tiny random Llamas that share the default model's tokenizer (so chat templates
and real text work), built once per session.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import seeded_generator
from safetensors.torch import load_file

from moa_engine.data.records import Record
from moa_engine.moa_format import MoADir, load_peft_adapter
from moa_engine.training import (
    DataOptions,
    ExpertOptions,
    MoAModel,
    RouterFit,
    TrainConfig,
    TrainingDiverged,
    add_domain,
    encode_records,
    train_experts,
    train_router,
)
from moa_engine.training.dataset import Example, collate, domain_samples
from moa_engine.training.modules import enable_checkpointing
from moa_engine.training.stages import stage1_loss
from moa_engine.training.trainer import Group, Plan, lr_at, train

ROOT = Path(__file__).resolve().parents[1]


def _seed(gen: torch.Generator) -> int:
    """A seed drawn from `gen`."""
    return int(torch.randint(0, 2**31, (), generator=gen))


def _tiny_llama(vocab: int, seed: int, dtype=torch.float32, hidden=48, layers=2):
    """A tiny random Llama; its weights depend on `seed` only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    weights = torch.Generator().manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=72,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2, generator=weights)
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, request):
    """A tiny random Llama with the default model's tokenizer (vocab 49152), saved as a folder."""
    from moa_engine.models import resolve_model

    source = resolve_model(None, progress=False)
    folder = tmp_path_factory.mktemp("tiny_train") / "model"
    model = _tiny_llama(49152, seed=_seed(seeded_generator(request.node.nodeid + "::tiny_dir")))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    return folder


def _records(n: int, gen: torch.Generator, domains=("math", "prose", "chat")):
    """n records of each domain, their numbers drawn from gen."""
    out = []
    for i in range(n):
        a, b = torch.randint(0, 100, (2,), generator=gen).tolist()
        if "math" in domains:
            out.append(Record("math", prompt=f"What is {a} plus {b}?", response=str(a + b)))
        if "prose" in domains:
            out.append(
                Record("prose", text=f"The river {i} runs past the old mill, where {a} herons wait for {b} fish.")
            )
        if "chat" in domains:
            out.append(
                Record("chat", prompt=f"Hello there, friend number {a}!", response="Hi! How can I help you today?")
            )
        if "code" in domains:
            out.append(Record("code", prompt=f"def f{a}(x):", response=f"    return x * {b}"))
    return out


def _write_jsonl(path, records):
    Path(path).write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    return path


def _expert_tensors(moa, domain):
    return load_file(str(Path(moa) / "experts" / domain / "adapter_model.safetensors"))


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The modules
# ---------------------------------------------------------------------------------------------


def test_moa_model_matches_plain_torch_forward_and_grads(gen):
    """Label-routed MoAModel == a hand-written reference: each layer's target linears get
    scale * (x A^T) B^T of the row's expert; gradients of A and B match too (float64)."""
    seed = _seed(gen)
    hf = _tiny_llama(97, seed=seed, dtype=torch.float64)
    ref = _tiny_llama(97, seed=seed, dtype=torch.float64)
    moa = MoAModel(hf, ["q_proj", "v_proj", "down_proj"])
    moa.add_expert("a", rank=3, alpha=5, seed=_seed(gen))
    moa.add_expert("b", rank=5, alpha=7, seed=_seed(gen))  # heterogeneous ranks
    for lin in moa.linears.values():
        for B in lin.lora_B:
            torch.nn.init.normal_(B, std=0.3, generator=gen)
    moa.double()
    ids = torch.randint(0, 97, (3, 11), generator=gen)
    attn = torch.ones_like(ids)
    experts = [1, -1, 0]
    hidden, _ = moa(ids, attn, experts)
    loss = moa.lm_logits(hidden).pow(2).mean()
    loss.backward()

    # Reference: hooks that add each row's LoRA update to the plain model's linears.
    params = {}
    for (l, module), lin in moa.linears.items():
        # the op takes float32 scales (the contract), so the reference rounds them the same way
        params[(l, module)] = [
            (
                a.detach().clone().requires_grad_(),
                b.detach().clone().requires_grad_(),
                float(torch.tensor(s, dtype=torch.float32)),
            )
            for a, b, s in zip(lin.lora_A, lin.lora_B, lin.scales)
        ]
        parent = getattr(ref.model.layers[l], "self_attn" if module != "down_proj" else "mlp")
        base = getattr(parent, module)

        def hook(mod, inputs, output, key=(l, module)):
            x = inputs[0]
            rows = []
            for r, e in enumerate(experts):
                if e < 0:
                    rows.append(torch.zeros_like(output[r]))
                else:
                    a, b, s = params[key][e]
                    rows.append(s * (x[r] @ a.t()) @ b.t())
            return output + torch.stack(rows)

        base.register_forward_hook(hook)
    ref_hidden = ref.model(input_ids=ids, attention_mask=attn).last_hidden_state
    ref_loss = ref.lm_head(ref_hidden).pow(2).mean()
    ref_loss.backward()
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-10, atol=1e-12)
    for key, lin in moa.linears.items():
        for e in range(2):
            torch.testing.assert_close(lin.lora_A[e].grad, params[key][e][0].grad, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(lin.lora_B[e].grad, params[key][e][1].grad, rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in hf.parameters() if not p.requires_grad)


@pytest.mark.parametrize("N,chunk,bias", [(131, 16, False), (7, 64, True), (64, 64, False), (1, 3, True)])
def test_linear_cross_entropy_matches_the_logits_way(N, chunk, bias, gen):
    """Chunked head + CE (gradient formed in the forward) against F.cross_entropy of the full
    logits: per-token losses and the gradient of a random per-token weighting, float64."""
    from moa_engine.training.linear_ce import linear_cross_entropy

    g = gen
    V, H = 301, 37
    h = torch.randn(N, H, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64, generator=g)
    b = torch.randn(V, dtype=torch.float64, generator=g) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    w = torch.rand(N, dtype=torch.float64, generator=g)
    ours = linear_cross_entropy(h, W, y, b, chunk=chunk)
    (gh,) = torch.autograd.grad((ours * w).sum(), h)
    h2 = h.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h2, W, b), y, reduction="none")
    (gh2,) = torch.autograd.grad((ref * w).sum(), h2)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, gh2, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_under_autocast_and_bad_input(gen):
    from moa_engine.training.linear_ce import linear_cross_entropy

    g = gen
    h = torch.randn(50, 32, generator=g, requires_grad=True)
    W = torch.randn(97, 32, generator=g) * 0.3
    y = torch.randint(0, 97, (50,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, W, y, chunk=8)
        ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, W).float(), y, reduction="none")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)  # both: a bfloat16 head, float32 softmax
    (gh,) = torch.autograd.grad(ours.sum(), h)
    (gr,) = torch.autograd.grad(torch.nn.functional.cross_entropy(h @ W.t(), y, reduction="sum"), h)
    assert torch.nn.functional.cosine_similarity(gh.flatten(), gr.flatten(), dim=0) > 0.99
    with pytest.raises(ValueError, match=r"labels must be in \[0, 97\)"):
        linear_cross_entropy(h, W, torch.full((50,), 97))
    with pytest.raises(ValueError, match="must be frozen"):
        linear_cross_entropy(h, W.clone().requires_grad_(True), y)
    with pytest.raises(ValueError, match="linear_cross_entropy: h"):
        linear_cross_entropy(h, W, y[:-1])


def test_saved_expert_loads_in_peft_with_the_same_logits(tmp_path, gen):
    peft = pytest.importorskip("peft")
    seed = _seed(gen)
    hf = _tiny_llama(101, seed=seed)
    moa = MoAModel(hf, ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"])
    moa.add_expert("x", rank=4, alpha=12, seed=_seed(gen))
    moa.add_expert("y", rank=6, alpha=3, seed=_seed(gen), use_rslora=True)
    for lin in moa.linears.values():
        for B in lin.lora_B:
            torch.nn.init.normal_(B, std=0.2, generator=gen)
    ids = torch.randint(0, 101, (2, 9), generator=gen)
    for e, name in enumerate(moa.experts):
        folder = moa.save_expert(name, tmp_path / name, "tiny")
        with torch.no_grad():
            hidden, _ = moa(ids, torch.ones_like(ids), [e, e])
            ours = moa.lm_logits(hidden)
        base = _tiny_llama(101, seed=seed)
        peft_model = peft.PeftModel.from_pretrained(base, str(folder))
        with torch.no_grad():
            theirs = peft_model(input_ids=ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert load_peft_adapter(folder).rank == moa.expert_meta[name]["rank"]


# ---------------------------------------------------------------------------------------------
# Stage 1: concurrent == separate
# ---------------------------------------------------------------------------------------------


def _random_examples(domains, n, vocab, gen):
    out = {}
    for d in domains:
        out[d] = []
        for _ in range(n):
            T = int(torch.randint(4, 14, (1,), generator=gen))
            ids = torch.randint(3, vocab, (T,), generator=gen).tolist()
            start = int(torch.randint(1, T - 1, (1,), generator=gen))
            out[d].append(Example(ids, [i >= start for i in range(T)], start, d))
    return out


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_concurrent_step_equals_separate_steps(optimizer, gen):
    """One optimiser step on a mixed batch of 3 domains gives each expert exactly the weights
    that a step on its own domain's samples alone gives (float64; per-domain loss; per-expert
    clipping; micro-batches that mix domains)."""
    model_seed, expert_seeds = _seed(gen), [_seed(gen) for _ in range(3)]
    domains = ["a", "b", "c"]
    examples = _random_examples(domains, 5, 89, gen)
    cfg = TrainConfig(
        batch=3,
        steps=2,
        lr=0.05,
        optimizer=optimizer,
        dtype="float64",
        micro_batch=4,
        max_grad_norm=0.5,
        progress=False,
    )

    def build():
        hf = _tiny_llama(89, seed=model_seed, dtype=torch.float64)
        m = MoAModel(hf, ["q_proj", "v_proj", "up_proj", "down_proj"])
        for i, d in enumerate(domains):
            m.add_expert(d, rank=3 + i, alpha=4, seed=expert_seeds[i])
        return m.double()

    together = build()
    plan = Plan(examples, {d: 2 for d in domains}, {d: k for k, d in enumerate(domains)})
    groups = [Group(d, together.expert_parameters(d), 2, cfg.lr) for d in domains]
    train(together, groups, plan, stage1_loss([0, 1, 2]), cfg)

    for d in domains:
        alone = build()
        plan = Plan({d: examples[d]}, {d: 2}, {x: i for i, x in enumerate(domains)})
        train(alone, [Group(d, alone.expert_parameters(d), 2, cfg.lr)], plan, stage1_loss([0, 1, 2]), cfg)
        for p, q in zip(together.expert_parameters(d), alone.expert_parameters(d)):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        for other in domains:
            if other != d:  # the other experts did not move in the separate run
                fresh = build()
                for p, q in zip(alone.expert_parameters(other), fresh.expert_parameters(other)):
                    assert torch.equal(p, q)


def test_length_buckets_and_bucketed_steps_equal_one_forward(gen):
    """Length-sorted forwards under a padded-token budget: the buckets themselves, and two
    AdamW steps with every sequence alone / one forward per step / budgets between, equal."""
    from moa_engine.training.trainer import length_buckets

    lengths = [9, 3, 12, 3, 7, 30, 5]
    buckets = length_buckets(list("abcdefg"), lengths, budget=18)
    assert buckets == [["b", "d", "g"], ["e", "a"], ["c"], ["f"]]  # 3x5, 2x9, 12 (3x12 > 18), 30 alone
    assert length_buckets([], [], 8) == [[]]
    examples = _random_examples(["a", "b"], 6, 71, gen)
    model_seed, expert_seeds = _seed(gen), [_seed(gen) for _ in range(2)]
    weights = []
    for budget in (1, 30, 10**6):
        hf = _tiny_llama(71, seed=model_seed, dtype=torch.float64)
        m = MoAModel(hf, ["k_proj", "o_proj", "gate_proj"])
        m.add_expert("a", 3, 6, seed=expert_seeds[0])
        m.add_expert("b", 5, 6, seed=expert_seeds[1])
        m.double()
        cfg = TrainConfig(batch=3, steps=2, lr=0.02, dtype="float64", forward_tokens=budget, progress=False)
        plan = Plan(examples, {"a": 2, "b": 2}, {"a": 0, "b": 1})
        train(m, [Group(d, m.expert_parameters(d), 2, cfg.lr) for d in ("a", "b")], plan, stage1_loss([0, 1]), cfg)
        weights.append([p.detach().clone() for d in ("a", "b") for p in m.expert_parameters(d)])
    for other in weights[1:]:
        for p, q in zip(weights[0], other):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert any(p.abs().max() > 0 for p in weights[0][1::2])


def test_gradient_checkpointing_gives_the_same_step(gen):
    examples = _random_examples(["a", "b"], 4, 61, gen)
    model_seed, expert_seeds = _seed(gen), [_seed(gen) for _ in range(2)]
    results = []
    for ckpt in (False, True):
        hf = _tiny_llama(61, seed=model_seed, dtype=torch.float64)
        if ckpt:
            enable_checkpointing(hf)
            hf.train()
        m = MoAModel(hf, ["q_proj", "down_proj"])
        m.add_expert("a", 4, 8, seed=expert_seeds[0])
        m.add_expert("b", 4, 8, seed=expert_seeds[1])
        m.double()
        cfg = TrainConfig(batch=2, steps=2, lr=0.01, dtype="float64", progress=False)
        plan = Plan(examples, {"a": 2, "b": 2}, {"a": 0, "b": 1})
        train(m, [Group(d, m.expert_parameters(d), 2, cfg.lr) for d in "ab"], plan, stage1_loss([0, 1]), cfg)
        results.append([p.detach().clone() for d in "ab" for p in m.expert_parameters(d)])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_learning_rate_schedule():
    assert lr_at(0, 10, 1.0, 2, 0.1) == pytest.approx(0.5)
    assert lr_at(1, 10, 1.0, 2, 0.1) == pytest.approx(1.0)
    assert lr_at(2, 10, 1.0, 2, 0.1) == pytest.approx(1.0)
    assert lr_at(9, 10, 1.0, 2, 0.1) == pytest.approx(0.1)
    values = [lr_at(s, 10, 1.0, 2, 0.1) for s in range(2, 10)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_schedule_is_per_domain_and_epoch_permutations():
    first = domain_samples(5, 5, 0, seed=1, domain="a")
    assert sorted(first) == list(range(5))  # one epoch is a permutation
    assert sorted(domain_samples(5, 5, 1, seed=1, domain="a")) == list(range(5))
    assert domain_samples(5, 3, 2, seed=1, domain="a") == domain_samples(5, 3, 2, seed=1, domain="a")
    assert first != domain_samples(5, 5, 0, seed=1, domain="b") or first != domain_samples(5, 5, 0, seed=2, domain="a")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def test_encoding_masks_the_prompt_and_matches_the_engine_chat_prompt(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    records = [Record("m", prompt="What is 2 plus 2?", response="4"), Record("t", text="plain words here")]
    examples, report = encode_records(records, tok, max_len=512)
    chat, text = examples
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 2?"}], add_generation_prompt=True, tokenize=True
    )
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert chat.input_ids[: len(prompt)] == prompt and chat.route_len == len(prompt)
    scored = [t for t, m in zip(chat.input_ids, chat.loss_mask) if m]
    assert tok.decode(scored).startswith("4") and not any(chat.loss_mask[: len(prompt)])
    assert text.route_len == len(text.input_ids) and all(text.loss_mask[1:]) and not text.loss_mask[0]
    batch = collate([chat, text], {"m": 0, "t": 1}, pad_id=2)
    # labels[t] is the token at t + 1 when that token is scored
    n = len(chat.input_ids)
    assert batch.labels[0, : len(prompt) - 1].eq(-100).all()
    assert batch.labels[0, len(prompt) - 1 : n - 1].tolist() == chat.input_ids[len(prompt) :]
    assert batch.attention_mask[1].sum() == len(text.input_ids)


def test_overlong_records_are_truncated_or_dropped_and_counted(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    long_text = " ".join(["word"] * 80)
    records = [Record("a", text=long_text), Record("a", text="short"), Record("b", prompt="q " * 60, response="r")]
    # truncate: the long text is cut; the chat record's prompt alone fills max_len, so it has no
    # response left to learn and is dropped, which leaves domain b empty: a clear error
    with pytest.raises(ValueError, match=r"\['b'\] have no examples left .* \(dropped: \[1\]\)"):
        encode_records(records, tok, max_len=40, overlong="truncate")
    ex, report = encode_records(records + [Record("b", text="fine")], tok, max_len=40, overlong="truncate")
    assert report.truncated["a"] == 1 and report.dropped["b"] == 1 and report.kept == {"a": 2, "b": 1}
    assert all(len(e.input_ids) <= 40 for e in ex)
    ex, report = encode_records(records[:2] + [Record("b", text="fine")], tok, max_len=40, overlong="drop")
    assert report.dropped["a"] == 1 and report.kept == {"a": 1, "b": 1}
    packed, report = encode_records(records[:2] + [Record("b", text="fine")], tok, max_len=16, pack=True)
    a_blocks = [e for e in packed if e.domain == "a"]
    assert len(a_blocks) >= 5 and all(len(e.input_ids) <= 16 for e in a_blocks)


# ---------------------------------------------------------------------------------------------
# The stages, end to end on the tiny model
# ---------------------------------------------------------------------------------------------


def _cfg(**kw):
    base = dict(batch=4, steps=6, lr=5e-3, progress=False, checkpoint_every=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory, request):
    """Stage 1 and stage 2 on three domains; the MoA dir and its data."""
    work = tmp_path_factory.mktemp("moa")
    data = _write_jsonl(work / "data.jsonl", _records(24, seeded_generator(request.node.nodeid + "::trained")))
    moa = work / "moa"
    s1 = train_experts(
        data,
        moa,
        model=tiny_dir,
        cfg=_cfg(),
        expert=ExpertOptions(rank=4, alpha=8),
        data_opts=DataOptions(max_len=64, val_fraction=0.15),
    )
    stage1 = {d: _expert_tensors(moa, d) for d in s1["domains"]}
    s2 = train_router(moa, data, cfg=_cfg(steps=25, lr=3e-2), data_opts=DataOptions(max_len=64, val_fraction=0.15))
    return {"moa": moa, "data": data, "work": work, "stage1": stage1, "s1": s1, "s2": s2}


def test_stage1_writes_a_moa_dir_that_peft_and_the_engine_load(trained, tiny_dir):
    moa = MoADir.load(trained["moa"])
    assert moa.config.domains == ["math", "prose", "chat"]
    assert moa.router is not None and len(moa.router) == 2 and moa.router[0].shape == (3, 48)
    assert trained["s1"]["final"]["lm"].keys() == {"math", "prose", "chat"}
    log = [json.loads(l) for l in Path(trained["s1"]["log"]).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7)) and all(r["tokens_per_s"] > 0 for r in log)
    # the training lowered the held-out loss below the base model's (B starts at zero = base)
    from moa_engine import Engine

    engine = Engine(tiny_dir, experts=trained["moa"])
    for d in moa.config.domains:
        assert any(t.abs().max() > 0 for k, t in trained["stage1"][d].items() if "lora_B" in k)
    assert set(engine.experts) == {"math", "prose", "chat"}


def test_router_stage_keeps_frozen_experts_and_routes_held_out_prompts(trained, tiny_dir, gen):
    for d, tensors in trained["stage1"].items():
        after = _expert_tensors(trained["moa"], d)
        assert all(torch.equal(tensors[k], after[k]) for k in tensors)  # frozen in stage 2
    assert trained["s2"]["val_router_accuracy"] and min(trained["s2"]["val_router_accuracy"].values()) == 1.0
    from moa_engine import Engine

    engine = Engine(tiny_dir, experts=trained["moa"])
    records = _records(6, gen)
    prompts = [r.prompt for r in records if r.is_chat]
    labels = [r.domain for r in records if r.is_chat]
    out = engine.generate(prompts, max_new_tokens=2, chat=True)
    assert [c.domain for c in out] == labels


def test_router_features_are_the_pooled_inputs_of_a_full_labelled_forward(tiny_dir, gen):
    """router_features (prompt-only forwards, sorted and batched) against the routers' inputs
    that a full teacher-forced forward of each record alone computes, in the records' order."""
    from transformers import AutoTokenizer

    from moa_engine.training import router_features

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    model = MoAModel(_tiny_llama(49152, seed=_seed(gen)), ["q_proj", "down_proj"])
    for d in ("math", "prose", "chat"):
        model.add_expert(d, rank=3, alpha=5, seed=_seed(gen))
        for p in model.expert_parameters(d)[1::2]:
            torch.nn.init.normal_(p, std=0.3, generator=gen)  # B != 0: each expert moves the features
    model.set_routers(["math", "prose", "chat"])
    examples, _ = encode_records(_records(5, gen), tok, max_len=40)
    index = {"math": 0, "prose": 1, "chat": 2}
    for batch in (1, 4):
        feats, labels = router_features(model, examples, index, "cpu", batch=batch)
        assert feats.shape == (len(examples), 2, 48) and labels.tolist() == [index[e.domain] for e in examples]
        for i, e in enumerate(examples):
            b = collate([e], index, 0)
            _, logits = model(b.input_ids, b.attention_mask, [index[e.domain]], b.route_mask)
            ref = torch.stack([model._batch.pooled[l][0] for l in range(2)])
            torch.testing.assert_close(feats[i], ref, rtol=1e-5, atol=1e-5)
    # the features depend on the expert that ran the prompt (teacher forcing by the label)
    other = [
        Example(e.input_ids, e.loss_mask, e.route_len, "chat" if e.domain == "math" else e.domain) for e in examples
    ]
    moved, _ = router_features(model, other, index, "cpu")
    assert not torch.allclose(moved[labels == 0][:, 1], feats[labels == 0][:, 1])
    # experts=: each prompt through the given expert, still labelled with its own domain
    ran = [(i * 7 + 1) % 3 for i in range(len(examples))]
    given, given_labels = router_features(model, examples, index, "cpu", batch=3, experts=ran)
    assert given_labels.tolist() == labels.tolist()
    for i, e in enumerate(examples):
        b = collate([e], index, 0)
        model(b.input_ids, b.attention_mask, [ran[i]], b.route_mask)
        torch.testing.assert_close(
            given[i], torch.stack([model._batch.pooled[l][0] for l in range(2)]), rtol=1e-5, atol=1e-5
        )
    with pytest.raises(ValueError, match="one index in"):
        router_features(model, examples, index, "cpu", experts=[0])


def test_routers_fitted_through_random_experts_tell_the_domain_whatever_expert_ran_below(tiny_dir, gen):
    """Experts with a strong imprint. Routers fitted on teacher-forced features (each prompt
    through its own expert) against routers fitted through serving_experts' random experts, both
    scored on held-out prompts run through each expert in turn, as the routing pass may: the
    random-expert fit is right under every expert (a miss allowed); the teacher-forced one is
    not (it learnt the experts' imprint: right under the label's expert only)."""
    from transformers import AutoTokenizer

    from moa_engine.training import fit_routers, router_features, serving_experts

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    names = ["math", "prose", "chat"]
    model = MoAModel(_tiny_llama(49152, seed=_seed(gen), layers=3), ["q_proj", "v_proj", "down_proj"])
    for d in names:
        model.add_expert(d, rank=4, alpha=8, seed=_seed(gen))
        for p in model.expert_parameters(d)[1::2]:
            torch.nn.init.normal_(p, std=1.0, generator=gen)
    model.set_routers(names)
    index = {d: k for k, d in enumerate(names)}
    train_ex, _ = encode_records(_records(30, gen), tok, max_len=40)
    held, _ = encode_records(_records(12, gen), tok, max_len=40)
    assert sorted(serving_experts(model, names, 600, 0)) != [0] * 600 and set(
        serving_experts(model, names, 600, 0)
    ) == {0, 1, 2}
    assert serving_experts(model, names, 50, 3) == serving_experts(model, names, 50, 3)

    def fit(experts):
        feats, labels = router_features(model, train_ex, index, "cpu", experts=experts)
        routers = [torch.zeros(3, 48) for _ in range(3)]
        fit_routers(routers, feats, labels, 3, steps=300, lr=3e-2)
        return routers[-1]

    def accuracy_under(w, e):
        feats, labels = router_features(model, held, index, "cpu", experts=[e] * len(held))
        return float(((feats[:, -1] @ w.t()).argmax(-1) == labels).float().mean())

    robust = fit(serving_experts(model, names, len(train_ex), 0))
    forced = fit(None)
    robust_acc = [accuracy_under(robust, e) for e in range(3)]
    forced_acc = [accuracy_under(forced, e) for e in range(3)]
    assert min(robust_acc) >= 0.95, (robust_acc, forced_acc)
    assert min(forced_acc) <= 0.5, (robust_acc, forced_acc)  # the imprint, not the domain


def test_fit_routers_separates_domains_and_weighs_them_equally(gen):
    """The full-batch fit against a plain per-layer torch logistic regression with the same
    AdamW steps; duplicating one domain's samples changes nothing (each domain weighs 1/D)."""
    from moa_engine.training import fit_routers

    g = gen
    D, L, H, n = 3, 4, 23, 37
    centers = torch.randn(L, D, H, generator=g) * 1.5
    labels = torch.randint(0, D, (n,), generator=g)
    labels[:D] = torch.arange(D)
    feats = centers[:, labels].transpose(0, 1) + torch.randn(n, L, H, generator=g)
    init = [torch.randn(D, H, generator=g) * 0.01 for _ in range(L)]
    routers = [w.clone() for w in init]
    res = fit_routers(routers, feats, labels, D, steps=60, lr=5e-2, weight_decay=0.01)
    for l in range(L):  # the reference: one layer at a time, loss written out
        w = init[l].clone().requires_grad_(True)
        opt = torch.optim.AdamW([w], lr=5e-2, weight_decay=0.01, betas=(0.9, 0.99))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.1 + 0.45 * (1 + torch.cos(torch.tensor(torch.pi * min(1.0, s / 60))).item())
        )
        counts = torch.bincount(labels, minlength=D).float()
        for _ in range(60):
            logp = torch.log_softmax(feats[:, l] @ w.t(), -1)[torch.arange(n), labels]
            loss = -sum(logp[labels == d].mean() for d in range(D) if counts[d] > 0) / D
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        torch.testing.assert_close(routers[l], w.detach(), rtol=1e-4, atol=1e-5)
    assert min(res.accuracy) == 1.0 and res.loss < 0.1
    # duplicating every sample of domain 0 five times: the same balanced loss, the same routers
    dup = torch.cat([torch.arange(n)] + [torch.nonzero(labels == 0)[:, 0]] * 4)
    again = [w.clone() for w in init]
    fit_routers(again, feats[dup], labels[dup], D, steps=60, lr=5e-2, weight_decay=0.01)
    for a, b in zip(routers, again):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="do not match 3 routers"):
        fit_routers(routers[:3], feats, labels, D, steps=1, lr=1e-2)
    with pytest.raises(ValueError, match=r"routers must be \[4, 23\]"):
        fit_routers(routers, feats, labels, D + 1, steps=1, lr=1e-2)
    bad = feats.clone()
    bad[3, 2, 5] = float("nan")
    with pytest.raises(TrainingDiverged, match="not finite"):
        fit_routers(routers, bad, labels, D, steps=1, lr=1e-2)


def test_fit_routers_with_fixed_rows_fits_only_the_others(gen):
    """fixed_rows keeps those rows bit-identical, and the other rows end where a plain torch fit
    of those rows alone ends, the fixed rows' logits entering the loss as constants."""
    from moa_engine.training import fit_routers

    g = gen
    D, L, H, n = 4, 3, 19, 53
    labels = torch.randint(0, D, (n,), generator=g)
    labels[:D] = torch.arange(D)
    feats = torch.randn(L, D, H, generator=g)[:, labels].transpose(0, 1) * 2 + torch.randn(n, L, H, generator=g)
    init = [torch.randn(D, H, generator=g) for _ in range(L)]
    fixed, free = [0, 2], [1, 3]
    routers = [w.clone() for w in init]
    fit_routers(routers, feats, labels, D, steps=40, lr=5e-2, weight_decay=0.01, fixed_rows=fixed)
    for l in range(L):
        assert torch.equal(routers[l][fixed], init[l][fixed]), f"layer {l}: a fixed row moved"
        w = init[l][free].clone().requires_grad_(True)
        opt = torch.optim.AdamW([w], lr=5e-2, weight_decay=0.01, betas=(0.9, 0.99))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.1 + 0.45 * (1 + torch.cos(torch.tensor(torch.pi * min(1.0, s / 40))).item())
        )
        for _ in range(40):
            full = torch.zeros(D, H)
            full[fixed] = init[l][fixed]
            full = full.index_put((torch.tensor(free),), w)
            logp = torch.log_softmax(feats[:, l] @ full.t(), -1)[torch.arange(n), labels]
            loss = -sum(logp[labels == d].mean() for d in range(D)) / D
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        torch.testing.assert_close(routers[l][free], w.detach(), rtol=1e-4, atol=1e-5)
        assert not torch.equal(routers[l][free], init[l][free])
    for bad in ([0, 1, 2, 3], [4], [-1]):
        with pytest.raises(ValueError, match="fixed_rows must be some of the 4 rows"):
            fit_routers([w.clone() for w in init], feats, labels, D, steps=1, lr=1e-2, fixed_rows=bad)


def test_joint_router_training_tunes_the_experts(trained, tiny_dir, tmp_path):
    moa = tmp_path / "joint"
    shutil.copytree(trained["moa"], moa)
    train_router(
        moa, trained["data"], cfg=_cfg(steps=3, lr=1e-2), joint=True, expert_lr=1e-2, data_opts=DataOptions(max_len=64)
    )
    changed = [
        d
        for d in trained["stage1"]
        if not all(torch.equal(trained["stage1"][d][k], _expert_tensors(moa, d)[k]) for k in trained["stage1"][d])
    ]
    assert changed == ["math", "prose", "chat"]
    assert MoADir.load(moa).router is not None


def _held_out_losses(moa, data, opts: DataOptions, seed: int = 0) -> dict:
    """Each expert's mean token loss on its domain's held-out split, computed afresh from the
    written MoA directory (plain per-example sums, not evaluate_lm's batching)."""
    from moa_engine.training.stages import _load_moa_model, as_records, prepare

    cfg = TrainConfig(progress=False)
    module, tok = _load_moa_model(MoADir.load(moa), cfg)
    _, val, _ = prepare(as_records(data), tok, opts, seed, MoADir.load(moa).config.domains)
    out = {}
    with torch.no_grad():
        for d, examples in val.items():
            total, count = 0.0, 0
            for e in examples:
                ids = torch.tensor([e.input_ids])
                hidden, _ = module(ids, torch.ones_like(ids), [module.expert_index(d)])
                logits = module.hf.lm_head(hidden[0]).double()
                labels = torch.tensor(e.input_ids[1:])
                keep = torch.tensor(e.loss_mask[1:], dtype=torch.bool)
                nll = torch.nn.functional.cross_entropy(logits[:-1], labels, reduction="none")
                total, count = total + float(nll[keep].sum()), count + int(keep.sum())
            out[d] = total / count
    return out


def test_joint_keep_best_ends_each_expert_at_its_lowest_held_out_loss(trained, tmp_path):
    """keep_best: the log's measurements every 2 steps (step 0 = the stage-1 experts); each
    expert ends at the argmin, and the written expert's held-out loss, recomputed from the files,
    is that minimum. An expert kept at step 0 is bit-identical to its stage-1 files."""
    moa = tmp_path / "joint"
    shutil.copytree(trained["moa"], moa)
    opts = DataOptions(max_len=64, val_fraction=0.3)
    out = train_router(
        moa,
        trained["data"],
        cfg=_cfg(steps=6, lr=1e-2, seed=1),
        joint=True,
        expert_lr=1e-2,
        data_opts=opts,
        keep_best=2,
    )
    log = [json.loads(l) for l in Path(out["log"]).read_text().splitlines()]
    measured = {r["step"]: r["val_loss"] for r in log if "val_loss" in r and "step" in r}
    assert sorted(measured) == [2, 4, 6]
    kept = out["kept"]
    assert set(kept) == {"math", "prose", "chat"}
    fresh = _held_out_losses(moa, trained["data"], opts, seed=1)
    stage1 = _held_out_losses(trained["moa"], trained["data"], opts, seed=1)
    for d, k in kept.items():
        history = {0: stage1[d], **{s: v[d] for s, v in measured.items()}}
        best = min(history, key=history.get)
        assert k["step"] == best, (d, history, k)
        assert fresh[d] == pytest.approx(history[best], rel=1e-4, abs=1e-5)
        same = all(torch.equal(trained["stage1"][d][n], _expert_tensors(moa, d)[n]) for n in trained["stage1"][d])
        assert same == (best == 0), (d, best)
    assert any(k["step"] > 0 for k in kept.values())  # the tiny experts are far from trained


def test_keep_best_restores_weights_that_were_made_worse(trained, gen):
    """KeepBest alone: step 0 measured, one expert made worse by noise and another better by
    nothing (unchanged), a measurement, restore(): the noisy expert is back bit for bit."""
    from moa_engine.training.stages import KeepBest, _load_moa_model, as_records, prepare

    cfg = TrainConfig(progress=False)
    moa = MoADir.load(trained["moa"])
    module, tok = _load_moa_model(moa, cfg)
    _, val, _ = prepare(
        as_records(trained["data"]), tok, DataOptions(max_len=64, val_fraction=0.3), 0, moa.config.domains
    )
    keeper = KeepBest(module, val, moa.config.domains, cfg, every=2, total=4, path=None)
    before = [p.detach().clone() for p in module.expert_parameters("math")]
    with torch.no_grad():
        for p in module.expert_parameters("math"):
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    record = {}
    keeper(1, record)
    assert record == {}  # not a measuring step
    keeper(2, record)
    assert record["val_loss"]["math"] > keeper.best["math"]["loss"]
    kept = keeper.restore()
    assert kept["math"]["step"] == 0 and kept["prose"]["step"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, module.expert_parameters("math")))


def test_keep_best_survives_an_interrupted_run(trained, tmp_path, monkeypatch):
    """Interrupted right after a measurement (before that step's checkpoint) and resumed: the
    same experts as an uninterrupted run."""
    from moa_engine.training import keep_best

    opts = DataOptions(max_len=64, val_fraction=0.3)
    runs = {}
    for name in ("ref", "cut"):
        moa = tmp_path / name
        shutil.copytree(trained["moa"], moa)
        runs[name] = moa
        cfg = _cfg(steps=6, lr=1e-2, checkpoint_every=2, checkpoint_dir=str(tmp_path / f"{name}.ckpt"))
        kwargs = dict(cfg=cfg, joint=True, expert_lr=0.05, data_opts=opts, keep_best=2)
        if name == "cut":
            real = keep_best.KeepBest.__call__

            def cut(self, steps_done, record, real=real):
                real(self, steps_done, record)
                if steps_done == 4:
                    raise KeyboardInterrupt

            monkeypatch.setattr(keep_best.KeepBest, "__call__", cut)
            with pytest.raises(KeyboardInterrupt):
                train_router(moa, trained["data"], **kwargs)
            monkeypatch.setattr(keep_best.KeepBest, "__call__", real)
            kwargs["cfg"] = replace(cfg, resume=True)
        out = train_router(moa, trained["data"], **kwargs)
        runs[name + "_kept"] = out["kept"]
    assert runs["ref_kept"] == runs["cut_kept"]
    for d in ("math", "prose", "chat"):
        a, b = _expert_tensors(runs["ref"], d), _expert_tensors(runs["cut"], d)
        assert all(torch.equal(a[k], b[k]) for k in a), d


def test_keep_best_margin_moves_an_expert_only_by_more_than_its_standard_error(trained, tmp_path, monkeypatch, gen):
    """keep_best_margin: the per-example held-out losses of every measurement, recorded as they
    are taken, replayed through the rule written out here (a state replaces the kept one when
    its mean token loss is lower by more than margin x the paired standard error) give the kept
    steps; a huge margin keeps every expert at its stage-1 weights, bit for bit."""
    import statistics

    from moa_engine.training import keep_best

    calls = []
    real = keep_best.example_losses

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append({d: (s.tolist(), c.tolist()) for d, (s, c) in out.items()})
        return out

    monkeypatch.setattr(keep_best, "example_losses", spy)
    opts = DataOptions(max_len=64, val_fraction=0.3)
    margin = 1.0 + float(torch.rand((), generator=gen))
    moa = tmp_path / "m"
    shutil.copytree(trained["moa"], moa)
    out = train_router(
        moa,
        trained["data"],
        cfg=_cfg(steps=6, lr=1e-2, seed=2),
        joint=True,
        expert_lr=2e-2,
        data_opts=opts,
        keep_best=2,
        keep_best_margin=margin,
    )
    assert len(calls) == 4  # steps 0, 2, 4, 6
    for d in ("math", "prose", "chat"):
        counts = calls[0][d][1]
        kept_step, kept = 0, calls[0][d][0]
        for step, c in zip((2, 4, 6), calls[1:]):
            diff = [a - b for a, b in zip(kept, c[d][0])]
            gain = sum(diff) / sum(counts)
            se = len(diff) ** 0.5 * statistics.stdev(diff) / sum(counts)
            if gain > 0 and gain > margin * se:
                kept_step, kept = step, c[d][0]
        assert out["kept"][d]["step"] == kept_step, (d, margin)
        assert out["kept"][d]["val_loss"] == pytest.approx(sum(kept) / sum(counts), rel=1e-9)
        same = all(torch.equal(trained["stage1"][d][n], _expert_tensors(moa, d)[n]) for n in trained["stage1"][d])
        assert same == (kept_step == 0)
    moa = tmp_path / "m2"
    shutil.copytree(trained["moa"], moa)
    out = train_router(
        moa,
        trained["data"],
        cfg=_cfg(steps=4, lr=1e-2, seed=2),
        joint=True,
        expert_lr=2e-2,
        data_opts=opts,
        keep_best=2,
        keep_best_margin=1e9,
    )
    assert {d: k["step"] for d, k in out["kept"].items()} == {"math": 0, "prose": 0, "chat": 0}
    for d in ("math", "prose", "chat"):
        assert all(torch.equal(trained["stage1"][d][n], _expert_tensors(moa, d)[n]) for n in trained["stage1"][d])
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="keep-best margin must be a finite number >= 0"):
            train_router(
                moa, trained["data"], cfg=_cfg(steps=2), joint=True, data_opts=opts, keep_best=2, keep_best_margin=bad
            )


def test_keep_best_in_stage1_and_its_errors(tiny_dir, tmp_path, trained, gen):
    data = _write_jsonl(tmp_path / "d.jsonl", _records(24, gen))
    opts = DataOptions(max_len=64, val_fraction=0.25)
    out = train_experts(
        data,
        tmp_path / "s1",
        model=tiny_dir,
        cfg=_cfg(steps=4),
        expert=ExpertOptions(rank=4, alpha=8),
        data_opts=opts,
        keep_best=2,
    )
    fresh = _held_out_losses(tmp_path / "s1", data, opts)
    for d, k in out["kept"].items():
        assert k["step"] in (0, 2, 4) and fresh[d] == pytest.approx(k["val_loss"], rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match=r"keep-best needs held-out examples .*--val-fraction"):
        train_experts(
            data, tmp_path / "s2", model=tiny_dir, cfg=_cfg(steps=2), data_opts=DataOptions(max_len=64), keep_best=1
        )
    with pytest.raises(ValueError, match="keep-best applies to --joint"):
        train_router(trained["moa"], trained["data"], cfg=_cfg(), data_opts=opts, keep_best=2, out=tmp_path / "r")
    with pytest.raises(ValueError, match="evaluation interval must be > 0"):
        train_experts(data, tmp_path / "s3", model=tiny_dir, cfg=_cfg(steps=2), data_opts=opts, keep_best=-1)


def test_explicit_val_data_equals_the_same_split_and_its_errors(tiny_dir, tmp_path, gen):
    from moa_engine.data.records import split_records

    records = _records(30, gen)
    train_part, val_part = split_records(records, 0.3, seed=7)
    assert val_part and train_part
    kw = dict(model=tiny_dir, cfg=_cfg(steps=5, seed=7), expert=ExpertOptions(rank=4, alpha=8), keep_best=2)
    split = train_experts(records, tmp_path / "split", data_opts=DataOptions(max_len=64, val_fraction=0.3), **kw)
    given = train_experts(
        _write_jsonl(tmp_path / "train.jsonl", train_part),
        tmp_path / "given",
        data_opts=DataOptions(max_len=64),
        val_data=_write_jsonl(tmp_path / "val.jsonl", val_part),
        **kw,
    )
    assert given["kept"] == split["kept"] and given["val_loss"] == split["val_loss"]
    assert set(given["val_loss"]) == {"math", "prose", "chat"}
    for d in split["domains"]:
        a, b = _expert_tensors(split["out"], d), _expert_tensors(given["out"], d)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opts = DataOptions(max_len=64)
    with pytest.raises(ValueError, match="not both"):
        train_experts(train_part, tmp_path / "e1", data_opts=replace(opts, val_fraction=0.2), val_data=val_part, **kw)
    with pytest.raises(ValueError, match=r"val_data: domain\(s\) \['legal'\] are not among the trained domains"):
        train_experts(
            train_part, tmp_path / "e2", data_opts=opts, val_data=val_part + [Record("legal", text="a clause")], **kw
        )
    with pytest.raises(ValueError, match="val_data: no records"):
        train_experts(train_part, tmp_path / "e3", data_opts=opts, val_data=[], **kw)
    no_chat = [r for r in val_part if r.domain != "chat"]
    with pytest.raises(ValueError, match=r"--val-data\); none for \['chat'\]"):
        train_experts(train_part, tmp_path / "e4", data_opts=opts, val_data=no_chat, **kw)
    # without keep-best the held-out records give the validation figure alone
    plain = train_experts(train_part, tmp_path / "plain", data_opts=opts, val_data=no_chat, **{**kw, "keep_best": 0})
    assert set(plain["val_loss"]) == {"math", "prose"} and plain["kept"] is None


def test_add_domain_leaves_old_experts_bit_identical(trained, tiny_dir, tmp_path, gen):
    moa = tmp_path / "grow"
    shutil.copytree(trained["moa"], moa)
    before = {p.relative_to(moa): _sha(p) for p in (moa / "experts").rglob("*") if p.is_file()}
    old_router = MoADir.load(moa).router
    new = _write_jsonl(tmp_path / "code.jsonl", _records(16, gen, domains=("code",)))
    add_domain(
        moa,
        "code",
        new,
        router_data=trained["data"],
        cfg=_cfg(steps=4),
        router_cfg=_cfg(steps=20, lr=3e-2),
        data_opts=DataOptions(max_len=64),
        router_rows="all",
    )
    after = {p.relative_to(moa): _sha(p) for p in (moa / "experts").rglob("*") if p.is_file()}
    assert {k: after[k] for k in before} == before
    assert len(after) == len(before) + 2
    loaded = MoADir.load(moa)
    assert loaded.config.domains == ["math", "prose", "chat", "code"]
    assert loaded.router[0].shape == (4, 48) and not torch.equal(loaded.router[0][:3], old_router[0])
    assert not Path(f"{moa}.train/add-code/scratch").exists()
    from moa_engine import Engine

    engine = Engine(tiny_dir, experts=moa)
    out = engine.generate(["def f3(x):", "What is 3 plus 4?"], max_new_tokens=2, chat=True)
    assert [c.domain for c in out] == ["code", "math"]
    with pytest.raises(ValueError, match="already has a domain 'code'"):
        add_domain(moa, "code", new, router_data=trained["data"], cfg=_cfg(steps=1))
    more = _write_jsonl(tmp_path / "more.jsonl", [Record("more", text="more text")])
    with pytest.raises(ValueError, match="needs --router-data"):
        add_domain(moa, "more", more, cfg=_cfg(steps=1))
    with pytest.raises(ValueError, match=r"only records of the new domain 'more'; it also has \['code'\]"):
        add_domain(moa, "more", new, router_data=trained["data"], cfg=_cfg(steps=1))


def test_add_domain_can_keep_the_old_router_rows(trained, tiny_dir, tmp_path, gen):
    """router_rows="new" (the default): the old domains' rows of every router are bit-identical
    after the growth, so among the old domains every prompt is routed as before; only the new
    row is fitted."""
    moa = tmp_path / "grow"
    shutil.copytree(trained["moa"], moa)
    old_router = MoADir.load(moa).router
    new = _write_jsonl(tmp_path / "code.jsonl", _records(16, gen, domains=("code",)))
    add_domain(
        moa,
        "code",
        new,
        router_data=trained["data"],
        cfg=_cfg(steps=4),
        router_cfg=_cfg(steps=20, lr=3e-2),
        data_opts=DataOptions(max_len=64),
    )
    loaded = MoADir.load(moa)
    assert loaded.config.domains == ["math", "prose", "chat", "code"]
    for l, (w, w0) in enumerate(zip(loaded.router, old_router)):
        assert torch.equal(w[:3], w0), f"layer {l}: an old domain's row changed"
        assert w[3].abs().max() > 0, f"layer {l}: the new row was not fitted"
    from moa_engine import Engine

    out = Engine(tiny_dir, experts=moa).generate(["def f3(x):", "What is 3 plus 4?"], max_new_tokens=2, chat=True)
    assert [c.domain for c in out] == ["code", "math"]
    with pytest.raises(ValueError, match="router_rows must be 'all' or 'new', got 'old'"):
        add_domain(moa, "more", new, router_data=trained["data"], cfg=_cfg(steps=1), router_rows="old")
    with pytest.raises(ValueError, match=r"fixed_domains \['law'\] are not domains"):
        train_router(
            moa,
            trained["data"],
            cfg=_cfg(steps=2),
            init_from_existing=True,
            fixed_domains=["law"],
            data_opts=DataOptions(max_len=64),
        )
    with pytest.raises(ValueError, match="fixed_domains applies to the routers' fit"):
        train_router(
            moa,
            trained["data"],
            cfg=_cfg(steps=2),
            joint=True,
            init_from_existing=True,
            fixed_domains=["math"],
            data_opts=DataOptions(max_len=64),
        )
    with pytest.raises(ValueError, match="fixed_domains needs routers to keep"):
        train_router(moa, trained["data"], cfg=_cfg(steps=2), fixed_domains=["math"], data_opts=DataOptions(max_len=64))


def test_add_domain_experiment_scores_the_old_domains_before_and_after(trained, tmp_path, gen):
    """add_domain_experiment: a MoA of two of the stage-1 experts (the files copied), its routers
    fitted, then the third domain added with the old router rows kept; the old domains scored
    before and after, the new one after, and the changes are those of the two scores."""
    from moa_engine.evaluation import add_domain_experiment

    records, val = _records(12, gen), _records(2, gen)
    out = tmp_path / "grow"
    growth = add_domain_experiment(
        trained["moa"],
        ["math", "prose"],
        "chat",
        records,
        val,
        out,
        router_cfg=_cfg(steps=20, lr=3e-2),
        expert_cfg=_cfg(steps=2),
        new_router_cfg=_cfg(steps=20, lr=3e-2),
        expert=ExpertOptions(rank=4, alpha=8),
        data_opts=DataOptions(max_len=64),
        eta=0.25,
        router_sample=5,
        max_len=64,
        exact_match_domains=(),
    )
    assert growth["old_domains"] == ["math", "prose"] and growth["new_domain"] == "chat"
    for mode in ("label", "last"):
        assert set(growth["before"][mode]["domains"]) == {"math", "prose"}
        assert set(growth["after"][mode]["domains"]) == {"math", "prose", "chat"}
        for d in ("math", "prose"):
            b, a = growth["before"][mode]["domains"][d]["ppl"], growth["after"][mode]["domains"][d]["ppl"]
            assert growth["change_pct"][mode][d] == pytest.approx(100 * (a / b - 1), rel=1e-12)
    # label-routed perplexity of an old domain: the same expert files, so the same figure (up to
    # the batching, which the new domain's records change)
    for d in ("math", "prose"):
        assert growth["after"]["label"]["domains"][d]["ppl"] == pytest.approx(
            growth["before"]["label"]["domains"][d]["ppl"], rel=1e-4
        )
        a, b = _expert_tensors(out, d), trained["stage1"][d]
        assert all(torch.equal(a[k], b[k]) for k in a)
    grown = MoADir.load(out)
    assert grown.config.domains == ["math", "prose", "chat"] and grown.config.eta == 0.25
    assert grown.router[0].shape == (3, 48)


def test_mixed_lora_is_stage_1_on_the_records_relabelled(tiny_dir, tmp_path, gen):
    """train_mixed_lora == train_experts on mixed_records of the data and of the held-out records:
    one expert, the same weights bit for bit, kept by keep-best under the one domain."""
    from moa_engine.training import mixed_records, train_mixed_lora

    records, held_out = _records(6, gen), _records(2, gen)
    relabelled = mixed_records(records, "all")
    assert [r.domain for r in relabelled] == ["all"] * len(records)
    assert [(r.prompt, r.response, r.text) for r in relabelled] == [(r.prompt, r.response, r.text) for r in records]
    kw = dict(
        model=tiny_dir,
        cfg=_cfg(steps=2),
        expert=ExpertOptions(rank=2, alpha=4),
        data_opts=DataOptions(max_len=48),
        keep_best=1,
    )
    mixed = train_mixed_lora(records, tmp_path / "mixed", val_data=held_out, **kw)
    plain = train_experts(mixed_records(records), tmp_path / "plain", val_data=mixed_records(held_out), **kw)
    assert mixed["domains"] == ["mixed"] and set(mixed["kept"]) == {"mixed"} and mixed["kept"] == plain["kept"]
    assert MoADir.load(tmp_path / "mixed").config.domains == ["mixed"]
    a, b = _expert_tensors(tmp_path / "mixed", "mixed"), _expert_tensors(tmp_path / "plain", "mixed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_summary_from_log_reads_the_last_step_and_the_kept_steps(tmp_path, gen):
    from moa_engine.training import summary_from_log

    losses = torch.rand(4, generator=gen).tolist()
    steps = [{"step": k + 1, "loss": x} for k, x in enumerate(losses)]
    kept = {"a": {"step": 2, "val_loss": losses[1]}}
    log = tmp_path / "log.jsonl"
    lines = (
        steps[:2]
        + [{"stage": "router-fit", "steps": 3}]
        + steps[2:]
        + [{"stage": "keep-best", "kept": kept, "history": []}]
    )
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert summary_from_log(log) == {"final": steps[-1], "kept": kept, "reused": True}
    log.write_text("".join(json.dumps(r) + "\n" for r in steps[:3]))
    assert summary_from_log(str(log)) == {"final": steps[2], "kept": None, "reused": True}
    assert summary_from_log(tmp_path / "missing.jsonl") == {"final": None, "kept": None, "reused": True}


def test_divergence_stops_with_a_clear_error_and_keeps_the_checkpoint(tiny_dir, tmp_path, gen):
    data = _write_jsonl(tmp_path / "d.jsonl", _records(8, gen, domains=("math", "chat")))
    cfg = _cfg(steps=8, lr=1e9, optimizer="sgd", max_grad_norm=None, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match="not finite") as info:
        train_experts(data, tmp_path / "moa", model=tiny_dir, cfg=cfg, data_opts=DataOptions(max_len=48))
    assert not (tmp_path / "moa").exists()
    ckpt = tmp_path / "moa.train" / "experts" / "checkpoint.pt"
    if "checkpoint is kept" in str(info.value):
        state = torch.load(ckpt, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["params"].values())


def test_bad_inputs_name_the_problem(tiny_dir, tmp_path, trained, gen):
    data = _write_jsonl(tmp_path / "d.jsonl", _records(4, gen, domains=("math",)))
    with pytest.raises(ValueError, match="give exactly one of steps and epochs"):
        train_experts(data, tmp_path / "a", model=tiny_dir, cfg=TrainConfig(progress=False))
    with pytest.raises(ValueError, match="dtype"):
        train_experts(data, tmp_path / "a", model=tiny_dir, cfg=_cfg(dtype="int8"))
    with pytest.raises(FileExistsError):
        train_experts(data, trained["moa"], model=tiny_dir, cfg=_cfg())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"domain": "x", "prompt": "p", "answer": "a"}\n')
    with pytest.raises(ValueError, match="unknown field"):
        train_experts(bad, tmp_path / "b", model=tiny_dir, cfg=_cfg())
    other = _write_jsonl(tmp_path / "o.jsonl", _records(4, gen, domains=("code", "math")))
    with pytest.raises(ValueError, match=r"domain\(s\) \['code'\] that the MoA directory does not have"):
        train_router(trained["moa"], other, cfg=_cfg())
    with pytest.raises(ValueError, match="fitted by full-batch AdamW: --optimizer sgd and --warmup apply to --joint"):
        train_router(trained["moa"], trained["data"], cfg=_cfg(optimizer="sgd"), out=tmp_path / "r")
    with pytest.raises(ValueError, match=r"refit: steps and weight_decay must be >= 0"):
        train_router(
            trained["moa"], trained["data"], cfg=_cfg(), joint=True, refit=RouterFit(steps=-1), out=tmp_path / "r"
        )
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint at"):
        train_experts(
            data, tmp_path / "c", model=tiny_dir, cfg=_cfg(resume=True, checkpoint_dir=str(tmp_path / "none"))
        )


# ---------------------------------------------------------------------------------------------
# Processes: kill and resume, DDP
# ---------------------------------------------------------------------------------------------


def _cli(*args):
    return [sys.executable, "-m", "moa_engine.cli", *map(str, args)]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def _moa(*args):
    """`moa ARGS` in a subprocess (one thread), its output captured."""
    return subprocess.run(_cli(*args), env=_env(), capture_output=True, text=True)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tiny_dir, tmp_path, gen):
    data = _write_jsonl(tmp_path / "d.jsonl", _records(24, gen))
    common = [
        "train",
        "experts",
        "--model",
        tiny_dir,
        "--data",
        data,
        "--steps",
        30,
        "--batch",
        6,
        "--rank",
        4,
        "--lr",
        3e-3,
        "--max-len",
        64,
        "--checkpoint-every",
        5,
        "--no-progress",
        "--seed",
        3,
    ]
    ref = _moa(*common, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "run"
    log = Path(f"{out}.train") / "experts" / "log.jsonl"
    ckpt = Path(f"{out}.train") / "experts" / "checkpoint.pt"
    proc = subprocess.Popen(_cli(*common, "--out", out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 12 and ckpt.exists():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not out.exists()
    resumed = _moa(*common, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    for d in ("math", "prose", "chat"):
        a, b = _expert_tensors(tmp_path / "ref", d), _expert_tensors(out, d)
        assert all(torch.equal(a[k], b[k]) for k in a), d
    steps = [json.loads(l)["step"] for l in log.read_text().splitlines()]
    assert steps[-1] == 30 and not ckpt.exists()


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tiny_dir, tmp_path, gen):
    data = _write_jsonl(tmp_path / "d.jsonl", _records(12, gen))
    common = [
        "train",
        "experts",
        "--model",
        tiny_dir,
        "--data",
        data,
        "--steps",
        3,
        "--batch",
        3,
        "--rank",
        4,
        "--lr",
        1e-2,
        "--max-len",
        64,
        "--dtype",
        "float64",
        "--no-progress",
        "--checkpoint-every",
        0,
    ]
    one = _moa(*common, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "moa_engine.cli",
        *map(str, common),
        "--out",
        str(tmp_path / "two"),
    ]
    two = subprocess.run(torchrun, env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    for d in ("math", "prose", "chat"):
        a, b = _expert_tensors(tmp_path / "one", d), _expert_tensors(tmp_path / "two", d)
        for k in a:
            # The two runs sum the gradients in another order; AdamW divides each weight's step by
            # its gradient's running RMS, so where a gradient nearly vanishes that rounding grows
            # (about 2e-6 relative on some draws). A wrong split of the batch moves weights by 1e-2.
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
        assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)
    # stage 2 (routers only, experts frozen) under DDP as well
    router = [
        "train",
        "router",
        "--data",
        data,
        "--steps",
        3,
        "--batch",
        3,
        "--max-len",
        64,
        "--dtype",
        "float64",
        "--no-progress",
        "--checkpoint-every",
        0,
    ]
    one = _moa(*router, "--moa", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "moa_engine.cli",
        *map(str, router),
        "--moa",
        str(tmp_path / "two"),
    ]
    two = subprocess.run(torchrun, env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = MoADir.load(tmp_path / "one").router, MoADir.load(tmp_path / "two").router
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert a[0].abs().max() > 0


def test_sequential_training_gives_the_same_experts(tiny_dir, tmp_path, gen):
    data = _records(6, gen, domains=("math", "chat"))
    outs = []
    for sequential in (False, True):
        out = tmp_path / f"seq{sequential}"
        train_experts(
            data,
            out,
            model=tiny_dir,
            cfg=_cfg(steps=3, batch=2, dtype="float64", checkpoint_every=1),
            expert=ExpertOptions(rank=3, alpha=6),
            data_opts=DataOptions(max_len=48),
            sequential=sequential,
        )
        outs.append(out)
        assert not list(Path(f"{out}.train").rglob("checkpoint.pt"))  # removed once the output is written
    for d in ("math", "chat"):
        a, b = _expert_tensors(outs[0], d), _expert_tensors(outs[1], d)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_cli_train_experts_and_router(tiny_dir, tmp_path, gen):
    data = _write_jsonl(tmp_path / "d.jsonl", _records(8, gen, domains=("math", "chat")))
    r = _moa(
        "train",
        "experts",
        "--model",
        tiny_dir,
        "--data",
        data,
        "--out",
        tmp_path / "m",
        "--steps",
        2,
        "--batch",
        2,
        "--rank",
        2,
        "--targets",
        "q_proj,v_proj",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["domains"] == ["math", "chat"]
    assert MoADir.load(tmp_path / "m").config.target_modules == ["q_proj", "v_proj"]
    r = _moa("train", "router", "--moa", tmp_path / "m", "--data", data, "--steps", 2, "--batch", 2, "--no-progress")
    assert r.returncode == 0, r.stderr
    # add-domain: --warmup is the new expert's; the routers' fit takes none
    routers_before = MoADir.load(tmp_path / "m").router
    new = _write_jsonl(tmp_path / "code.jsonl", _records(4, gen, domains=("code",)))
    r = _moa(
        "add-domain",
        "--moa",
        tmp_path / "m",
        "--domain",
        "code",
        "--data",
        new,
        "--router-data",
        data,
        "--steps",
        2,
        "--batch",
        2,
        "--warmup",
        1,
        "--router-steps",
        5,
        "--router-rows",
        "new",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    grown = MoADir.load(tmp_path / "m")
    assert grown.config.domains == ["math", "chat", "code"]
    assert all(torch.equal(w[:2], w0) for w, w0 in zip(grown.router, routers_before)), (
        "--router-rows new moved an old row"
    )
    r = _moa("train", "router", "--moa", tmp_path / "m", "--data", data, "--warmup", 2, "--no-progress")
    assert r.returncode == 1 and "apply to --joint" in r.stderr and "Traceback" not in r.stderr
    # --keep-best: joint with a held-out split; refused without --joint or without the split
    r = _moa(
        "train",
        "router",
        "--moa",
        tmp_path / "m",
        "--data",
        data,
        "--joint",
        "--steps",
        2,
        "--batch",
        2,
        "--keep-best",
        1,
        "--keep-best-margin",
        0.5,
        "--val-fraction",
        0.25,
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)["kept"]) == {"math", "chat"}
    r = _moa("train", "router", "--moa", tmp_path / "m", "--data", data, "--keep-best", 2, "--no-progress")
    assert r.returncode == 1 and "keep-best applies to --joint" in r.stderr and "Traceback" not in r.stderr
    r = _moa(
        "train",
        "router",
        "--moa",
        tmp_path / "m",
        "--data",
        data,
        "--joint",
        "--steps",
        2,
        "--keep-best-margin",
        1,
        "--val-fraction",
        0.25,
        "--no-progress",
    )
    assert (
        r.returncode == 1 and "--keep-best-margin applies with --keep-best" in r.stderr and "Traceback" not in r.stderr
    )
    r = _moa(
        "train",
        "experts",
        "--model",
        tiny_dir,
        "--data",
        data,
        "--out",
        tmp_path / "k",
        "--steps",
        2,
        "--keep-best",
        1,
        "--no-progress",
    )
    assert r.returncode == 1 and "--val-fraction" in r.stderr and "Traceback" not in r.stderr
    val = _write_jsonl(tmp_path / "v.jsonl", _records(4, gen, domains=("math", "chat")))
    r = _moa(
        "train",
        "experts",
        "--model",
        tiny_dir,
        "--data",
        data,
        "--out",
        tmp_path / "k",
        "--steps",
        2,
        "--keep-best",
        1,
        "--val-data",
        val,
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)["kept"]) == {"math", "chat"}
    r = _moa(
        "train",
        "experts",
        "--model",
        tiny_dir,
        "--data",
        data,
        "--out",
        tmp_path / "k2",
        "--steps",
        2,
        "--val-data",
        val,
        "--val-fraction",
        0.2,
        "--no-progress",
    )
    assert r.returncode == 1 and "not both" in r.stderr and "Traceback" not in r.stderr
    r = _moa(
        "train",
        "experts",
        "--model",
        tiny_dir,
        "--data",
        tmp_path / "missing.jsonl",
        "--out",
        tmp_path / "x",
        "--no-progress",
    )
    assert r.returncode == 1 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# Evaluation through the engine
# ---------------------------------------------------------------------------------------------


def test_forward_route_len_routes_over_the_prompt_only(trained, tiny_dir, gen):
    from moa_engine import Engine

    records = [r for r in _records(4, gen) if r.is_chat]
    for strategy in ("per_layer", "last"):
        engine = Engine(tiny_dir, experts=trained["moa"], routing=strategy)
        for r in records:
            from transformers import AutoTokenizer

            (e,), _ = encode_records([r], engine.tokenizer, max_len=128)
            full = torch.tensor([e.input_ids])
            _, prompt_routing = engine.forward(full[:, : e.route_len], return_routing=True)
            logits, routing = engine.forward(full, return_routing=True, route_len=e.route_len)
            assert routing[0].layer_domains == prompt_routing[0].layer_domains
            torch.testing.assert_close(
                torch.tensor(routing[0].router_probs), torch.tensor(prompt_routing[0].router_probs)
            )
            if strategy == "last":  # the whole row is then served by the chosen expert
                chosen = engine.forward(full, domain=routing[0].domain)
                torch.testing.assert_close(logits, chosen)
    with pytest.raises(ValueError, match="route_len"):
        engine.forward(full, route_len=[1, 2, 3])


def test_evaluate_label_perplexity_matches_the_training_model(trained, tiny_dir, gen):
    """The engine-served perplexity equals the one the PyTorch training model (HF + MoALinear)
    computes for the same records and experts."""
    from transformers import AutoTokenizer

    from moa_engine import Engine
    from moa_engine.evaluation import evaluate, markdown_table
    from moa_engine.training.stages import _load_moa_model, lm_loss

    val = _records(3, gen)
    engine = Engine(tiny_dir, experts=trained["moa"])
    results = evaluate(engine, val, ["base", "label", "last"], max_len=64)
    module, tok = _load_moa_model(MoADir.load(trained["moa"]), TrainConfig(steps=1))
    examples, _ = encode_records(val, tok, max_len=64)
    for d in ("math", "prose", "chat"):
        ex = [e for e in examples if e.domain == d]
        batch = collate(ex, {d: 0}, pad_id=2)
        with torch.no_grad():
            hidden, _ = module(batch.input_ids, batch.attention_mask, [module.expert_index(d)] * len(ex))
            norms = {"tokens": torch.tensor([float((batch.labels != -100).sum())])}
            loss, _ = lm_loss(module, hidden, batch, norms)
        assert results["label"]["domains"][d]["nll"] == pytest.approx(float(loss), rel=1e-4)
        assert results["label"]["domains"][d]["tokens"] == int(norms["tokens"][0])
        # Each record's own NLL sum and token count, in the records' order, from a forward of it alone.
        per = results["label"]["records"][d]
        assert len(per["nll"]) == len(ex)
        for k, e in enumerate(ex):
            one = collate([e], {d: 0}, pad_id=2)
            with torch.no_grad():
                hidden, _ = module(one.input_ids, one.attention_mask, [module.expert_index(d)])
                n = torch.tensor([float((one.labels != -100).sum())])
                loss_k, _ = lm_loss(module, hidden, one, {"tokens": n})
            assert per["tokens"][k] == int(n[0])
            assert per["nll"][k] == pytest.approx(float(loss_k) * int(n[0]), rel=1e-4)
    assert set(results["last"]["router_accuracy"]) == {"math", "prose", "chat"}
    assert results["label"]["average_ppl"] < results["base"]["average_ppl"]
    assert "exact_match" in results["label"] and set(results["label"]["exact_match"]) == {"math"}
    table = markdown_table(results)
    assert table.count("\n") == 4 and "math ppl" in table


def test_routing_accuracy_counts_each_strategys_choices(trained, tiny_dir, gen):
    """routing_accuracy routes each record's prompt alone; its counts equal the router accuracy
    evaluate() reports while scoring the whole records (routed over the same prompt), for every
    strategy, and its confusion counts add up."""
    from moa_engine import Engine
    from moa_engine.evaluation import evaluate, routing_accuracy, routing_table

    val = _records(7, gen)
    engine = Engine(tiny_dir, experts=trained["moa"])
    strategies = ("per_layer", "last", "vote")
    got = routing_accuracy(engine, val, strategies, max_len=64, batch=5)
    scored = evaluate(engine, val, list(strategies), max_len=64, exact_match_domains=())
    for s in strategies:
        r = got[s]
        assert {d: v["accuracy"] for d, v in r["domains"].items()} == pytest.approx(scored[s]["router_accuracy"]), s
        per_record = 1 if s != "per_layer" else engine.config["num_layers"]
        for d, v in r["domains"].items():
            assert v["n"] == 7 * per_record and v["hits"] == r["confusion"][d].get(d, 0), (s, d)
            assert sum(r["confusion"][d].values()) == v["n"], (s, d)
            if s == "per_layer":
                assert v["interval"] is None
            else:
                lo, hi = v["interval"]
                assert 0.0 <= lo <= v["accuracy"] <= hi <= 1.0
        assert r["overall"]["n"] == sum(v["n"] for v in r["domains"].values())
    table = routing_table(got)
    assert table.count("\n") == 4 and "| last |" in table
    with pytest.raises(ValueError, match="'best' is not one of"):
        routing_accuracy(engine, val, ("best",))
    with pytest.raises(ValueError, match=r"domain\(s\) \['law'\] the routers do not know"):
        routing_accuracy(engine, val + [Record("law", "a question", "an answer")], max_len=64)


def test_wilson_interval_inverts_the_score_test(gen):
    """Each end b of the interval solves (p - b)^2 = z^2 b (1 - b) / n, the score test's
    boundary (an independent statement of the interval), and random draws are covered at
    about the nominal rate."""
    from moa_engine.evaluation import wilson_interval

    z = 1.959963984540054
    for n in (1, 7, 241, 1000):
        for hits in {0, 1, n // 2, n - 1, n}:
            lo, hi = wilson_interval(hits, n)
            p = hits / n
            assert lo <= p <= hi
            for b in (lo, hi):
                if 0.0 < b < 1.0:
                    assert (p - b) ** 2 == pytest.approx(z * z * b * (1 - b) / n, rel=1e-9, abs=1e-15)
            if hits == 0:
                assert lo == 0.0
            if hits == n:
                assert hi == 1.0
    assert wilson_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)  # the textbook example
    p, n, draws = 0.97, 150, 2000
    hits = torch.binomial(torch.full((draws,), float(n)), torch.full((draws,), p), generator=gen).long().tolist()
    covered = sum(lo <= p <= hi for lo, hi in (wilson_interval(h, n) for h in hits)) / draws
    assert 0.92 <= covered <= 0.98, covered
    for bad in ((3, 2), (-1, 5), (0, 0)):
        with pytest.raises(ValueError, match="0 <= hits <= n"):
            wilson_interval(*bad)


@pytest.mark.slow
def test_cli_eval(trained, tiny_dir, tmp_path, gen):
    val = _write_jsonl(tmp_path / "val.jsonl", _records(2, gen))
    r = _moa(
        "eval",
        "--moa",
        trained["moa"],
        "--model",
        tiny_dir,
        "--data",
        val,
        "--json",
        tmp_path / "r.json",
        "--max-len",
        64,
    )
    assert r.returncode == 0, r.stderr
    assert "| label |" in r.stdout and "| vote |" in r.stdout
    assert set(json.loads((tmp_path / "r.json").read_text())) == {"base", "label", "per_layer", "last", "vote"}
    r = _moa("eval", "--moa", trained["moa"], "--model", tiny_dir, "--data", val, "--modes", "nope")
    assert r.returncode == 1 and "'nope' is not base, label" in r.stderr
    r = _moa(
        "eval",
        "--moa",
        trained["moa"],
        "--model",
        tiny_dir,
        "--data",
        val,
        "--modes",
        "base,label,last",
        "--compare",
        "last:label,label:base",
        "--bootstrap",
        300,
        "--json",
        tmp_path / "c.json",
        "--max-len",
        64,
    )
    assert r.returncode == 0, r.stderr
    assert "| last vs label |" in r.stdout and "| label vs base |" in r.stdout
    saved = json.loads((tmp_path / "c.json").read_text())
    c = saved["comparisons"]["label vs base"]
    assert c["n_boot"] == 300 and c["change_pct"] == pytest.approx(
        100 * (saved["label"]["average_ppl"] / saved["base"]["average_ppl"] - 1)
    )
    for spec, msg in (("last:vote", "'vote' is not one of the evaluated modes"), ("last", "'last' is not A:B")):
        r = _moa(
            "eval",
            "--moa",
            trained["moa"],
            "--model",
            tiny_dir,
            "--data",
            val,
            "--modes",
            "label,last",
            "--compare",
            spec,
        )
        assert r.returncode == 1 and msg in r.stderr, r.stderr
    # --routing-only: the routers alone, every strategy, the same accuracy as the scored run
    r = _moa(
        "eval",
        "--moa",
        trained["moa"],
        "--model",
        tiny_dir,
        "--data",
        val,
        "--routing-only",
        "--limit",
        1,
        "--json",
        tmp_path / "route.json",
        "--max-len",
        64,
    )
    assert r.returncode == 0, r.stderr
    assert "| per_layer |" in r.stdout and "| vote |" in r.stdout and "confusion (" in r.stdout
    routed = json.loads((tmp_path / "route.json").read_text())["routing"]
    assert {d: v["n"] for d, v in routed["last"]["domains"].items()} == {"math": 1, "prose": 1, "chat": 1}
    full = json.loads((tmp_path / "r.json").read_text())
    r = _moa(
        "eval",
        "--moa",
        trained["moa"],
        "--model",
        tiny_dir,
        "--data",
        val,
        "--routing-only",
        "--max-len",
        64,
        "--json",
        tmp_path / "route2.json",
    )
    assert r.returncode == 0, r.stderr
    routed = json.loads((tmp_path / "route2.json").read_text())["routing"]
    for s in ("per_layer", "last", "vote"):
        assert {d: v["accuracy"] for d, v in routed[s]["domains"].items()} == pytest.approx(
            full[s]["router_accuracy"]
        ), s
    for extra, msg in ((["--modes", "last"], "takes no --modes"), ([], "needs --moa")):
        args = (
            ["eval", "--data", val, "--routing-only", "--model", tiny_dir]
            + extra
            + ([] if msg == "needs --moa" else ["--moa", trained["moa"]])
        )
        r = _moa(*args)
        assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
