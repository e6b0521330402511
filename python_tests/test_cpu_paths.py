"""Every CPU execution path, whatever this machine's defaults pick.

The plan's thresholds depend on the CPU (AVX-512, native bf16 matmul), so on any one
machine some paths are idle by default. These tests rerun the correctness checks in a
subprocess with the environment knobs that force each path (read once per process):

- MOA_ENGINE_CPU_MIN_GATHER=16: an expert's scattered tokens, 16 or more, are gathered
  and run as GEMMs (the default on CPUs without AVX-512, or with AMX);
- MOA_ENGINE_CPU_ISA=portable / avx2 / avx512: each level of the decode kernels that this
  CPU has besides its default (the grouped op's small-group kernel, the dense linear for few
  tokens, attention, RMSNorm, RoPE and SiLU; the engine's checks are against HF
  transformers, test_engine.py);
- MOA_ENGINE_CPU_MIN_RUN=1000000: no token takes the GEMM-on-runs path, so long runs go
  through the small-group kernel in chunks;
- MOA_ENGINE_BF16_ISA=avx512: bfloat16 rows widened to float, not multiplied by vdpbf16ps
  (the default where the CPU has AVX512-BF16).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_quant_kernels import has_isa

import moa_engine  # noqa: F401  (loads _C)
from moa_engine import _C

ROOT = Path(__file__).resolve().parent.parent
CHECKS = "matches_reference or poisoned or grads_match or weight_grads_op or heterogeneous or rounding_contract"


def run_pytest_subset(env_overrides):
    env = dict(os.environ, **env_overrides)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        CHECKS,
        str(ROOT / "python_tests" / "test_grouped_lora.py"),
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def other_levels():
    """The CPU kernel levels this machine runs besides its default (which the rest of the suite
    runs): portable always, avx2 and avx512 where the CPU has them (the same CPU features as the
    quantized kernels' levels of those names)."""
    levels = ["portable"] + [name for name in ("avx2", "avx512") if has_isa(name)]
    return [level for level in levels if level != _C._cpu_isa()]


def level_envs():
    envs = []
    for level in other_levels():
        envs.append({"MOA_ENGINE_CPU_ISA": level})
        envs.append({"MOA_ENGINE_CPU_ISA": level, "MOA_ENGINE_CPU_MIN_GATHER": "1000000"})
    return envs


@pytest.mark.parametrize(
    "env",
    [
        {"MOA_ENGINE_CPU_MIN_GATHER": "16"},
        *level_envs(),
        {"MOA_ENGINE_CPU_MIN_RUN": "1000000"},
        {"MOA_ENGINE_BF16_ISA": "avx512"},
    ],
    ids=lambda env: ",".join(f"{k}={v}" for k, v in env.items()),
)
@pytest.mark.slow
def test_forced_path_matches_reference(env):
    result = run_pytest_subset(env)
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-25:])
    assert result.returncode == 0, f"checks failed with {env}:\n{tail}"
    assert " passed" in result.stdout and " failed" not in result.stdout, tail


@pytest.mark.slow
@pytest.mark.parametrize("level", other_levels())
def test_forced_level_transformer_kernels_match_hf(level):
    env = dict(os.environ, MOA_ENGINE_CPU_ISA=level)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "matches_hf or close_to_hf"]
    cmd.append(str(ROOT / "python_tests" / "test_engine.py"))
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-25:])
    assert result.returncode == 0, f"engine checks failed with MOA_ENGINE_CPU_ISA={level}:\n{tail}"
    assert " passed" in result.stdout and " failed" not in result.stdout, tail


def run_level_probe(value):
    code = "import moa_engine, torch\nfrom moa_engine import _C\nprint(_C._cpu_isa())\n"
    env = dict(os.environ, MOA_ENGINE_CPU_ISA=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cpu_isa_knob():
    """Each level this CPU has is taken as named; an unknown one, or one the CPU lacks, is an error
    naming the variable and the value."""
    for level in other_levels():
        result = run_level_probe(level)
        assert result.returncode == 0 and result.stdout.strip() == level, result.stderr[-2000:]
    result = run_level_probe("avx9")
    assert result.returncode != 0
    assert "MOA_ENGINE_CPU_ISA must be 'auto', 'portable', 'avx2' or 'avx512', got 'avx9'" in result.stderr
    for level, lacking in (("avx2", "AVX2/FMA/F16C"), ("avx512", "AVX-512")):
        if not has_isa(level):
            result = run_level_probe(level)
            assert result.returncode != 0 and f"MOA_ENGINE_CPU_ISA='{level}'" in result.stderr
            assert lacking in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_bad_knob_is_a_clear_error():
    code = (
        "import torch, moa_engine\n"
        "moa_engine.ops.grouped_lora(torch.randn(3, 4), torch.randn(2, 1, 4), torch.randn(2, 5, 1),"
        " torch.tensor([0, 1, 0]), torch.ones(2))\n"
    )
    env = dict(os.environ, MOA_ENGINE_CPU_MIN_GATHER="lots")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "MOA_ENGINE_CPU_MIN_GATHER must be an integer >= 1, got 'lots'" in result.stderr
