"""GGUF files served natively: each matrix stays in the file's GGML type (weight-only
kernels, float activations), against the same file converted to float32 safetensors
(quantization=None: the gguf package's dequantizers, Q/K rows put back in HF's order).

Logits must agree to 1e-4 relative and greedy tokens must be identical, on tiny llama
(Q/K permuted, tied and untied) and qwen2 (biases) files holding every served type, and
on the default model's own Q4_1 file, with every weight-only kernel level this CPU runs
(portable, avx2, avx512).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from test_gguf_conversion import VOCAB, tokenizer_fields, write_tiny_gguf  # noqa: F401
from test_quant_kernels import isa, isas  # noqa: F401

from moa_engine import Engine, models

Q = gguf.GGMLQuantizationType
# The fp16 scale fields of the K-quant blocks (byte offsets), set to small finite values.
K_SCALES = {Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}


@pytest.fixture
def rng(gen):
    return np.random.default_rng(int(torch.randint(2**62, (), generator=gen)))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache for the conversions of the tiny files."""
    monkeypatch.setenv("MOA_ENGINE_CACHE", str(tmp_path / "cache"))


def k_quant_bytes(rng, shape, kind):
    """Random blocks of a K-quant (the numpy gguf package cannot quantize to them)."""
    elems, nbytes = gguf.GGML_QUANT_SIZES[kind]
    rows, cols = shape
    raw = rng.integers(0, 256, size=(rows, cols // elems, nbytes), dtype=np.uint8)
    for off in K_SCALES[kind]:
        scale = (rng.random((rows, cols // elems)) * 0.02 - 0.01).astype(np.float16)
        raw[:, :, off : off + 2] = scale.view(np.uint8).reshape(rows, cols // elems, 2)
    return raw.reshape(rows, -1)


def logits_agree(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


KINDS = {
    "legacy": [Q.Q8_0, Q.Q4_1, Q.F16, Q.F32, Q.Q4_0],
    "k-quants": [Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.BF16],
}


@pytest.mark.parametrize("kinds", list(KINDS), ids=str)
@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_native_equals_dequantized_float32(tmp_path, cache, tokenizer_fields, rng, gen, arch, tied, kinds, isa):  # noqa: F811
    path = write_tiny_gguf(
        tmp_path / f"tiny-{arch}.gguf",
        arch,
        tokenizer_fields,
        rng,
        tied=tied,
        hidden=256 if kinds == "k-quants" else 64,
        ff=512 if kinds == "k-quants" else 96,
        kinds=KINDS[kinds],
        raw_maker=k_quant_bytes,
    )
    native = Engine(path, max_batch=4, max_seq_len=64)
    ref = Engine(path, quantization=None, max_batch=4, max_seq_len=64)
    assert native.quantized and not ref.quantized
    same = lambda c: {k: v for k, v in c.items() if k != "torch_dtype"}  # noqa: E731
    assert same(native.config) == same(ref.config)
    ids = torch.randint(0, VOCAB, (3, 13), generator=gen)
    assert logits_agree(native.forward(ids), ref.forward(ids)) <= 1e-4
    prompts = [list(map(int, torch.randint(3, VOCAB, (n,), generator=gen))) for n in (1, 5, 17)]
    a = native.generate(prompts, max_new_tokens=12)
    b = ref.generate(prompts, max_new_tokens=12)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert native._core.weight_bytes < ref._core.weight_bytes


def test_default_model_served_from_its_q4_1_file(gen, isa):  # noqa: F811
    path = models.default_gguf_path()
    native = Engine(path, max_batch=4, max_seq_len=128)
    ref = Engine(quantization=None, max_batch=4, max_seq_len=128)  # its float32 conversion
    assert native.quantized and not ref.quantized
    assert native._core.weight_bytes <= path.stat().st_size
    ids = torch.randint(0, 49152, (2, 9), generator=gen)
    assert logits_agree(native.forward(ids), ref.forward(ids)) <= 1e-4
    prompts = ["What is the capital of France?", "Name three primary colours."]
    a = native.generate(prompts, chat=True, max_new_tokens=24)
    b = ref.generate(prompts, chat=True, max_new_tokens=24)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert "Paris" in a[0].text


def test_bad_quantization_argument():
    with pytest.raises(ValueError, match="quantization must be one of 'auto', None, 'q8_0', .*, got 'q3'"):
        Engine(models.default_gguf_path(), quantization="q3")


def test_truncated_gguf_names_the_file(tmp_path, cache, tokenizer_fields, rng):  # noqa: F811
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tokenizer_fields, rng, tied=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="tiny.gguf"):
        Engine(path)
