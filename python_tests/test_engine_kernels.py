"""The engine's dense linear (moa_engine._C._linear) against torch: every token count
that takes the SIMD decode kernel and the BLAS path, awkward sizes, biases, dtypes."""

import pytest
import torch

import moa_engine  # noqa: F401  (loads _C)
from moa_engine import _C

# Tolerance against the float64 product, per dtype: the kernel accumulates in float32
# and rounds once, as torch's own linear does.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}


def reference(x, w, b):
    out = x.double() @ w.double().T
    return out if b is None else out + b.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 8, 13, 31, 32, 33, 70])
@pytest.mark.parametrize("K,N", [(576, 1536), (17, 9), (80, 331), (1000, 23)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_float64(dtype, M, K, N, bias):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    got = _C._linear(x, w, b)
    assert got.dtype == dtype and got.shape == (M, N)
    want = reference(x, w, b)
    scale = want.abs().max().item()
    # The same-dtype torch result is the yardstick: within 2x its error (plus a floor).
    torch_err = (torch.nn.functional.linear(x, w, b).double() - want).abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert err <= 2 * torch_err + TOL[dtype] * scale, (err, torch_err)


def test_linear_strided_rows():
    # Rows of x with a stride (a column block of a fused projection).
    g = torch.Generator().manual_seed(7)
    big = torch.randn(6, 300, generator=g)
    x = big[:, 100:244]
    w = torch.randn(50, 144, generator=g)
    torch.testing.assert_close(_C._linear(x, w, None), x @ w.T, rtol=1e-5, atol=1e-5)


def test_linear_rejects_mismatch():
    with pytest.raises(ValueError, match="_linear"):
        _C._linear(torch.randn(2, 5), torch.randn(3, 4), None)
