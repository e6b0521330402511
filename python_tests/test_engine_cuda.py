"""The engine on a GPU (Engine(device="cuda"), the CUDA backend) against the CPU engine, the
reference backend on the same GPU, and HF / PEFT on the GPU.

- float32 (TF32 off): logits within 1e-4 relative of the CPU engine and of HF + PEFT on CUDA,
  on every tiny architecture, with experts mixed with the base in one forward;
- greedy tokens identical to the CPU engine, with continuous batching, mixed batches and every
  routing strategy;
- decode attention over contexts longer than one split-K chunk (512 keys) and a sliding window;
- bfloat16: the CUDA backend's error against float32 within twice the reference backend's;
- hot changes: an expert added, removed and re-added while requests run.

Skipped without a CUDA device or on a build without CUDA. benchmarks/gpu_check.sh runs it.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_backends import experts, make_request, relative_error  # noqa: F401  (experts: a fixture)
from tiny_models import VARIANTS, tiny_dirs  # noqa: F401  (fixture)

import moa_engine
from moa_engine import _C
from moa_engine.moa_format import MoAConfig, MoADir, RouterConfig

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not _C.built_with_cuda(), reason="moa_engine was built without CUDA"),
]

ARCHS = list(VARIANTS)
FLOAT32_REL_TOL = 1e-4
MAX_SEQ_LEN = 1200  # room for the split-K case


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def engine(folder, device, **kw):
    return moa_engine.Engine(folder, device=device, max_seq_len=MAX_SEQ_LEN, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_cpu_and_peft_on_cuda(arch, tiny_dirs, experts, gen):
    dirs = experts(arch)
    gpu = engine(tiny_dirs[arch], "cuda", experts=dirs, max_batch=3)
    assert gpu.backend == "cuda" and gpu.device == "cuda"
    cpu = engine(tiny_dirs[arch], "cpu", experts=dirs, max_batch=3)
    ids = torch.randint(0, VARIANTS[arch][1]["vocab_size"], (3, 21), generator=gen)
    domains = ["r4", "base", "attn_r8"]
    got = gpu.forward(ids, domain=domains)
    assert relative_error(got, cpu.forward(ids, domain=domains)) <= FLOAT32_REL_TOL

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], torch_dtype=torch.float32).cuda().eval()
    peft = PeftModel.from_pretrained(base, dirs["r4"], adapter_name="r4").eval()
    with torch.no_grad():
        want = peft(ids[:1].cuda()).logits[0]
    assert relative_error(got[0], want) <= FLOAT32_REL_TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_equal_cpu_with_continuous_batching(arch, tiny_dirs, experts, gen):
    dirs = experts(arch)
    V = VARIANTS[arch][1]["vocab_size"]
    requests = [
        make_request(torch.randint(0, V, (n,), generator=gen).tolist(), d)
        for n, d in zip([3, 11, 1, 17, 6], ["r4", "base", "r16_rslora", "attn_r8", "r4"])
    ]
    got = [r.token_ids for r in engine(tiny_dirs[arch], "cuda", experts=dirs, max_batch=2)._core.generate(requests)]
    want = [r.token_ids for r in engine(tiny_dirs[arch], "cpu", experts=dirs, max_batch=2)._core.generate(requests)]
    assert got == want


@pytest.mark.parametrize("strategy", ["per_layer", "last", "vote"])
def test_routing_equals_cpu(strategy, tiny_dirs, experts, tmp_path, gen):
    folder = tiny_dirs["llama_gqa"]
    dirs = experts("llama_gqa")
    cfg = VARIANTS["llama_gqa"][1]
    g = torch.Generator().manual_seed(5)
    router = [torch.randn(len(dirs), cfg["hidden_size"], generator=g) for _ in range(cfg["num_hidden_layers"])]
    path = tmp_path / "moa"
    config = MoAConfig(base_model=os.path.relpath(folder, path), domains=list(dirs), router=RouterConfig())
    MoADir.save(path, config, experts=dirs, router=router)
    prompts = [torch.randint(0, cfg["vocab_size"], (n,), generator=gen).tolist() for n in (5, 13, 2, 9)]
    runs = [
        moa_engine.Engine(experts=path, device=d, max_batch=3, routing=strategy, max_seq_len=64).generate(
            prompts, max_new_tokens=8, ignore_eos=True
        )
        for d in ("cuda", "cpu")
    ]
    assert [c.token_ids for c in runs[0]] == [c.token_ids for c in runs[1]]
    assert [c.layer_domains for c in runs[0]] == [c.layer_domains for c in runs[1]]


@pytest.mark.parametrize("arch", ["llama_gqa", "mistral_window"])
def test_split_k_decode_over_long_contexts(arch, tiny_dirs, experts, gen):
    # 700 prompt tokens: two split-K chunks of 512 keys; mistral's window of 8 cuts them.
    dirs = experts(arch)
    prompt = torch.randint(0, VARIANTS[arch][1]["vocab_size"], (700,), generator=gen).tolist()
    requests = [make_request(prompt, "r16_rslora", 6), make_request(prompt[:3], "base", 6)]
    got = [r.token_ids for r in engine(tiny_dirs[arch], "cuda", experts=dirs, max_batch=2)._core.generate(requests)]
    want = [r.token_ids for r in engine(tiny_dirs[arch], "cpu", experts=dirs, max_batch=2)._core.generate(requests)]
    assert got == want


def test_bfloat16_error_within_twice_the_reference(tiny_dirs, experts, gen):
    arch = "llama_gqa"
    dirs = experts(arch)
    ids = torch.randint(0, VARIANTS[arch][1]["vocab_size"], (2, 17), generator=gen)
    domains = ["attn_r8", "r4"]
    want = engine(tiny_dirs[arch], "cpu", experts=dirs, max_batch=2).forward(ids, domain=domains)
    err = {
        backend: relative_error(
            engine(tiny_dirs[arch], "cuda", experts=dirs, max_batch=2, dtype="bfloat16", backend=backend).forward(
                ids, domain=domains
            ),
            want,
        )
        for backend in ("cuda", "reference")
    }
    assert 0 < err["reference"] <= 1e-1  # bfloat16 noise through the layers (seen on CPU: 0.026-0.06)
    assert err["cuda"] <= 2 * err["reference"]


def test_hot_expert_changes_while_generating(tiny_dirs, experts, gen):
    arch = "qwen2_bias"
    dirs = experts(arch)
    V = VARIANTS[arch][1]["vocab_size"]
    prompts = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (4, 9)]
    out = {}
    for device in ("cuda", "cpu"):
        e = engine(tiny_dirs[arch], device, max_batch=2)
        e.add_expert("a", dirs["r4"])
        first = e.generate(prompts, domain="a", max_new_tokens=6, ignore_eos=True)
        e.remove_expert("a")
        e.add_expert("b", dirs["attn_r8"])
        e.add_expert("a", dirs["r16_rslora"])
        second = e.generate(prompts, domain=["a", "b"], max_new_tokens=6, ignore_eos=True)
        out[device] = [c.token_ids for c in first + second]
    assert out["cuda"] == out["cpu"]
