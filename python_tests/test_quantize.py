"""Quantizing float checkpoints: the engine's quantizers, Engine(quantization=TYPE) on load, and
GGUF files written by `moa convert --quantize TYPE`.

- Quantizers (`_C._quantize`): bit-exact against the gguf package's quantizers (F16, BF16, Q8_0,
  Q4_0, Q4_1) on random rows of awkward sizes and on edge blocks (zeros, constants, one outlier);
  Q4_K (which the gguf package cannot write) by the gguf package's dequantizer: its error stays
  below Q4_0's on the same data, and blocks of zeros stay zero.
- On load: Engine(folder, quantization=TYPE) against HF transformers holding the weights that
  the gguf package dequantizes from the same bytes (projections in TYPE, or Q8_0 / float where
  the row length does not fit; embedding and LM head in Q8_0): logits to 1e-4 relative, greedy
  tokens identical; also with LoRA experts in a mixed batch.
- Export: the file reads back with the gguf package (metadata, names, bytes), serves natively to
  the same logits as quantization on load, converts back (models.convert_gguf) to a folder HF
  agrees with, keeps the tokenizer, and loads in llama.cpp when its Python package is importable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_quant_kernels import kernels_in_use
from tiny_models import build_model, save_model

from moa_engine import _C, Engine, models
from moa_engine.gguf_export import EXPORT_TYPES, export_gguf

Q = gguf.GGMLQuantizationType
EXACT = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]
ON_LOAD = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q4_k": Q.Q4_K}
TOL = 1e-4


@pytest.fixture
def rng(gen):
    return np.random.default_rng(int(torch.randint(2**62, (), generator=gen)))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def edge_rows(k):
    """Rows whose blocks are all zero, constant, negative-only, or one outlier among zeros."""
    rows = np.zeros((5, k), dtype=np.float32)
    rows[1] = 0.75
    rows[2] = -np.linspace(0.1, 2.0, k, dtype=np.float32)
    rows[3, ::37] = 5.0
    rows[4] = np.linspace(-1.0, 1.0, k, dtype=np.float32)
    return rows


# ---------------------------------------------------------------------------------------------
# Quantizers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", EXACT, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,k", [(1, 32), (7, 96), (33, 256), (3, 4160)])
def test_quantizer_is_bit_exact_with_gguf(qtype, rows, k, rng):
    x = (rng.standard_normal((rows, k)) * rng.choice([1e-3, 0.05, 3.0])).astype(np.float32)
    x = np.concatenate([x, edge_rows(k)])
    got = _C._quantize(torch.from_numpy(x), int(qtype)).numpy()
    want = gguf.quants.quantize(x, qtype).view(np.uint8).reshape(got.shape)
    assert got.shape == (x.shape[0], k // gguf.GGML_QUANT_SIZES[qtype][0] * gguf.GGML_QUANT_SIZES[qtype][1])
    assert np.array_equal(got, want)


@pytest.mark.parametrize("rows,k", [(1, 256), (9, 768), (4, 2304)])
def test_q4_k_quantizer_error(rows, k, rng):
    x = (rng.standard_normal((rows, k)) * 0.05).astype(np.float32)
    x[:, : k // 3] *= 4.0  # sub-blocks of different spread, so the 6-bit scales matter
    raw = _C._quantize(torch.from_numpy(x), int(Q.Q4_K)).numpy()
    assert raw.shape == (rows, k // 256 * 144)
    back = gguf.quants.dequantize(raw, Q.Q4_K).reshape(rows, k)
    assert np.array_equal(back, _C._dequantize(torch.from_numpy(raw), int(Q.Q4_K), k).numpy())
    err = np.sqrt(np.mean((back - x) ** 2))
    q4_0 = gguf.quants.dequantize(gguf.quants.quantize(x, Q.Q4_0), Q.Q4_0).reshape(rows, k)
    assert err < np.sqrt(np.mean((q4_0 - x) ** 2))  # the least-squares fit beats Q4_0's max scaling
    assert err < 0.12 * np.sqrt(np.mean(x**2))
    edges = edge_rows(k)
    e_back = gguf.quants.dequantize(_C._quantize(torch.from_numpy(edges), int(Q.Q4_K)).numpy(), Q.Q4_K)
    e_back = e_back.reshape(edges.shape)
    assert np.array_equal(e_back[0], edges[0])  # zeros stay zeros
    assert np.abs(e_back - edges).max() <= 0.1 * np.abs(edges).max()


def test_quantizer_refuses_bad_input():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="cannot quantize to Q6_K"):
        _C._quantize(x, int(Q.Q6_K))
    with pytest.raises(ValueError, match="Q4_K needs rows of a multiple of 256 elements, got 64"):
        _C._quantize(x, int(Q.Q4_K))
    with pytest.raises(ValueError, match="not served"):
        _C._quantize(x, int(Q.IQ4_XS))
    with pytest.raises(ValueError, match="2-D"):
        _C._quantize(torch.randn(64), int(Q.Q8_0))


# ---------------------------------------------------------------------------------------------
# Quantize on load
# ---------------------------------------------------------------------------------------------

# hidden 256 / intermediate 512: every projection fits Q4_K. hidden 96 / intermediate 200: q/k/v,
# o and gate/up take Q8_0 under q4_k (96 % 256), and down_proj (k = 200) stays float.
SHAPES = {
    "fits": dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2),
    "awkward": dict(hidden_size=96, intermediate_size=200),
}


def fitting(qtype, k):
    for t in (qtype, Q.Q8_0):
        if k % gguf.GGML_QUANT_SIZES[t][0] == 0:
            return t
    return None


def dequantized_like_the_engine(model, qtype):
    """model with each Linear and the embedding replaced by what the engine holds: the gguf
    package's dequantization of `_C._quantize`'s bytes."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 2:
                continue
            io = "embed_tokens" in name or "lm_head" in name
            t = fitting(Q.Q8_0 if io else qtype, p.shape[1])
            if t is None:
                continue
            raw = _C._quantize(p.detach().float(), int(t)).numpy()
            p.copy_(torch.from_numpy(gguf.quants.dequantize(raw, t).reshape(p.shape).copy()))
    return model


@pytest.fixture(scope="module")
def quant_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_models")
    out = {}
    for shape, sizes in SHAPES.items():
        for name in ("llama_gqa", "qwen2_bias"):
            out[(name, shape)] = save_model(build_model(name, seed=3, **sizes), root / f"{name}-{shape}")
    return out


def hf_dequantized(folder, qtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return dequantized_like_the_engine(model, qtype)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_bias"])
@pytest.mark.parametrize("quantization", list(ON_LOAD))
def test_quantize_on_load_matches_hf_on_the_dequantized_weights(quant_dirs, name, shape, quantization, gen):
    folder = quant_dirs[(name, shape)]
    engine = Engine(folder, quantization=quantization, max_batch=4, max_seq_len=64)
    assert engine.quantized
    hf = hf_dequantized(folder, ON_LOAD[quantization])
    vocab = engine.config["vocab_size"]
    ids = torch.randint(0, vocab, (3, 11), generator=gen)
    with torch.no_grad():
        ref = hf(ids).logits
    assert rel(engine.forward(ids), ref) <= TOL
    prompt = torch.randint(3, vocab, (1, 7), generator=gen)
    with torch.no_grad():
        hf_tokens = hf.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)[0, 7:].tolist()
    got = engine.generate([prompt[0].tolist()], max_new_tokens=10, ignore_eos=True)[0].token_ids
    assert got == hf_tokens
    float_engine = Engine(folder, max_batch=4, max_seq_len=64)
    assert engine.weight_bytes < 0.5 * float_engine.weight_bytes


def test_quantize_on_load_with_experts_in_a_mixed_batch(quant_dirs, tmp_path, gen):
    """Experts stay float on a quantized base: the engine equals a float32 engine holding the
    dequantized base weights, with the same experts, request by request in one batch."""
    from moa_engine.testing import make_random_peft_adapter

    folder = quant_dirs[("llama_gqa", "fits")]
    deq = hf_dequantized(folder, Q.Q4_K)
    deq_dir = tmp_path / "dequantized"
    deq.save_pretrained(str(deq_dir))
    experts = {}
    for i in range(3):
        experts[f"e{i}"] = make_random_peft_adapter(folder, tmp_path / f"e{i}", r=4 + 4 * i, seed=i, init_scale=0.2)
    quant = Engine(folder, quantization="q4_k", experts=experts, max_batch=6, max_seq_len=64)
    ref = Engine(deq_dir, experts=experts, max_batch=6, max_seq_len=64)
    vocab = quant.config["vocab_size"]
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (3, 9, 5, 12, 1, 7)]
    domains = ["e0", "base", "e2", "e1", "e0", "e2"]
    a = quant.generate(prompts, max_new_tokens=8, domain=domains, ignore_eos=True)
    b = ref.generate(prompts, max_new_tokens=8, domain=domains, ignore_eos=True)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    ids = torch.randint(0, vocab, (2, 9), generator=gen)
    assert rel(quant.forward(ids, domain="e1"), ref.forward(ids, domain="e1")) <= TOL


@pytest.mark.parametrize("strategy", ["per_layer", "last", "vote"])
def test_routing_on_a_quantized_base(quant_dirs, tmp_path, strategy, gen):
    """A MoA directory (3 experts, random routers) on the Q4_0 base: every routing decision,
    router probability and token equals the float32 engine's on the dequantized weights."""
    from moa_engine.moa_format import MoAConfig, MoADir, RouterConfig
    from moa_engine.testing import make_random_peft_adapter

    folder = quant_dirs[("qwen2_bias", "fits")]
    deq_dir = tmp_path / "dequantized"
    hf_dequantized(folder, Q.Q4_0).save_pretrained(str(deq_dir))
    experts = {
        f"d{i}": make_random_peft_adapter(folder, tmp_path / f"d{i}", r=4, seed=i, init_scale=0.2) for i in range(3)
    }
    config = MoAConfig(base_model=str(folder), domains=list(experts), router=RouterConfig(strategy=strategy))
    hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
    router = [torch.randn(3, hidden, generator=gen) for _ in range(2)]
    moa = MoADir.save(tmp_path / "moa", config, experts=experts, router=router)
    quant = Engine(folder, quantization="q4_0", experts=moa, max_batch=4, max_seq_len=64)
    ref = Engine(deq_dir, experts=moa, max_batch=4, max_seq_len=64)
    vocab = quant.config["vocab_size"]
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (6, 11, 3, 9)]
    a = quant.generate(prompts, max_new_tokens=6, domain=None, ignore_eos=True)
    b = ref.generate(prompts, max_new_tokens=6, domain=None, ignore_eos=True)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.domain for c in a] == [c.domain for c in b]
    assert len({c.domain for c in a}) >= 1
    for x, y in zip(a, b):
        assert torch.allclose(torch.as_tensor(x.router_probs), torch.as_tensor(y.router_probs), atol=1e-4)


def test_bad_quantization_names_the_choices(quant_dirs):
    with pytest.raises(ValueError, match="quantization must be one of .*'q4_k', got 'q5_k'"):
        Engine(quant_dirs[("llama_gqa", "fits")], quantization="q5_k")


# ---------------------------------------------------------------------------------------------
# GGUF export
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A tiny llama (hidden 256) with a byte-level BPE tokenizer of 280 tokens (the model's vocab
    is 320: the export pads the token list) and a chat template."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("bpe") / "tiny-bpe"
    model = build_model(
        "llama_gqa", seed=5, hidden_size=256, intermediate_size=512, vocab_size=320, num_attention_heads=8
    )
    save_model(model, folder)
    tok = Tokenizer(tmodels.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=280, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = ["The quick brown fox jumps over the lazy dog. " * 4, "Mixture of LoRA experts, routed per layer."] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    fast.save_pretrained(str(folder))
    return folder


def read_gguf(path):
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return reader, fields


@pytest.mark.parametrize("qtype", EXPORT_TYPES)
def test_export_reads_back_with_gguf(bpe_dir, tmp_path, qtype):
    from safetensors.torch import load_file

    out = export_gguf(bpe_dir, tmp_path / f"tiny-{qtype}.gguf", qtype, progress=False)
    reader, fields = read_gguf(out)
    assert fields["general.architecture"] == "llama"
    assert fields["llama.embedding_length"] == 256 and fields["llama.block_count"] == 3
    assert fields["llama.attention.head_count"] == 8 and fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"]) == 320 and fields["tokenizer.ggml.tokens"][-1] == "[PAD319]"
    assert fields["tokenizer.ggml.eos_token_id"] == 2 and fields["tokenizer.ggml.bos_token_id"] == 1
    assert fields["tokenizer.chat_template"].startswith("{% for m in messages %}")
    assert len(fields["tokenizer.ggml.merges"]) > 0
    hf = load_file(str(bpe_dir / "model.safetensors"))
    tensors = {t.name: t for t in reader.tensors}
    want_type = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, **ON_LOAD}[qtype]
    w = hf["model.layers.1.mlp.down_proj.weight"]
    t = tensors["blk.1.ffn_down.weight"]
    assert t.tensor_type == want_type
    back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
    if want_type in (Q.F32,):
        assert np.array_equal(back, w.numpy())
    else:
        assert np.abs(back - w.numpy()).max() <= 0.15 * np.abs(w.numpy()).max()
    q = hf["model.layers.0.self_attn.q_proj.weight"]
    tq = gguf.quants.dequantize(tensors["blk.0.attn_q.weight"].data, tensors["blk.0.attn_q.weight"].tensor_type)
    assert np.allclose(models._unpermute_qk(tq.reshape(q.shape), 8), q.numpy(), atol=0.15 * q.abs().max().item())
    assert tensors["token_embd.weight"].tensor_type == (Q.Q8_0 if qtype.startswith("q4") else want_type)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_k", "f16"])
def test_exported_file_serves_like_quantize_on_load_and_converts_back(bpe_dir, tmp_path, qtype, gen, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("MOA_ENGINE_CACHE", str(tmp_path / "cache"))
    out = export_gguf(bpe_dir, tmp_path / "tiny.gguf", qtype, progress=False)
    native = Engine(out, max_batch=4, max_seq_len=64)
    ids = torch.randint(0, 320, (2, 13), generator=gen)
    if qtype in ON_LOAD:
        on_load = Engine(bpe_dir, quantization=qtype, max_batch=4, max_seq_len=64)
        assert rel(native.forward(ids), on_load.forward(ids)) <= TOL
    back = models.convert_gguf(out, tmp_path / "back", progress=False)  # the gguf package's dequantizers
    hf = AutoModelForCausalLM.from_pretrained(str(back), dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel(native.forward(ids), hf(ids).logits) <= TOL
    # The tokenizer comes from the file: the same ids as the folder's own.
    from transformers import AutoTokenizer

    mine = AutoTokenizer.from_pretrained(str(bpe_dir))
    text = "The lazy fox routed per layer."
    assert native.tokenizer.encode(text, add_special_tokens=False) == mine.encode(text, add_special_tokens=False)


def test_export_of_the_default_model_keeps_its_tokenizer(tmp_path, gen):
    out = export_gguf(None, tmp_path / "smol-q8_0.gguf", "q8_0", progress=False)
    _, fields = read_gguf(out)
    _, source = read_gguf(models.default_gguf_path())
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.chat_template", "tokenizer.ggml.eos_token_id"):
        assert fields[key] == source[key]
    assert fields["tokenizer.ggml.tokens"] == source["tokenizer.ggml.tokens"]
    engine = Engine(out, max_batch=2, max_seq_len=128)
    # The same bytes: Q8_0 of the float32 conversion's (dequantized Q4_1) weights, on load.
    on_load = Engine(models.default_model_dir(), quantization="q8_0", max_batch=2, max_seq_len=128)
    ids = torch.randint(0, 49152, (1, 9), generator=gen)
    assert rel(engine.forward(ids), on_load.forward(ids)) <= TOL
    done = engine.generate(["What is the capital of France?"], chat=True, max_new_tokens=12)[0]
    assert "Paris" in done.text


def test_moa_convert_quantize_cli(bpe_dir, tmp_path):
    out = tmp_path / "cli.gguf"
    cmd = [sys.executable, "-m", "moa_engine.cli", "convert", str(bpe_dir), "--quantize", "q4_0", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out) and out.is_file()
    bad = subprocess.run(
        cmd[:-4] + ["--quantize", "q4_0", "--out", str(tmp_path / "x.bin")], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "must end in .gguf" in bad.stderr
    bad = subprocess.run(cmd[:-4] + ["--quantize", "q2_k"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    assert not list(tmp_path.glob(".cli.gguf.*"))  # no temporary file left behind


def test_export_refuses_what_it_cannot_write(tmp_path, bpe_dir):
    with pytest.raises(ValueError, match="quantize type must be one of"):
        export_gguf(bpe_dir, tmp_path / "x.gguf", "q6_k", progress=False)
    bad = tmp_path / "not-bpe"
    save_model(build_model("llama_gqa", seed=1), bad)
    (bad / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}, "decoder": None}))
    with pytest.raises(ValueError, match="byte-level BPE"):
        export_gguf(bad, tmp_path / "y.gguf", "q8_0", progress=False)
    assert not list(tmp_path.glob(".y.gguf.*"))


def llama_cpp_tool(name):
    """A llama.cpp program from $LLAMA_CPP_BIN_DIR or PATH, or None."""
    folder = os.environ.get("LLAMA_CPP_BIN_DIR")
    if folder and (Path(folder) / name).is_file():
        return str(Path(folder) / name)
    return shutil.which(name)


def test_llama_cpp_loads_the_exported_file(bpe_dir, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    out = export_gguf(bpe_dir, tmp_path / "tiny-f32.gguf", "f32", progress=False)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=2, verbose=False, logits_all=True)
    prompt = [5, 17, 40, 99, 3]
    llm.eval(prompt)
    theirs = torch.tensor(np.array(llm.scores[len(prompt) - 1]))
    ours = Engine(out, max_batch=1, max_seq_len=64).forward(torch.tensor([prompt]))[0, -1]
    assert rel(ours, theirs) <= 1e-3


@pytest.mark.skipif(llama_cpp_tool("llama-completion") is None, reason="llama.cpp's llama-completion not found")
def test_llama_cpp_generates_our_greedy_text_from_the_exported_file(tmp_path):
    """The default model exported in F32: llama.cpp's greedy text equals ours (float dot
    products on both sides; its quantized types also quantize the activations, so they may
    part at near-ties)."""
    out = export_gguf(None, tmp_path / "smol-f32.gguf", "f32", progress=False)
    prompt = "The capital of France is"
    cmd = [llama_cpp_tool("llama-completion"), "-m", str(out), "-t", "2", "-p", prompt, "-n", "24", "--temp", "0"]
    done = subprocess.run(cmd + ["-no-cnv"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = Engine(out, max_batch=1, max_seq_len=64).generate([prompt], max_new_tokens=24)[0].text
    assert done.stdout.strip() == (prompt + ours).strip()


# ---------------------------------------------------------------------------------------------
# The int8 path in the engine (AVX512-VNNI CPUs: decode rows of Q8_0 / Q4_0 / Q4_1 matrices)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def int8_kernels():
    yield from kernels_in_use("avx512_vnni", "AVX512-VNNI")


def test_int8_path_on_the_default_model(int8_kernels, gen):
    """Rows of up to MOA_ENGINE_INT8_M (8) tokens take the int8 kernels: a 6-token forward's
    logits differ from the weight-only ones (the activations' rounding: up to ~11% of the
    largest logit on this model, whose first positions carry outlier activations) but mostly
    pick the same next token; 9 tokens and more are weight-only, to float rounding. (Greedy
    decoding on the int8 path no longer answers the README's question with Paris: one
    reason the path is opt-in.)"""
    engine = Engine(max_batch=2, max_seq_len=128)
    short = torch.randint(0, 49152, (1, 6), generator=gen)
    long = torch.randint(0, 49152, (1, 9), generator=gen)
    int8_short, int8_long = engine.forward(short), engine.forward(long)
    _C._set_quant_isa("weight_only")
    float_short, float_long = engine.forward(short), engine.forward(long)
    _C._set_quant_isa("avx512_vnni")
    assert 0 < rel(int8_short, float_short) <= 0.25
    assert (int8_short.argmax(-1) == float_short.argmax(-1)).float().mean() >= 0.5
    assert rel(int8_long, float_long) <= TOL


def test_int8_path_with_experts_in_a_mixed_batch(quant_dirs, tmp_path, int8_kernels, gen):
    """LoRA experts on a base served by the int8 kernels: each request's logits stay within 10%
    of the weight-only engine's (the activations' rounding), with its own expert."""
    from moa_engine.testing import make_random_peft_adapter

    folder = quant_dirs[("llama_gqa", "fits")]
    experts = {
        f"e{i}": make_random_peft_adapter(folder, tmp_path / f"e{i}", r=8, seed=i, init_scale=0.2) for i in range(2)
    }
    engine = Engine(folder, quantization="q4_0", experts=experts, max_batch=4, max_seq_len=64)
    ids = torch.randint(0, engine.config["vocab_size"], (3, 2), generator=gen)  # 6 rows <= MOA_ENGINE_INT8_M
    domains = ["e0", "base", "e1"]
    got = engine.forward(ids, domain=domains)
    _C._set_quant_isa("weight_only")
    ref = engine.forward(ids, domain=domains)
    _C._set_quant_isa("avx512_vnni")
    assert 0 < rel(got, ref) <= 0.1
    for b, d in enumerate(domains):  # each row carries its own expert: not the others'
        other = engine.forward(ids[b : b + 1], domain="e1" if d != "e1" else "e0")
        assert rel(got[b : b + 1], other) > 2 * rel(got[b : b + 1], ref[b : b + 1])


# ---------------------------------------------------------------------------------------------
# The bfloat16 path in the engine (AVX512-BF16 CPUs: products of 5 to MOA_ENGINE_SMALL_M rows)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def bf16_kernels():
    yield from kernels_in_use("avx512_bf16", "AVX512-BF16")


def test_bf16_path_on_the_default_model(bf16_kernels, gen):
    """A 6- or 20-token forward takes the bfloat16 kernels: its logits differ from the
    weight-only ones by the rounding (about 0.5% of their norm on this model) and pick the same
    next token at most positions; 3 tokens stay weight-only, to float rounding. Greedy decoding
    of a batch of 8 (decode steps of 8 rows) still answers the README's question."""
    engine = Engine(max_batch=8, max_seq_len=128)
    few = torch.randint(0, 49152, (1, 3), generator=gen)
    for n in (6, 20):
        ids = torch.randint(0, 49152, (1, n), generator=gen)
        got = engine.forward(ids)
        _C._set_quant_isa("weight_only")
        ref = engine.forward(ids)
        _C._set_quant_isa("avx512_bf16")
        assert 0 < (got - ref).norm().item() <= 0.02 * ref.norm().item()
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.7
    got_few = engine.forward(few)
    _C._set_quant_isa("weight_only")
    ref_few = engine.forward(few)
    _C._set_quant_isa("avx512_bf16")
    assert rel(got_few, ref_few) <= TOL
    done = engine.generate(["What is the capital of France?"] * 8, max_new_tokens=12, chat=True)
    assert all("Paris" in c.text for c in done), [c.text for c in done]


def test_bf16_path_with_experts_in_a_mixed_batch(quant_dirs, tmp_path, bf16_kernels, gen):
    """LoRA experts on a base served by the bfloat16 kernels: each request's logits stay within
    2% of the weight-only engine's, with its own expert."""
    from moa_engine.testing import make_random_peft_adapter

    folder = quant_dirs[("llama_gqa", "fits")]
    experts = {
        f"e{i}": make_random_peft_adapter(folder, tmp_path / f"e{i}", r=8, seed=i, init_scale=0.2) for i in range(2)
    }
    engine = Engine(folder, quantization="q4_0", experts=experts, max_batch=4, max_seq_len=64)
    ids = torch.randint(0, engine.config["vocab_size"], (3, 3), generator=gen)  # 9 rows: the bfloat16 kernels
    domains = ["e0", "base", "e1"]
    got = engine.forward(ids, domain=domains)
    _C._set_quant_isa("weight_only")
    ref = engine.forward(ids, domain=domains)
    _C._set_quant_isa("avx512_bf16")
    assert 0 < rel(got, ref) <= 0.02
    for b, d in enumerate(domains):  # each row carries its own expert: not the others'
        other = engine.forward(ids[b : b + 1], domain="e1" if d != "e1" else "e0")
        assert rel(got[b : b + 1], other) > 2 * rel(got[b : b + 1], ref[b : b + 1])
