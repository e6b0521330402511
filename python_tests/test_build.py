"""The build's CUDA switch (setup.py, MOA_ENGINE_CUDA=0|1|auto) and the CPU-only import."""

import importlib.util
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


def test_build_imports_and_registers_the_ops():
    for name in ("grouped_lora", "grouped_lora_add_", "_grouped_lora_generic", "_grouped_lora_weight_grads"):
        assert hasattr(torch.ops.moa, name), name
    for name in ("grouped_lora", "grouped_lora_add_", "_grouped_lora_weight_grads"):  # the CPU kernels
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moa::{name}", "CPU"), name


def test_built_with_cuda_tells_whether_cuda_kernels_are_registered():
    """built_with_cuda() is True exactly when the CUDA sources were compiled in, which
    registers the op's CUDA kernels; a torch without CUDA cannot have built them."""
    registered = torch._C._dispatch_has_kernel_for_dispatch_key("moa::grouped_lora", "CUDA")
    assert moa_engine.built_with_cuda() is registered
    if torch.version.cuda is None:
        assert moa_engine.built_with_cuda() is False


@pytest.mark.slow
def test_bad_cuda_switch_is_refused_with_the_reason():
    result = run_setup("yes")
    assert result.returncode != 0
    assert "MOA_ENGINE_CUDA must be 0, 1 or auto, got 'yes'" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA")
def test_forcing_cuda_without_cuda_torch_is_refused():
    result = run_setup("1")
    assert result.returncode != 0
    assert "MOA_ENGINE_CUDA=1 but the installed torch has no CUDA" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("value", ["0", "auto"])
def test_cpu_only_and_auto_configure(value):
    result = run_setup(value)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "moa_engine"


def load_setup_module():
    """setup.py as a module: its helpers without running setup() (guarded by __main__)."""
    spec = importlib.util.spec_from_file_location("moa_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_arch_list_defaults_when_no_gpu_is_visible():
    setup_py = load_setup_module()
    default = setup_py.DEFAULT_CUDA_ARCHS
    archs = default.split(";")
    assert "8.0+PTX" in archs and "9.0a" in archs  # sm_80 with PTX, and Hopper's sm_90a
    for env in (None, "", "  ", "native"):
        assert setup_py.cuda_arch_list(env, visible_devices=0) == default, env
        assert setup_py.cuda_arch_list(env, visible_devices=2) is None, env  # torch builds for them
    for env in ("8.0", "9.0a;10.0+PTX"):
        assert setup_py.cuda_arch_list(env, visible_devices=0) is None  # the user's choice stands
        assert setup_py.cuda_arch_list(env, visible_devices=1) is None


def test_default_cuda_archs_are_ones_torch_accepts(monkeypatch):
    """torch turns the default set into nvcc flags (no device needed once the list is set)."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    setup_py = load_setup_module()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", setup_py.DEFAULT_CUDA_ARCHS)
    flags = _get_cuda_arch_flags()
    for want in ("arch=compute_80,code=sm_80", "arch=compute_80,code=compute_80", "arch=compute_90a,code=sm_90a"):
        assert any(want in flag for flag in flags), (want, flags)


def test_configure_cuda_archs_sets_and_announces_the_default(monkeypatch, capsys):
    setup_py = load_setup_module()
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(setup_py.torch.cuda, "device_count", lambda: 0)
    setup_py.configure_cuda_archs()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == setup_py.DEFAULT_CUDA_ARCHS
    assert f"building the CUDA kernels for {setup_py.DEFAULT_CUDA_ARCHS}" in capsys.readouterr().err
