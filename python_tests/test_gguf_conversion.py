"""GGUF -> safetensors conversion on tiny GGUF files written by the gguf package.

Each file carries random weights in GGUF's layout (a mix of F32, F16, Q8_0 and Q4_1 tensors)
and a cut of the default model's real tokenizer. The reference is HF transformers' own GGUF
loader (`from_pretrained(gguf_file=...)`, which needs accelerate, a test-only dependency):
the converted folder must load into the same weights, bit for bit, for both layouts the
engine serves: llama (Q and K rows permuted by llama.cpp) and qwen2 (not permuted, with biases).
"""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moa_engine import models

Q = gguf.GGMLQuantizationType
VOCAB = 400


@pytest.fixture(scope="module")
def tokenizer_fields():
    """The first VOCAB tokens of the default model's tokenizer, with the merges among them."""
    fields = gguf.GGUFReader(models.default_gguf_path()).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()[:VOCAB]
    types = fields["tokenizer.ggml.token_type"].contents()[:VOCAB]
    vocab = set(tokens)
    merges = [
        m
        for m in fields["tokenizer.ggml.merges"].contents()
        if m.replace(" ", "") in vocab and all(p in vocab for p in m.split(" "))
    ]
    return dict(tokens=tokens, types=types, merges=merges, chat_template=fields["tokenizer.chat_template"].contents())


def write_tiny_gguf(
    path, arch, tok, rng, *, tied, layers=2, hidden=64, heads=4, kv_heads=2, ff=96, drop=(), kinds=None, raw_maker=None
):
    """A tiny `arch` model as a GGUF file at `path`; tensors named in `drop` are left out.
    Matrices cycle through `kinds` (default Q8_0, Q4_1, F16, F32); vectors are F32. Types the
    gguf package cannot quantize to take raw_maker(rng, shape, kind)'s bytes."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(1000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(VOCAB)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tok["chat_template"])

    kinds = kinds or [Q.Q8_0, Q.Q4_1, Q.F16, Q.F32]
    head_dim = hidden // heads

    def add(name, shape):
        if name in drop:
            return
        data = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 1:
            writer.add_tensor(name, (1 + 0.1 * data) if "norm" in name else data)
            return
        kind = kinds[add.count % len(kinds)]
        add.count += 1
        if kind == Q.F16:
            writer.add_tensor(name, data.astype(np.float16))
        elif kind == Q.F32:
            writer.add_tensor(name, data)
        elif kind in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            writer.add_tensor(name, raw_maker(rng, shape, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)

    add.count = 0
    add("token_embd.weight", (VOCAB, hidden))
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,))
        add(f"blk.{i}.attn_q.weight", (heads * head_dim, hidden))
        add(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden))
        if arch == "qwen2":
            add(f"blk.{i}.attn_q.bias", (heads * head_dim,))
            add(f"blk.{i}.attn_k.bias", (kv_heads * head_dim,))
            add(f"blk.{i}.attn_v.bias", (kv_heads * head_dim,))
        add(f"blk.{i}.attn_output.weight", (hidden, heads * head_dim))
        add(f"blk.{i}.ffn_norm.weight", (hidden,))
        add(f"blk.{i}.ffn_gate.weight", (ff, hidden))
        add(f"blk.{i}.ffn_up.weight", (ff, hidden))
        add(f"blk.{i}.ffn_down.weight", (hidden, ff))
    add("output_norm.weight", (hidden,))
    if not tied:
        add("output.weight", (VOCAB, hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def rng(gen):
    """A numpy generator seeded from the suite's seeded torch generator."""
    return np.random.default_rng(int(torch.randint(2**62, (), generator=gen)))


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_converted_folder_equals_hf_gguf_loader(tmp_path, tokenizer_fields, rng, gen, arch, tied):
    path = write_tiny_gguf(tmp_path / f"tiny-{arch}.gguf", arch, tokenizer_fields, rng, tied=tied)
    out = models.convert_gguf(path, tmp_path / "out", progress=False)

    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(got) is type(ref)
    assert got.config.tie_word_embeddings is tied
    want, have = ref.state_dict(), got.state_dict()
    assert have.keys() == want.keys()
    for name in want:
        assert torch.equal(have[name], want[name]), name

    ids = torch.randint(0, VOCAB, (2, 11), generator=gen)
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)
    ref_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    got_tok = AutoTokenizer.from_pretrained(out)
    for text in ("hello there", "def f(x): return x", ""):
        assert got_tok(text).input_ids == ref_tok(text).input_ids, text


def test_missing_weight_is_named(tmp_path, tokenizer_fields, rng):
    path = write_tiny_gguf(
        tmp_path / "tiny.gguf", "llama", tokenizer_fields, rng, tied=False, drop={"blk.1.ffn_up.weight"}
    )
    with pytest.raises(ValueError, match=r"lacks 1 weights .*model\.layers\.1\.mlp\.up_proj\.weight"):
        models.convert_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_wrong_shape_is_named(tmp_path, tokenizer_fields, rng, monkeypatch):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tokenizer_fields, rng, tied=False)
    real = models._hf_weight_shapes

    def one_shape_off(config):
        shapes = real(config)
        shapes["model.layers.0.mlp.down_proj.weight"] = (64, 95)
        return shapes

    monkeypatch.setattr(models, "_hf_weight_shapes", one_shape_off)
    with pytest.raises(
        ValueError,
        match=r"blk\.0\.ffn_down\.weight \(model\.layers\.0\.mlp\.down_proj\.weight\) has shape \[64, 96\], expected \[64, 95\]",
    ):
        models.convert_gguf(path, tmp_path / "out", progress=False)


def test_unsupported_architecture_is_refused(tmp_path, tokenizer_fields, rng):
    """A Qwen3 file: HF reads its config, but the engine serves no such architecture."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen3", tokenizer_fields, rng, tied=True)
    with pytest.raises(ValueError, match=r"GGUF architecture 'qwen3' is not supported; expected one of llama, qwen2"):
        models.convert_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


HIDE_TEST_EXTRAS = """
import sys
for name in ("accelerate", "peft"):  # find_spec() answers None for these: as if not installed
    sys.modules[name] = None
"""


@pytest.mark.slow
def test_conversion_needs_only_the_install_requirements(tmp_path, tokenizer_fields, rng):
    """The conversion runs where accelerate and peft (test extras) are missing, where HF's
    own GGUF model loader refuses to run."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tokenizer_fields, rng, tied=True)
    convert = (
        f"from moa_engine import models; models.convert_gguf({str(path)!r}, {str(tmp_path / 'out')!r}, progress=False)"
    )
    hf_load = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, gguf_file='tiny.gguf')"
    ours = subprocess.run(
        [sys.executable, "-c", HIDE_TEST_EXTRAS + convert], capture_output=True, text=True, timeout=300
    )
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert models.is_complete(tmp_path / "out")
    theirs = subprocess.run(
        [sys.executable, "-c", HIDE_TEST_EXTRAS + hf_load], capture_output=True, text=True, timeout=300
    )
    assert theirs.returncode != 0 and "accelerate is required" in theirs.stderr, theirs.stderr[-3000:]
