"""The build's CUDA switch (setup.py, MOA_ENGINE_CUDA=0|1|auto) and the CPU-only import."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moa_engine

ROOT = Path(__file__).resolve().parent.parent


def run_setup(value):
    env = dict(os.environ, MOA_ENGINE_CUDA=value)
    return subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_cpu_build_imports_and_registers_the_ops():
    assert moa_engine.built_with_cuda() in (True, False)
    for name in ("grouped_lora", "grouped_lora_add_", "_grouped_lora_generic", "_grouped_lora_weight_grads"):
        assert hasattr(torch.ops.moa, name), name


def test_bad_cuda_switch_is_refused_with_the_reason():
    result = run_setup("yes")
    assert result.returncode != 0
    assert "MOA_ENGINE_CUDA must be 0, 1 or auto, got 'yes'" in result.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA")
def test_forcing_cuda_without_cuda_torch_is_refused():
    result = run_setup("1")
    assert result.returncode != 0
    assert "MOA_ENGINE_CUDA=1 but the installed torch has no CUDA" in result.stderr


@pytest.mark.parametrize("value", ["0", "auto"])
def test_cpu_only_and_auto_configure(value):
    result = run_setup(value)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "moa_engine"
