"""The engine's dense linear (moa_engine._C._linear) against torch: every token count
that takes the SIMD decode kernel and the BLAS path, awkward sizes, biases, dtypes; and its
knob MOA_ENGINE_SMALL_M (read once per process, so each value runs in a subprocess)."""

import os
import subprocess
import sys

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


def bf16_isas():
    """The bfloat16 decode paths this CPU runs: avx512 (widened to float) always, avx512_bf16
    (vdpbf16ps) where the CPU has AVX512-BF16."""
    found = ["avx512"]
    previous = _C._bf16_isa()
    try:
        found.append(_C._set_bf16_isa("avx512_bf16"))
    except ValueError:
        pass
    finally:
        _C._set_bf16_isa(previous)
    return found


@pytest.fixture(params=bf16_isas())
def bf16_isa(request):
    previous = _C._set_bf16_isa(request.param)
    assert previous == request.param
    yield request.param
    _C._set_bf16_isa("auto")


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9, 32])
@pytest.mark.parametrize("K,N", [(576, 1536), (17, 9), (33, 70), (64, 8), (1000, 23)])
def test_bf16_linear_accumulates_in_float_and_rounds_once(bf16_isa, M, K, N):
    """Every bfloat16 path: exact products, float sums, one rounding to bfloat16. So against
    the float64 product of the same bfloat16 values, each output is off by at most half a
    bfloat16 ulp plus the float summation error (K * 2^-24 of sum |x w|)."""
    g = torch.Generator().manual_seed(M * 7919 + K * 31 + N)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(torch.bfloat16)
    b = torch.randn(N, generator=g).to(torch.bfloat16)
    got = _C._linear(x, w, b).double()
    want = x.double() @ w.double().T + b.double()
    magnitude = x.double().abs() @ w.double().abs().T + b.double().abs()
    bound = 2.0**-8 * want.abs() * 1.001 + (K + 1) * 2.0**-24 * magnitude * 1.01
    excess = ((got - want).abs() - bound).max().item()
    assert excess <= 0, (bf16_isa, excess)


def test_bf16_isa_knob_names_the_bad_value():
    with pytest.raises(ValueError, match="bfloat16 ISA must be 'auto', 'avx512' or 'avx512_bf16', got 'avx9'"):
        _C._set_bf16_isa("avx9")
    if "avx512_bf16" not in bf16_isas():
        with pytest.raises(ValueError, match="no AVX512-BF16"):
            _C._set_bf16_isa("avx512_bf16")
    code = "import moa_engine, torch\nfrom moa_engine import _C\nprint(_C._bf16_isa())\n"
    env = dict(os.environ, MOA_ENGINE_BF16_ISA="avx9")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "MOA_ENGINE_BF16_ISA must be 'auto', 'avx512' or 'avx512_bf16', got 'avx9'" in result.stderr
    env["MOA_ENGINE_BF16_ISA"] = "avx512"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "avx512", result.stderr[-2000:]


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


def run_with_small_m(value, code):
    env = dict(os.environ, MOA_ENGINE_SMALL_M=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("bad", ["lots", "-1", "16x", "3.5", "99999999999999999999"])
def test_small_m_knob_bad_value_is_a_clear_error(bad, tmp_path):
    """A bad MOA_ENGINE_SMALL_M is a ValueError naming the variable, the value and what is
    expected: when an engine is built (before any forward) and at the linear itself."""
    from tiny_models import build_model, save_model

    folder = save_model(build_model("llama_gqa", seed=3), tmp_path / "model")
    code = (
        "import torch, moa_engine\n"
        "from moa_engine import _C\n"
        "g = torch.Generator().manual_seed(5)\n"
        f"calls = [lambda: moa_engine.Engine({str(folder)!r}, max_seq_len=32),\n"
        "         lambda: _C._linear(torch.randn(3, 8, generator=g), torch.randn(4, 8, generator=g), None)]\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as e:\n"
        "        print('ValueError:', e)\n"
        "    else:\n"
        "        print('no error')\n"
    )
    result = run_with_small_m(bad, code)
    assert result.returncode == 0, result.stderr[-2000:]
    want = f"ValueError: MOA_ENGINE_SMALL_M must be an integer >= 0 (0: always BLAS), got '{bad}'"
    assert result.stdout.splitlines() == [want, want], result.stdout


@pytest.mark.parametrize("value", ["0", "1", "1000", ""])
def test_small_m_knob_good_values_give_the_same_linear(value):
    """0 (always BLAS), 1, 1000 (the SIMD kernel, where the CPU has it, for every M below) and
    "" (unset: the default 32) are accepted, and every M still matches float64."""
    code = (
        "import torch\n"
        "from moa_engine import _C\n"
        "g = torch.Generator().manual_seed(11)\n"
        "for M in (1, 2, 33, 70):\n"
        "    x, w = torch.randn(M, 80, generator=g), torch.randn(29, 80, generator=g)\n"
        "    b = torch.randn(29, generator=g)\n"
        "    want = x.double() @ w.double().T + b.double()\n"
        "    err = (_C._linear(x, w, b).double() - want).abs().max().item()\n"
        "    assert err <= 1e-4 * want.abs().max().item(), (M, err)\n"
        "print('ok')\n"
    )
    result = run_with_small_m(value, code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
