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


def has_isa(name):
    """Whether this CPU runs the quantized kernel level `name` (the choice in use is kept)."""
    previous = _C._quant_isa()
    try:
        _C._set_quant_isa(name)
        return True
    except ValueError:
        return False
    finally:
        _C._set_quant_isa(previous)


def kernels_in_use(name, lacking):
    """A fixture body: the kernel level `name` for the test, or a skip naming what the CPU lacks."""
    if not has_isa(name):
        pytest.skip(f"this CPU has no {lacking}: the {name} kernels cannot run here")
    previous = _C._quant_isa()
    _C._set_quant_isa(name)
    yield
    _C._set_quant_isa(previous)


def isas():
    """The weight-only kernel paths this CPU runs: portable always, avx2 and avx512 where the
    CPU has them (the int8 and bfloat16 paths have their own tests below)."""
    return ["portable"] + [name for name in ("avx2", "avx512") if has_isa(name)]


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
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 32, 33, 70])
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
    with pytest.raises(
        ValueError,
        match="must be 'auto', 'portable', 'avx2', 'avx512', 'avx512_vnni', 'avx512_bf16' or 'weight_only', got 'avx9'",
    ):
        _C._set_quant_isa("avx9")


# ---------------------------------------------------------------------------------------------
# The int8 path (AVX512-VNNI): activations quantized per block of 32, integer dot products
# ---------------------------------------------------------------------------------------------

INT8_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1]


def has_vnni():
    return has_isa("avx512_vnni")


@pytest.fixture
def vnni():
    yield from kernels_in_use("avx512_vnni", "AVX512-VNNI")


def roundf(v):
    """C's roundf: half away from zero."""
    return np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))


def int8_reference(x, raw, qtype, k):
    """float64 [m, n]: the int8 path's arithmetic, written out in numpy: x quantized per block
    of 32 (d = max|x| / 127 in float32, q = roundf(x / d)), exact integer block dots with the
    weight blocks, scaled by d_w * d_x; Q4_1's minimum times the block's float sum of x."""
    m, nb = x.shape[0], k // 32
    xb = x.numpy().astype(np.float32).reshape(m, nb, 32)
    dx = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float32)
    inv = np.where(dx == 0, np.float32(0), np.float32(1) / np.where(dx == 0, 1, dx)).astype(np.float32)
    qx = roundf(xb * inv[..., None]).astype(np.int64)
    blocks = raw.numpy().reshape(raw.shape[0], nb, -1)
    dw = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    if qtype == Q.Q8_0:
        qw = blocks[..., 2:34].copy().view(np.int8).astype(np.int64)
    else:
        qs = blocks[..., (2 if qtype == Q.Q4_0 else 4) :].astype(np.int64)
        qw = np.concatenate([qs & 15, qs >> 4], axis=-1) - (8 if qtype == Q.Q4_0 else 0)
    dots = np.einsum("mbi,nbi->mnb", qx, qw).astype(np.float64)
    y = np.einsum("mnb,nb,mb->mn", dots, dw, dx.astype(np.float64))
    if qtype == Q.Q4_1:
        mw = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        y += np.einsum("nb,mb->mn", mw, xb.astype(np.float64).sum(-1))
    return torch.from_numpy(y)


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8])
def test_int8_path_equals_its_arithmetic(qtype, m, vnni, gen):
    n, blocks = 67, 7
    raw, k = random_rows(qtype, n, blocks, gen)
    x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4
    x[0, :32] = 0.0  # an all-zero block: d = 0
    bias = torch.randn(n, generator=gen)
    ref = int8_reference(x, raw, qtype, k) + bias.double()
    got = _C._quant_linear(x, raw, qtype.value, k, bias)
    scale = ref.abs().max().item()
    assert (got.double() - ref).abs().max().item() <= 2e-6 * scale
    # Against the weight-only result: the activations' rounding alone (|x - x_q| <= d / 2).
    w = reference(raw, qtype).double()
    exact = x.double() @ w.T + bias.double()
    assert (got.double() - exact).abs().max().item() <= 2e-2 * exact.abs().max().item()


def test_int8_path_covers_only_its_types_and_sizes(vnni, gen):
    """Q4_K and friends, and m above MOA_ENGINE_INT8_M (8), keep the float kernels: their
    results equal x @ dequantize(W)^T to float rounding."""
    for qtype, m in ((Q.Q4_K, 3), (Q.Q6_K, 1), (Q.Q8_0, 9), (Q.Q4_1, 33), (Q.F16, 2)):
        raw, k = random_rows(qtype, 40, 2, gen)
        x = torch.randn(m, k, generator=gen)
        ref = x.double() @ reference(raw, qtype).double().T
        got = _C._quant_linear(x, raw, qtype.value, k)
        assert (got.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item(), (qtype, m)


# ---------------------------------------------------------------------------------------------
# The bfloat16 path (AVX512-BF16): products of more than 4 rows with the activations and the
# dequantized weights rounded to bfloat16, vdpbf16ps into float
# ---------------------------------------------------------------------------------------------


def has_bf16_dot():
    return has_isa("avx512_bf16")


@pytest.fixture
def bf16_dot():
    yield from kernels_in_use("avx512_bf16", "AVX512-BF16")


@pytest.mark.parametrize("qtype", SERVED, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [5, 6, 19, 32])
def test_bf16_path_equals_the_rounded_product(qtype, m, bf16_dot, gen):
    """x and the dequantized W rounded to bfloat16 (to nearest even), their products summed in
    float: equal to float64 arithmetic on the rounded operands up to the order of the float
    additions. The dequantized values are the weight-only path's (tested against the gguf
    package above); rows 45 and 131 leave partial 16-row tiles and 4-row groups."""
    n = 45 if gguf.GGML_QUANT_SIZES[qtype][0] == 256 else 131
    blocks = 2 if gguf.GGML_QUANT_SIZES[qtype][0] == 256 else 5
    if qtype in (Q.F32, Q.F16, Q.BF16):
        blocks = 160  # k = 160: whole 32-element chunks
    raw, k = random_rows(qtype, n, blocks, gen)
    w = _C._dequantize(raw, qtype.value, k)
    x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4
    bias = torch.randn(n, generator=gen)
    ref = x.bfloat16().double() @ w.bfloat16().double().T + bias.double()
    got = _C._quant_linear(x, raw, qtype.value, k, bias)
    assert got.dtype == torch.float32
    scale = ref.abs().max().item()
    err = (got.double() - ref).abs().max().item()
    assert err <= 1e-5 * scale
    # The rounding is real: the float product differs by far more than the summation order.
    exact = x.double() @ w.double().T + bias.double()
    assert (got.double() - exact).abs().max().item() > 10 * max(err, 1e-7 * scale)
    assert (got.double() - exact).abs().max().item() <= 2e-2 * scale


def test_bf16_path_leaves_few_rows_and_prefill_weight_only(bf16_dot, gen):
    """1 to 4 rows (bound by reading W) and more than MOA_ENGINE_SMALL_M rows (BLAS tiles) keep
    float activations: x @ dequantize(W)^T to float rounding."""
    for qtype, m in ((Q.Q4_1, 1), (Q.Q8_0, 4), (Q.Q4_K, 2), (Q.Q4_0, 33), (Q.Q6_K, 70)):
        raw, k = random_rows(qtype, 40, 2, gen)
        x = torch.randn(m, k, generator=gen)
        ref = x.double() @ reference(raw, qtype).double().T
        got = _C._quant_linear(x, raw, qtype.value, k)
        assert (got.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item(), (qtype, m)


def test_bf16_path_on_a_cpu_without_it_is_named():
    if has_bf16_dot():
        pytest.skip("this CPU has AVX512-BF16")
    with pytest.raises(ValueError, match="avx512_bf16', but this CPU"):
        _C._set_quant_isa("avx512_bf16")
