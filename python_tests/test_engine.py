"""moa_engine.Engine on tiny random HF models (tiny_models.py), against HF transformers.

Every architecture variant: forward logits (float32 to 1e-4 relative, bfloat16 within 2x
of HF's own bfloat16 error), greedy generation token for token, and the config as read.
On one or two variants: continuous batching against one-at-a-time generation, seeded
sampling (reproducible, seed-dependent, independent of the batch), the sampler's
distribution against softmax of HF's logits (chi-square), top-k / top-p support, stop
sequences and EOS, sharded checkpoints, and the step-level scheduler of moa_engine._C.Engine.

Dimensions: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import VARIANTS, copy_model_dir, hf_models, tiny_dirs  # noqa: F401  (fixtures)

import moa_engine
from moa_engine import _C

ARCHS = list(VARIANTS)
MAX_SEQ_LEN = 160
FLOAT32_REL_TOL = 1e-4  # max |engine - HF| / max |HF|


@pytest.fixture(scope="module")
def engines(tiny_dirs):
    """engines(name, **options) -> a moa_engine.Engine on the variant (cached per options)."""
    cache = {}

    def get(name, **options):
        options = {"max_batch": 8, "max_seq_len": MAX_SEQ_LEN, **options}
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = moa_engine.Engine(tiny_dirs[name], **options)
        return cache[key]

    return get


def random_ids(gen, vocab, *shape):
    return torch.randint(0, vocab, shape, generator=gen)


def random_prompts(gen, vocab, lengths):
    return [random_ids(gen, vocab, n).tolist() for n in lengths]


def relative_error(got, ref):
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def hf_greedy(model, prompt, n):
    """HF greedy generation of exactly n tokens (no EOS stop), one unpadded prompt."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    tokens = out[0, len(prompt) :].tolist()
    assert len(tokens) == n, f"HF stopped after {len(tokens)} of {n} tokens"
    return tokens


def request(prompt, max_new_tokens, temperature=0.0, seed=None, top_k=0, top_p=1.0, stop=(), ignore_eos=True):
    r = _C.GenerationRequest()
    r.prompt = list(prompt)
    r.max_new_tokens = max_new_tokens
    r.sampling.temperature = temperature
    r.sampling.top_k = top_k
    r.sampling.top_p = top_p
    if seed is not None:
        r.sampling.seed = seed
    r.stop_sequences = [list(s) for s in stop]
    r.ignore_eos = ignore_eos
    return r


# ---------------------------------------------------------------------------------------------
# Loading and the config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_config_and_weight_bytes_match_the_checkpoint(name, engines, hf_models):
    engine, hf = engines(name), hf_models(name)
    c, hc = engine.config, hf.config
    head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
    want = dict(
        model_type=hc.model_type,
        vocab_size=hc.vocab_size,
        hidden_size=hc.hidden_size,
        intermediate_size=hc.intermediate_size,
        num_layers=hc.num_hidden_layers,
        num_heads=hc.num_attention_heads,
        num_kv_heads=hc.num_key_value_heads,
        head_dim=head_dim,
        tie_word_embeddings=hc.tie_word_embeddings,
        attention_bias=hc.model_type == "qwen2",
        sliding_window=getattr(hc, "sliding_window", None) or 0,
        eos_token_ids=[2],
        bos_token_id=1,
    )
    assert {k: c[k] for k in want} == want
    assert c["rms_norm_eps"] == pytest.approx(hc.rms_norm_eps, rel=1e-6)
    rope_theta = hc.rope_parameters["rope_theta"] if getattr(hc, "rope_parameters", None) else hc.rope_theta
    assert c["rope_theta"] == pytest.approx(rope_theta)
    # Every parameter once (a tied lm_head is the embedding), in float32.
    assert engine.weight_bytes == sum(p.numel() * 4 for p in hf.parameters())
    assert engine.dtype == torch.float32
    assert (engine.max_batch, engine.max_seq_len) == (8, MAX_SEQ_LEN)
    assert engine.tokenizer is None


def test_variants_exercise_what_they_claim(tiny_dirs, hf_models, gen):
    """The awkward features change HF's logits, so matching HF checks them: the sliding
    window, llama3 rope scaling and the qwen2 biases each make a difference here."""
    from tiny_models import build_model, seed_of

    ids = random_ids(gen, 300, 2, 40)
    for name, plain in [("mistral_window", dict(sliding_window=None)), ("llama3_tied", dict(rope_scaling=None))]:
        ref = hf_logits(hf_models(name), ids)
        assert relative_error(hf_logits(build_model(name, seed=seed_of(name)), ids), ref) < 1e-6  # same weights
        other = hf_logits(build_model(name, seed=seed_of(name), **plain), ids)
        assert relative_error(other, ref) > 1e-2, f"{name}: {plain} makes no difference"
    qwen = hf_models("qwen2_bias")
    assert float(qwen.model.layers[0].self_attn.k_proj.bias.detach().abs().max()) > 0.1


# ---------------------------------------------------------------------------------------------
# Forward against HF, float32
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 37), (2, 1), (1, 70), (5, 9)], ids=lambda s: f"B{s[0]}xT{s[1]}")
@pytest.mark.parametrize("name", ARCHS)
def test_forward_matches_hf_float32(name, shape, engines, hf_models, gen):
    engine, hf = engines(name), hf_models(name)
    ids = random_ids(gen, engine.config["vocab_size"], *shape)  # [B, T]
    got = engine.forward(ids)
    ref = hf_logits(hf, ids)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    err = relative_error(got, ref)
    assert err <= FLOAT32_REL_TOL, f"{name} {shape}: relative error {err:.2e}"


def test_forward_takes_1d_ids_lists_and_int32(engines, hf_models, gen):
    engine, hf = engines("qwen2_bias"), hf_models("qwen2_bias")
    ids = random_ids(gen, engine.config["vocab_size"], 2, 23)
    ref = hf_logits(hf, ids)
    one = engine.forward(ids[1])  # [T] -> [T, V]
    assert one.shape == ref[1].shape
    assert relative_error(one, ref[1]) <= FLOAT32_REL_TOL
    assert torch.equal(engine.forward(ids.tolist()), engine.forward(ids))
    assert torch.equal(engine.forward(ids.to(torch.int32)), engine.forward(ids))
    # A non-contiguous view of a wider tensor.
    wide = random_ids(gen, engine.config["vocab_size"], 23, 4)
    assert torch.equal(engine.forward(wide.t()), engine.forward(wide.t().contiguous()))


def test_forward_does_not_disturb_generation(engines, gen):
    """Scoring between generations leaves the KV cache slots alone."""
    engine = engines("llama_gqa")
    prompts = random_prompts(gen, 517, [11, 4])
    before = [c.token_ids for c in engine.generate(prompts, max_new_tokens=12, ignore_eos=True)]
    engine.forward(random_ids(gen, 517, 3, 50))
    after = [c.token_ids for c in engine.generate(prompts, max_new_tokens=12, ignore_eos=True)]
    assert before == after


def test_transformers4_style_config_reads_the_same(tiny_dirs, tmp_path, engines, gen):
    """A config.json in the transformers 4 layout (top-level rope_theta and rope_scaling with
    "type", no rope_parameters) gives the same model."""
    folder = copy_model_dir(tiny_dirs["llama3_tied"], tmp_path / "v4")
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {**{k: v for k, v in rope.items() if k != "rope_type"}, "type": rope["rope_type"]}
    config["torch_dtype"] = config.pop("dtype")
    (folder / "config.json").write_text(json.dumps(config))
    ids = random_ids(gen, 389, 2, 45)
    v4 = moa_engine.Engine(folder, max_batch=1, max_seq_len=64)
    assert v4.config == engines("llama3_tied").config
    assert torch.equal(v4.forward(ids), engines("llama3_tied").forward(ids))


@pytest.mark.parametrize("saved", [torch.float16, torch.bfloat16])
def test_checkpoint_dtypes(saved, tiny_dirs, tmp_path, gen):
    """float16 checkpoints run in float32 on CPU ("auto"), bfloat16 ones in bfloat16; either
    can be loaded as float32, matching HF loading the same checkpoint in float32."""
    from tiny_models import build_model, save_model
    from transformers import AutoModelForCausalLM

    folder = save_model(build_model("qwen2_bias", seed=2).to(saved), tmp_path / "half")
    assert json.loads((folder / "config.json").read_text())["dtype"] == str(saved).removeprefix("torch.")
    auto = moa_engine.Engine(folder, max_batch=1, max_seq_len=64)
    assert auto.dtype == (torch.float32 if saved == torch.float16 else torch.bfloat16)
    f32 = moa_engine.Engine(folder, dtype="float32", max_batch=1, max_seq_len=64)
    assert f32.dtype == torch.float32
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()
    ids = random_ids(gen, 613, 2, 21)
    ref = hf_logits(hf, ids)
    assert relative_error(f32.forward(ids), ref) <= FLOAT32_REL_TOL
    if saved == torch.float16:
        assert torch.equal(auto.forward(ids), f32.forward(ids))


def test_generation_up_to_max_seq_len_matches_hf(engines, hf_models, gen):
    """A prompt plus max_new_tokens that fill max_seq_len exactly (the last rope position)."""
    engine, hf = engines("mistral_window", max_seq_len=48), hf_models("mistral_window")
    prompt = random_ids(gen, 300, 40).tolist()
    [c] = engine.generate([prompt], max_new_tokens=8, ignore_eos=True)
    assert c.token_ids == hf_greedy(hf, prompt, 8)
    ids = random_ids(gen, 300, 2, 48)
    assert relative_error(engine.forward(ids), hf_logits(hf, ids)) <= FLOAT32_REL_TOL


# ---------------------------------------------------------------------------------------------
# Greedy generation against HF generate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_greedy_matches_hf_generate(name, engines, hf_models, gen):
    engine, hf = engines(name), hf_models(name)
    prompts = random_prompts(gen, engine.config["vocab_size"], [5, 23, 1, 38])
    out = engine.generate(prompts, max_new_tokens=32, ignore_eos=True)
    for prompt, completion in zip(prompts, out):
        assert completion.token_ids == hf_greedy(hf, prompt, 32), f"{name}: prompt of {len(prompt)} tokens"
        assert completion.finish_reason == "length"
        assert completion.prompt_token_ids == prompt
        assert completion.text is None  # no tokenizer in the folder


# ---------------------------------------------------------------------------------------------
# Continuous batching
# ---------------------------------------------------------------------------------------------

LENGTHS = [3, 17, 1, 29, 8, 40, 12]
NEW_TOKENS = [5, 20, 11, 3, 16, 1, 9]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("max_batch,max_prefill", [(2, 4096), (3, 30)])
@pytest.mark.parametrize("name", ["llama_gqa", "mistral_window"])
def test_continuous_batching_equals_one_at_a_time(name, max_batch, max_prefill, sampled, engines, gen):
    vocab = engines(name).config["vocab_size"]
    prompts = random_prompts(gen, vocab, LENGTHS)
    kwargs = dict(temperature=0.9, top_p=0.95, seed=1234) if sampled else {}
    batched = engines(name, max_batch=max_batch, max_prefill_tokens=max_prefill)
    reqs = [request(p, n, **kwargs) for p, n in zip(prompts, NEW_TOKENS)]
    together = batched._core.generate(reqs)
    alone = engines(name, max_batch=1)
    for i, r in enumerate(reqs):
        [single] = alone._core.generate([r])
        assert together[i].token_ids == single.token_ids, f"prompt {i} ({LENGTHS[i]} tokens)"
        assert len(single.token_ids) == NEW_TOKENS[i] and together[i].finish_reason == "length"


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed(engines, gen):
    engine = engines("qwen2_bias")
    prompts = random_prompts(gen, 613, [6, 19, 2])
    kwargs = dict(max_new_tokens=20, temperature=1.0, ignore_eos=True)
    first = [c.token_ids for c in engine.generate(prompts, seed=11, **kwargs)]
    again = [c.token_ids for c in engine.generate(prompts, seed=11, **kwargs)]
    other = [c.token_ids for c in engine.generate(prompts, seed=12, **kwargs)]
    greedy = [c.token_ids for c in engine.generate(prompts, max_new_tokens=20, ignore_eos=True)]
    assert first == again
    assert first != other
    assert first != greedy  # temperature 1 really samples
    # Seeds 0 and 2**64 - 1 are valid seeds too.
    zero = [engine.generate(prompts[:1], seed=0, **kwargs)[0].token_ids for _ in range(2)]
    assert zero[0] == zero[1]
    assert len(engine.generate(prompts[:1], seed=2**64 - 1, **kwargs)[0].token_ids) == 20


def test_seeded_sample_is_independent_of_the_batch(engines, gen):
    engine = engines("llama3_tied", max_batch=3)
    target = random_ids(gen, 389, 13).tolist()
    others = random_prompts(gen, 389, [30, 2, 7, 21])
    kwargs = dict(max_new_tokens=24, temperature=1.1, top_k=50, seed=99, ignore_eos=True)
    alone = engine.generate([target], **kwargs)[0].token_ids
    in_batch = engine.generate([others[0], others[1], target, others[2], others[3]], **kwargs)[2].token_ids
    first_in_batch = engine.generate([target] + others, **kwargs)[0].token_ids
    assert alone == in_batch == first_in_batch


def test_top_k_and_top_p_limits(engines, gen):
    """top_k=1 and a tiny top_p are greedy at any temperature; top_k >= V is no limit."""
    engine = engines("mistral_window")
    prompts = random_prompts(gen, 300, [9, 26, 3])
    kwargs = dict(max_new_tokens=25, ignore_eos=True)
    greedy = [c.token_ids for c in engine.generate(prompts, **kwargs)]
    top1 = engine.generate(prompts, temperature=1.7, top_k=1, seed=5, **kwargs)
    assert [c.token_ids for c in top1] == greedy
    tiny_p = engine.generate(prompts, temperature=1.7, top_p=1e-6, seed=5, **kwargs)
    assert [c.token_ids for c in tiny_p] == greedy
    # top_k = V and top_k > V both keep the whole vocabulary (the same samples; the
    # distribution against top_k = 0 is checked in test_first_token_follows_...).
    whole = [c.token_ids for c in engine.generate(prompts, temperature=1.2, seed=8, top_k=300, **kwargs)]
    assert whole != greedy
    beyond = engine.generate(prompts, temperature=1.2, seed=8, top_k=10**6, **kwargs)
    assert [c.token_ids for c in beyond] == whole


def reference_distribution(logits, temperature, top_k, top_p):
    """softmax(logits / temperature), restricted to the top_k, then to the nucleus (the
    smallest set of most likely tokens whose probability reaches top_p), renormalised.
    logits: [V] -> probabilities [V] float64, or None when a boundary is within 1e-3 of a
    tie (float rounding could then decide which tokens are in)."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = torch.argsort(p, descending=True)
    k = min(top_k, len(p)) if top_k > 0 else len(p)
    if k < len(p) and p[order[k - 1]] - p[order[k]] <= 1e-3 * p[order[k - 1]]:
        return None
    if top_p < 1.0:
        cum = torch.cumsum(p[order[:k]] / p[order[:k]].sum(), 0)
        k = int((cum < top_p).sum()) + 1
        if abs(float(cum[k - 1]) - top_p) <= 1e-3 or (k > 1 and abs(float(cum[k - 2]) - top_p) <= 1e-3):
            return None
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[:k]] = True
    p = torch.where(keep, p, torch.zeros_like(p))
    return p / p.sum()


def prompt_with_spread(gen, hf, vocab, temperature, top_k, top_p, length=6, tries=32):
    """A random prompt whose reference next-token distribution has at least 3 tokens (with
    clear top-k / nucleus boundaries): (prompt [length], probabilities [V])."""
    prompts = random_ids(gen, vocab, tries, length)
    logits = hf_logits(hf, prompts)[:, -1]
    for prompt, row in zip(prompts, logits):
        probs = reference_distribution(row, temperature, top_k, top_p)
        if probs is not None and int((probs > 0).sum()) >= 3:
            return prompt, probs
    raise AssertionError("no prompt with a spread-out next-token distribution")


def chi_square_p_value(counts, probs, n):
    """Pearson's chi-square goodness of fit over the tokens expected >= 5 times, the rest
    pooled in one bin. counts: [V] int, probs: [V] float64 -> p-value."""
    expected = probs * n
    big = expected >= 5
    obs, exp = counts[big].double(), expected[big]
    if expected[~big].sum() > 0:
        obs = torch.cat([obs, counts[~big].sum().double()[None]])
        exp = torch.cat([exp, expected[~big].sum()[None]])
    assert len(obs) >= 3, "too few bins for a chi-square test"
    statistic = ((obs - exp) ** 2 / exp).sum()
    dof = torch.tensor(len(obs) - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, statistic / 2))  # the chi-square survival function


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.5), (1.4, 3, 0.8), (1.0, 517, 1.0)],
)
def test_first_token_follows_the_reference_distribution(temperature, top_k, top_p, engines, hf_models, gen):
    """N seeds sample the first token of one prompt: the samples stay inside the top-k /
    nucleus of HF's logits, and their histogram fits the reference distribution (p > 1e-4;
    the seeds are fixed, so the test is deterministic)."""
    n = 2000
    engine, hf = engines("llama_gqa", max_batch=500, max_seq_len=8), hf_models("llama_gqa")
    prompt, probs = prompt_with_spread(gen, hf, 517, temperature, top_k, top_p)
    reqs = [request(prompt.tolist(), 1, temperature, seed=s, top_k=top_k, top_p=top_p) for s in range(n)]
    tokens = torch.tensor([r.token_ids[0] for r in engine._core.generate(reqs)])
    counts = torch.bincount(tokens, minlength=517)
    support = probs > 0
    outside = torch.nonzero((counts > 0) & ~support).flatten().tolist()
    assert outside == [], f"sampled outside the allowed set: {outside}"
    assert int((counts > 0).sum()) >= min(int(support.sum()), 5), "samples cover too few tokens"
    p_value = chi_square_p_value(counts, probs, n)
    assert p_value > 1e-4, f"histogram does not fit softmax (p = {p_value:.2e})"


def test_sampler_with_a_wrong_temperature_fails_the_check(engines, hf_models, gen):
    """The chi-square check has teeth: samples at temperature 1 do not fit temperature 0.8."""
    n = 2000
    engine, hf = engines("llama_gqa", max_batch=500, max_seq_len=8), hf_models("llama_gqa")
    prompt, probs = prompt_with_spread(gen, hf, 517, 0.8, 0, 1.0)
    reqs = [request(prompt.tolist(), 1, 1.0, seed=s) for s in range(n)]
    counts = torch.bincount(torch.tensor([r.token_ids[0] for r in engine._core.generate(reqs)]), minlength=517)
    assert chi_square_p_value(counts, probs, n) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_sizes_forward_and_greedy_matches_hf(dtype, tmp_path, gen):
    """Sizes that are multiples of neither 8 nor 16 (hidden 84, head_dim 14, so a RoPE half of
    7, intermediate 150, vocab 301), so every SIMD kernel level runs its tails: logits against
    HF, and greedy decoding of batches of 3 and 9 (each linear's token tiles and their rest)."""
    from tiny_models import build_model, save_model

    sizes = dict(vocab_size=301, hidden_size=84, intermediate_size=150, num_attention_heads=6, head_dim=14)
    folder = save_model(build_model("llama_gqa", seed=11, **sizes), tmp_path / "odd")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="eager").eval()
    engine = moa_engine.Engine(folder, max_batch=9, max_seq_len=MAX_SEQ_LEN, dtype=str(dtype).split(".")[1])
    ids = random_ids(gen, 301, 3, 29)
    if dtype == torch.float32:
        assert relative_error(engine.forward(ids), hf_logits(hf, ids)) <= FLOAT32_REL_TOL
        for lengths in ([5, 17, 1], [3, 9, 2, 30, 7, 12, 1, 4, 21]):
            prompts = random_prompts(gen, 301, lengths)
            out = engine.generate(prompts, max_new_tokens=10, ignore_eos=True)
            for prompt, completion in zip(prompts, out):
                assert completion.token_ids == hf_greedy(hf, prompt, 10), f"prompt of {len(prompt)} tokens"
    else:
        hf64 = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float64, attn_implementation="eager")
        ref64 = hf_logits(hf64.eval(), ids).double()
        err, hf_err = relative_error(engine.forward(ids), ref64), relative_error(hf_logits(hf, ids), ref64)
        assert err <= max(2 * hf_err, 5e-3), f"bf16 error {err:.2e}, HF bf16 error {hf_err:.2e}"
        # Decoding in batches of 3 and 9: each step's logits through the decode kernels, scored
        # against float64 HF teacher-forced on the engine's own tokens.
        for lengths in ([5, 17, 1], [3, 9, 2, 30, 7, 12, 1, 4, 21]):
            prompts = random_prompts(gen, 301, lengths)
            out = engine.generate(prompts, max_new_tokens=6, ignore_eos=True)
            for prompt, completion in zip(prompts, out):
                seq = torch.tensor([prompt + completion.token_ids])
                ref = hf_logits(hf64, seq)[0, len(prompt) - 1 : -1].double()
                chosen = ref.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
                # Each chosen token is within bfloat16 noise of float64's best.
                assert (ref.max(dim=1).values - chosen).max() <= 0.1 * ref.abs().max(), prompt


# ---------------------------------------------------------------------------------------------
# bfloat16
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_bfloat16_forward_and_greedy_are_close_to_hf(name, engines, hf_models, gen):
    engine = engines(name, dtype="bfloat16")
    assert engine.dtype == torch.bfloat16
    assert engine.weight_bytes * 2 == engines(name).weight_bytes
    vocab = engine.config["vocab_size"]
    ids = random_ids(gen, vocab, 3, 29)
    ref64 = hf_logits(hf_models(name, torch.float64), ids).double()
    hf_bf16 = hf_logits(hf_models(name, torch.bfloat16), ids)
    got = engine.forward(ids)
    assert got.dtype == torch.float32
    err, hf_err = relative_error(got, ref64), relative_error(hf_bf16, ref64)
    assert err <= max(2 * hf_err, 5e-3), f"{name}: bf16 error {err:.2e}, HF bf16 error {hf_err:.2e}"
    assert relative_error(got, hf_bf16) <= 3e-2

    # Greedy bf16 tokens: scored teacher-forced by HF (bf16 and float64) on the engine's own
    # sequence, so one rounding-decided token does not derail the rest. Where float64's top-2
    # gap is over twice HF bf16's error the choice is clear and must be float64's; elsewhere
    # most choices agree with HF bf16's.
    n = 12
    agree = clear_total = 0
    for prompt in random_prompts(gen, vocab, [7, 25, 4]):
        tokens = engine.generate([prompt], max_new_tokens=n, ignore_eos=True)[0].token_ids
        seq = torch.tensor([prompt + tokens])
        ref = hf_logits(hf_models(name, torch.float64), seq)[0, len(prompt) - 1 : -1].double()  # [n, V]
        hf_ref = hf_logits(hf_models(name, torch.bfloat16), seq)[0, len(prompt) - 1 : -1].double()
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * (hf_ref - ref).abs().max()
        chosen = torch.tensor(tokens)
        assert torch.equal(chosen[clear], ref.argmax(-1)[clear]), f"{name}: a clear greedy choice differs"
        agree += int((hf_ref.argmax(-1) == chosen).sum())
        clear_total += int(clear.sum())
    assert clear_total >= 6, "too few clear choices to check"
    assert agree >= 0.8 * 3 * n, f"{name}: {agree} of {3 * n} greedy tokens agree with HF bf16"


# ---------------------------------------------------------------------------------------------
# Stop sequences and EOS
# ---------------------------------------------------------------------------------------------


def first_end_of(tokens, seq):
    """The smallest i such that tokens[:i] ends with seq (len(tokens) when none)."""
    return next((i for i in range(len(seq), len(tokens) + 1) if tokens[i - len(seq) : i] == seq), len(tokens))


def test_stop_sequences_end_generation_right_after_they_appear(engines, gen):
    engine = engines("qwen2_bias")
    prompt = random_ids(gen, 613, 12).tolist()
    [ref] = engine._core.generate([request(prompt, 30)])
    ref = list(ref.token_ids)
    cases = [[ref[6:8]], [ref[9:10]], [[612, 611, 610], ref[3:6]], [ref[15:18], ref[20:21]]]
    for stops in cases:
        [got] = engine._core.generate([request(prompt, 30, stop=stops)])
        end = min(first_end_of(ref, s) for s in stops)
        assert end < len(ref)
        assert list(got.token_ids) == ref[:end], f"stops {stops}"
        assert got.finish_reason == "stop"
    # A stop sequence that never comes: generation runs to max_new_tokens.
    [got] = engine._core.generate([request(prompt, 30, stop=[[612, 612, 612, 612]])])
    assert list(got.token_ids) == ref and got.finish_reason == "length"


def test_stop_sequence_in_a_batch_stops_only_its_request(engines, gen):
    engine = engines("llama_gqa", max_batch=2)
    prompts = random_prompts(gen, 517, [8, 15, 4])
    refs = [list(r.token_ids) for r in engine._core.generate([request(p, 20) for p in prompts])]
    stops = [[refs[0][4:6]], [], [refs[2][10:11]]]
    got = engine._core.generate([request(p, 20, stop=s) for p, s in zip(prompts, stops)])
    for ref, s, g in zip(refs, stops, got):
        end = first_end_of(ref, s[0]) if s else 20
        assert list(g.token_ids) == ref[:end]
        assert g.finish_reason == ("stop" if s else "length")


def test_eos_stops_generation_unless_ignored(engines, tiny_dirs, tmp_path, gen):
    engine = engines("llama_gqa")
    prompt = random_ids(gen, 517, 9).tolist()
    ref = engine.generate([prompt], max_new_tokens=24, ignore_eos=True)[0].token_ids
    i = next(i for i in range(3, 24) if ref[i] not in ref[:i])  # first occurrence at i >= 3
    j = next(j for j in range(i + 1, 24) if ref[j] not in ref[:j])
    folder = copy_model_dir(tiny_dirs["llama_gqa"], tmp_path / "eos")
    # generation_config.json's eos ids take precedence over config.json's (as in HF).
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [ref[j], ref[i]]}))
    eos_engine = moa_engine.Engine(folder, max_seq_len=64)
    assert eos_engine.config["eos_token_ids"] == [ref[j], ref[i]]
    [c] = eos_engine.generate([prompt], max_new_tokens=24)
    assert c.token_ids == ref[: i + 1] and c.finish_reason == "stop"  # EOS included
    [c] = eos_engine.generate([prompt], max_new_tokens=24, ignore_eos=True)
    assert c.token_ids == ref and c.finish_reason == "length"


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints
# ---------------------------------------------------------------------------------------------


def test_sharded_checkpoint_equals_the_single_file(tiny_dirs, engines, gen):
    folder = tiny_dirs["llama_gqa_sharded"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3 and not (folder / "model.safetensors").exists()
    sharded, single = engines("llama_gqa_sharded"), engines("llama_gqa")
    ids = random_ids(gen, 517, 2, 31)
    assert torch.equal(sharded.forward(ids), single.forward(ids))
    assert sharded.weight_bytes == single.weight_bytes
    prompts = random_prompts(gen, 517, [5, 12])
    assert [c.token_ids for c in sharded.generate(prompts, max_new_tokens=10)] == [
        c.token_ids for c in single.generate(prompts, max_new_tokens=10)
    ]


# ---------------------------------------------------------------------------------------------
# The step-level scheduler (moa_engine._C.Engine)
# ---------------------------------------------------------------------------------------------


def run_steps(core, limit=200):
    """step() until idle: a list of steps, each a list of (request_id, token, finished, reason)."""
    steps = []
    while not core.idle():
        steps.append([(e.request_id, e.token, e.finished, e.finish_reason) for e in core.step()])
        assert len(steps) < limit, "the engine never became idle"
    return steps


def simulate_fifo(new_tokens, max_batch):
    """The first and last step (0-based) of each request when a finished request's slot is
    taken by the next waiting request at the very next step."""
    free_at = [0] * max_batch  # the step at which each slot is free
    spans = []
    for n in new_tokens:
        s = min(range(max_batch), key=lambda k: free_at[k])
        start = free_at[s]
        spans.append((start, start + n - 1))
        free_at[s] = start + n
    return spans


@pytest.mark.parametrize("max_batch", [2, 3])
def test_finished_slots_are_reused_at_the_next_step(tiny_dirs, engines, max_batch, gen):
    new_tokens = [2, 6, 3, 5, 4] if max_batch == 2 else [4, 1, 7, 2, 2, 5, 3]
    prompts = random_prompts(gen, 517, [7, 3, 12, 5, 9, 1, 4][: len(new_tokens)])
    core = _C.Engine(str(tiny_dirs["llama_gqa"]), max_batch=max_batch, max_seq_len=64)
    assert core.idle()
    ids = [core.submit(request(p, n)) for p, n in zip(prompts, new_tokens)]
    assert not core.idle()
    steps = run_steps(core)

    spans = {}
    tokens = {i: [] for i in ids}
    for k, events in enumerate(steps):
        assert len(events) <= max_batch, f"step {k} ran {len(events)} sequences"
        assert len({e[0] for e in events}) == len(events)
        for rid, token, finished, reason in events:
            first, _ = spans.get(rid, (k, k))
            spans[rid] = (first, k)
            tokens[rid].append(token)
            assert finished == (len(tokens[rid]) == new_tokens[ids.index(rid)])
            assert reason == ("length" if finished else None)
    assert [spans[i] for i in ids] == simulate_fifo(new_tokens, max_batch)
    assert len(steps) == max(end for _, end in simulate_fifo(new_tokens, max_batch)) + 1
    # Nobody waits for the whole batch: the third request starts while the second still runs.
    assert spans[ids[2]][0] <= spans[ids[1]][1]
    # The tokens are those of each request generated alone.
    alone = engines("llama_gqa", max_batch=1)
    for rid, p, n in zip(ids, prompts, new_tokens):
        assert tokens[rid] == list(alone._core.generate([request(p, n)])[0].token_ids)


def test_prefill_budget_admits_prompts_over_several_steps(tiny_dirs, gen):
    core = _C.Engine(str(tiny_dirs["llama_gqa"]), max_batch=4, max_seq_len=64, max_prefill_tokens=10)
    prompts = random_prompts(gen, 517, [8, 8, 2, 15, 3])
    ids = [core.submit(request(p, 30)) for p in prompts]
    started, seen = [], set()
    for _ in range(4):
        running = {e.request_id for e in core.step()}
        started.append(sorted(running - seen))
        seen |= running
    # Step 0: 8 tokens (8 more would pass 10); step 1: 8 + 2; step 2: the 15-token prompt
    # alone (over budget, but one prompt is always admitted); step 3: no slot for the last.
    assert started == [[ids[0]], [ids[1], ids[2]], [ids[3]], []]
    for rid in ids:
        core.cancel(rid)
    run_steps(core)
    assert core.idle()


def test_cancel_frees_the_slot_for_a_waiting_request(tiny_dirs, engines, gen):
    core = _C.Engine(str(tiny_dirs["mistral_window"]), max_batch=2, max_seq_len=64)
    prompts = random_prompts(gen, 300, [6, 10, 3, 8])
    a, b, c, d = (core.submit(request(p, 20)) for p in prompts)
    first = core.step()
    assert sorted(e.request_id for e in first) == [a, b]
    core.cancel(a)  # running
    core.cancel(d)  # waiting
    core.cancel(12345)  # unknown ids are ignored
    events = core.step()
    by_id = {e.request_id: e for e in events}
    assert (by_id[a].token, by_id[a].finished, by_id[a].finish_reason) == (-1, True, "cancelled")
    assert (by_id[d].token, by_id[d].finished, by_id[d].finish_reason) == (-1, True, "cancelled")
    assert not by_id[b].finished and not by_id[c].finished  # c took a's slot in this very step
    rest = run_steps(core)
    assert {e[0] for step in rest for e in step} == {b, c}
    # c's tokens are unaffected by the cancelled neighbour.
    c_tokens = [by_id[c].token] + [e[1] for step in rest for e in step if e[0] == c]
    alone = engines("mistral_window", max_batch=1)
    assert c_tokens == list(alone._core.generate([request(prompts[2], 20)])[0].token_ids)


def test_submitted_request_runs_alongside_generate(tiny_dirs, engines, gen):
    """A request submitted with submit() keeps running while generate() serves its own; its
    events come out of the next step() calls, and its tokens are as if it ran alone."""
    core = _C.Engine(str(tiny_dirs["llama_gqa"]), max_batch=3, max_seq_len=64)
    prompts = random_prompts(gen, 517, [5, 14, 9])
    rid = core.submit(request(prompts[0], 18))
    tokens = [e.token for _ in range(3) for e in core.step() if e.request_id == rid]
    core.forward(random_ids(gen, 517, 2, 30))  # scoring in between touches no slot
    results = core.generate([request(prompts[1], 6), request(prompts[2], 4)])
    tokens += [e.token for e in core.step() if e.request_id == rid]
    tokens += [e[1] for step in run_steps(core) for e in step if e[0] == rid]
    alone = engines("llama_gqa", max_batch=1)._core
    assert tokens == list(alone.generate([request(prompts[0], 18)])[0].token_ids)
    assert [list(r.token_ids) for r in results] == [
        list(alone.generate([request(p, n)])[0].token_ids) for p, n in [(prompts[1], 6), (prompts[2], 4)]
    ]


def test_calls_from_several_threads(engines, gen):
    """generate() and forward() from three threads at once (the GIL is released while the
    engine works) give the results of the same calls made one after another."""
    import threading

    engine = engines("llama_gqa", max_batch=3)
    a = random_prompts(gen, 517, [4, 19, 7])
    b = random_prompts(gen, 517, [12, 2, 9, 30])
    ids = random_ids(gen, 517, 2, 25)

    def tokens(prompts, **kwargs):
        return [c.token_ids for c in engine.generate(prompts, ignore_eos=True, **kwargs)]

    calls = {
        "greedy": lambda: tokens(a, max_new_tokens=12),
        "sampled": lambda: tokens(b, max_new_tokens=9, temperature=1.0, seed=4),
        "forward": lambda: engine.forward(ids),
    }
    want = {name: call() for name, call in calls.items()}
    got = {name: [] for name in calls}
    errors = []

    def run(name):
        try:
            for _ in range(3):
                got[name].append(calls[name]())
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert got["greedy"] == [want["greedy"]] * 3 and got["sampled"] == [want["sampled"]] * 3
    assert all(torch.equal(f, want["forward"]) for f in got["forward"]) and len(got["forward"]) == 3
    assert engine._core.idle()


def test_on_token_callback_stops_a_request(engines, gen):
    engine = engines("llama_gqa", max_batch=2)
    prompts = random_prompts(gen, 517, [4, 11, 6])
    refs = [list(r.token_ids) for r in engine._core.generate([request(p, 15) for p in prompts])]
    seen = {0: [], 1: [], 2: []}

    def on_token(index, token):
        seen[index].append(token)
        return not (index == 1 and len(seen[1]) == 5)

    got = engine._core.generate([request(p, 15) for p in prompts], on_token)
    assert [list(g.token_ids) for g in got] == [refs[0], refs[1][:5], refs[2]]
    assert [g.finish_reason for g in got] == ["length", "stop", "length"]
    assert seen == {0: refs[0], 1: refs[1][:5], 2: refs[2]}
    assert engine._core.idle()
