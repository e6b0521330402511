"""The quantized CPU kernels (weight-only: GGML block weights, float activations) against
the gguf package's reference dequantizers.

Every served type is tested on random blocks of its real bit layout (random bytes, so
every nibble, sign, high bit and packed 6-bit K-quant scale occurs; the fp16 scale
fields are set to random finite values), in awkward shapes, on every kernel path this
CPU runs. The engine's linear over a quantized matrix must equal x @ dequantize(W)^T
(float32) to 1e-5 relative on both of its paths (SIMD tiles for few rows, BLAS tiles
above MOA_ENGINE_SMALL_M), and its embedding lookup must return the dequantized rows.
"""

import gguf
import numpy as np
import pytest
import torch

from moa_engine import _C

Q = gguf.GGMLQuantizationType
SERVED = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Byte offsets of the fp16 scale fields inside one block.
FP16_FIELDS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}


def isas():
    """The kernel paths this CPU runs: portable always, avx512 where the CPU has it."""
    previous = _C._quant_isa()
    found = ["portable"]
    try:
        _C._set_quant_isa("avx512")
        found.append("avx512")
    except ValueError:
        pass
    finally:
        _C._set_quant_isa(previous)
    return found


@pytest.fixture(params=isas())
def isa(request):
    previous = _C._set_quant_isa("auto")
    _C._set_quant_isa(request.param)
    yield request.param
    _C._set_quant_isa(previous)


def random_rows(qtype, n, blocks, gen):
    """uint8 [n, row_bytes]: n rows of `blocks` random blocks of qtype, with finite scales."""
    elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    k = blocks * elems
    if qtype in (Q.F32, Q.F16, Q.BF16):
        w = torch.randn(n, k, generator=gen) * 3
        dtype = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[qtype]
        return w.to(dtype).contiguous().view(torch.uint8).reshape(n, -1), k
    raw = torch.randint(0, 256, (n, blocks, nbytes), generator=gen, dtype=torch.uint8)
    for off in FP16_FIELDS[qtype]:
        scale = (torch.rand(n, blocks, generator=gen) * 0.2 - 0.1).to(torch.float16)
        raw[:, :, off : off + 2] = scale.view(torch.uint8).reshape(n, blocks, 2)
    return raw.reshape(n, -1).contiguous(), k


def reference(raw, qtype):
    return torch.from_numpy(np.array(gguf.quants.dequantize(raw.numpy(), qtype), dtype=np.float32))


@pytest.mark.parametrize("qtype", SERVED, ids=lambda t: t.name)
@pytest.mark.parametrize("n,blocks", [(1, 1), (7, 3), (37, 2)])
def test_dequantize_equals_gguf(qtype, n, blocks, isa, gen):
    raw, k = random_rows(qtype, n, blocks, gen)
    ref = reference(raw, qtype)
    got = _C._dequantize(raw, qtype.value, k)
    assert got.shape == (n, k)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", SERVED, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 3, 5, 32, 33, 70])
def test_linear_equals_dequantized_matmul(qtype, m, isa, gen):
    n = 45 if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else 131
    blocks = 2 if gguf.GGML_QUANT_SIZES[qtype][0] == 256 else 5
    raw, k = random_rows(qtype, n, blocks, gen)
    w = reference(raw, qtype).double()
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    ref = x.double() @ w.T + bias.double()
    got = _C._quant_linear(x, raw, qtype.value, k, bias)
    assert got.dtype == torch.float32
    scale = ref.abs().max().item()
    assert (got.double() - ref).abs().max().item() <= 1e-5 * scale
    # Without a bias, and with a bfloat16 x (computed in float32, rounded once).
    torch.testing.assert_close(
        _C._quant_linear(x, raw, qtype.value, k).double(), ref - bias.double(), rtol=0, atol=1e-5 * scale
    )
    xb = x.to(torch.bfloat16)
    got_b = _C._quant_linear(xb, raw, qtype.value, k)
    assert got_b.dtype == torch.bfloat16
    ref_b = (xb.double() @ w.T).to(torch.bfloat16)
    torch.testing.assert_close(got_b.float(), ref_b.float(), rtol=1e-2, atol=1e-2 * scale)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1, Q.Q6_K], ids=lambda t: t.name)
def test_embedding_rows(qtype, isa, gen):
    raw, k = random_rows(qtype, 50, 2, gen)
    ids = torch.randint(0, 50, (17,), generator=gen)
    torch.testing.assert_close(
        _C._embedding(raw, qtype.value, k, ids), reference(raw, qtype)[ids], rtol=1e-6, atol=1e-7
    )
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        _C._embedding(raw, qtype.value, k, torch.tensor([50]))


def test_bad_input_is_named(gen):
    raw, k = random_rows(Q.Q8_0, 4, 2, gen)
    with pytest.raises(ValueError, match=r"GGML type Q2_K is not served \(served: F32, F16, BF16, Q8_0"):
        _C._dequantize(raw, Q.Q2_K.value, k)
    with pytest.raises(ValueError, match="type 77 is not served"):
        _C._dequantize(raw, 77, k)
    with pytest.raises(ValueError, match="k=48 does not match Q8_0 rows of 68 bytes"):
        _C._dequantize(raw, Q.Q8_0.value, 48)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        _C._quant_linear(torch.randn(2, 63), raw, Q.Q8_0.value, k)
    with pytest.raises(ValueError, match="must be 'auto', 'portable' or 'avx512', got 'avx9'"):
        _C._set_quant_isa("avx9")
