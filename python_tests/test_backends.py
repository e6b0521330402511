"""The forward's backends against each other: the reference (ATen ops alone) and the CPU kernels.

The reference backend is the plain forward that a device backend is tested against: the same
Model, scheduler and routing code, every step written with ATen ops on the tensors' device,
the LoRA updates as its own gather-matmul per expert (not the grouped op). Here both run on
the CPU:
- logits agree to 1e-4 relative in float32 on every tiny architecture (GQA, MQA, MHA, tied,
  qwen2 biases, llama3 rope, a mistral sliding window shorter than the prompts), with experts
  of several ranks and module subsets mixed with the base in one forward;
- greedy tokens are identical, with continuous batching (fewer slots than prompts), for mixed
  batches of experts and the base, and for every routing strategy, the routers' decisions and
  probabilities included;
- a quantized base (weights quantized on load, and the default model's Q4_1 file) agrees too;
- bfloat16 agrees to bfloat16 rounding;
- bad backend choices fail with errors that name them.

Dimensions: B rows, T tokens, V vocabulary, D router domains, H hidden size.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tiny_models import VARIANTS, tiny_dirs  # noqa: F401  (fixture)

import moa_engine
from moa_engine import _C
from moa_engine.moa_format import MoAConfig, MoADir, RouterConfig
from moa_engine.testing import make_random_peft_adapter

ARCHS = list(VARIANTS)
FLOAT32_REL_TOL = 1e-4  # max |cpu - reference| / max |reference|
BF16_REL_TOL = 1e-1  # bfloat16 against float32 logits, through 2-3 layers with experts (seen: 0.026-0.06)
PROB_TOL = 1e-5
MAX_SEQ_LEN = 64
EXPERTS = {
    "r4": dict(r=4, alpha=8),
    "r16_rslora": dict(r=16, alpha=6, use_rslora=True),
    "attn_r8": dict(r=8, alpha=32, target_modules=["q_proj", "v_proj", "o_proj"]),
}
STRATEGIES = ["per_layer", "last", "vote"]


def relative_error(got, ref):
    got, ref = got.float().cpu(), ref.float().cpu()  # either may be on a GPU (test_engine_cuda.py)
    return float((got - ref).abs().max() / ref.abs().max())


def make_request(prompt, domain, max_new_tokens=10):
    """A greedy request (moa_engine._C.GenerationRequest) that ignores EOS."""
    r = _C.GenerationRequest()
    r.prompt = list(prompt)
    r.max_new_tokens = max_new_tokens
    r.ignore_eos = True
    r.domain = domain
    return r


def engines(folder, **kw):
    """(cpu, reference) engines on the same model and options."""
    cpu = moa_engine.Engine(folder, backend="cpu", max_seq_len=MAX_SEQ_LEN, **kw)
    ref = moa_engine.Engine(folder, backend="reference", max_seq_len=MAX_SEQ_LEN, **kw)
    assert (cpu.backend, ref.backend) == ("cpu", "reference")
    return cpu, ref


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny models' parallel regions only wait on the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def experts(tiny_dirs, tmp_path_factory):
    """experts(arch) -> {name: PEFT folder} made by real PEFT on the variant (cached)."""
    root = tmp_path_factory.mktemp("backend_experts")
    cache = {}

    def get(arch):
        if arch not in cache:
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], torch_dtype=torch.float32)
            cache[arch] = {
                name: make_random_peft_adapter(base, root / arch / name, seed=200 + k, init_scale=0.5, **spec)
                for k, (name, spec) in enumerate(EXPERTS.items())
            }
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_logits_equal_the_cpu_kernels_with_mixed_experts(arch, tiny_dirs, experts, gen):
    cpu, ref = engines(tiny_dirs[arch], experts=experts(arch), max_batch=4)
    V = VARIANTS[arch][1]["vocab_size"]
    ids = torch.randint(0, V, (4, 19), generator=gen)  # longer than mistral's window of 8
    domains = ["r4", "base", "attn_r8", "r16_rslora"]  # a different expert on every row
    got, want = cpu.forward(ids, domain=domains), ref.forward(ids, domain=domains)
    assert got.shape == want.shape == (4, 19, V)
    assert relative_error(got, want) <= FLOAT32_REL_TOL
    # The experts matter at this tolerance: the base alone is far from the expert rows.
    base = ref.forward(ids, domain="base")
    assert relative_error(base[0], want[0]) > 100 * FLOAT32_REL_TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_are_identical_with_continuous_batching(arch, tiny_dirs, experts, gen):
    # 2 slots for 5 prompts: requests join and leave a running batch (prefill and decode mixed).
    cpu, ref = engines(tiny_dirs[arch], experts=experts(arch), max_batch=2)
    V = VARIANTS[arch][1]["vocab_size"]
    lengths = [3, 11, 1, 17, 6]
    domains = ["r4", "base", "r16_rslora", "attn_r8", "r4"]
    requests = [make_request(torch.randint(0, V, (n,), generator=gen).tolist(), d) for n, d in zip(lengths, domains)]
    got = [r.token_ids for r in cpu._core.generate(requests)]
    want = [r.token_ids for r in ref._core.generate(requests)]
    assert got == want
    assert all(len(t) == 10 for t in got)


@pytest.fixture(scope="module")
def routed(tiny_dirs, experts, tmp_path_factory):
    """A MoA dir on llama_gqa: three experts and a random router per layer ([D, H], scaled so
    that the domains' probabilities are well apart)."""
    folder = tiny_dirs["llama_gqa"]
    dirs = experts("llama_gqa")
    cfg = VARIANTS["llama_gqa"][1]
    g = torch.Generator().manual_seed(77)
    router = [torch.randn(len(dirs), cfg["hidden_size"], generator=g) for _ in range(cfg["num_hidden_layers"])]
    path = tmp_path_factory.mktemp("backend_moa") / "moa"
    base = os.path.relpath(folder, path)
    config = MoAConfig(base_model=base, domains=list(dirs), router=RouterConfig(strategy="last"))
    return MoADir.save(path, config, experts=dirs, router=router)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_routing_is_identical_on_both_backends(strategy, routed, gen):
    cpu, ref = engines(None, experts=routed, max_batch=3, routing=strategy)
    prompts = [torch.randint(0, 517, (n,), generator=gen).tolist() for n in (5, 13, 2, 9)]
    got = cpu.generate(prompts, max_new_tokens=8, ignore_eos=True)
    want = ref.generate(prompts, max_new_tokens=8, ignore_eos=True)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    for g_, w in zip(got, want):
        assert g_.layer_domains == w.layer_domains
        err = (torch.tensor(g_.router_probs) - torch.tensor(w.router_probs)).abs().max()
        assert float(err) <= PROB_TOL
    # The random routers spread the prompts over more than one expert.
    assert len({tuple(c.layer_domains) for c in want}) > 1


@pytest.mark.parametrize("quantization", ["q8_0", "q4_0"])
def test_quantized_base_agrees(quantization, tiny_dirs, experts, gen):
    arch = "qwen2_bias"
    cpu, ref = engines(tiny_dirs[arch], experts=experts(arch), max_batch=2, quantization=quantization)
    assert cpu.quantized and ref.quantized
    ids = torch.randint(0, VARIANTS[arch][1]["vocab_size"], (2, 15), generator=gen)
    domains = ["r16_rslora", "base"]
    assert relative_error(cpu.forward(ids, domain=domains), ref.forward(ids, domain=domains)) <= FLOAT32_REL_TOL


@pytest.mark.parametrize("arch", ["llama_gqa", "mistral_window"])
def test_bfloat16_error_is_within_twice_the_references(arch, tiny_dirs, experts, gen):
    # Against the float32 forward, the CPU kernels in bfloat16 are at most twice as far off
    # as the plain ATen forward in bfloat16 (they round where HF rounds, accumulate in float).
    cpu, ref = engines(tiny_dirs[arch], experts=experts(arch), max_batch=2, dtype="bfloat16")
    exact = moa_engine.Engine(tiny_dirs[arch], experts=experts(arch), max_batch=2, max_seq_len=MAX_SEQ_LEN)
    ids = torch.randint(0, VARIANTS[arch][1]["vocab_size"], (2, 13), generator=gen)
    domains = ["attn_r8", "r4"]
    want = exact.forward(ids, domain=domains)
    err_cpu = relative_error(cpu.forward(ids, domain=domains), want)
    err_ref = relative_error(ref.forward(ids, domain=domains), want)
    assert 0 < err_ref <= BF16_REL_TOL
    assert err_cpu <= 2 * err_ref


@pytest.mark.slow
def test_default_model_greedy_tokens_are_identical():
    # The shipped Q4_1 file: the reference dequantizes each matrix per call (slow, plain).
    cpu = moa_engine.Engine(backend="cpu", max_batch=2, max_seq_len=128)
    ref = moa_engine.Engine(backend="reference", max_batch=2, max_seq_len=128)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    got = cpu.generate(prompts, max_new_tokens=8, ignore_eos=True)
    want = ref.generate(prompts, max_new_tokens=8, ignore_eos=True)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_bad_backends_are_named(tiny_dirs):
    folder = tiny_dirs["llama3_tied"]
    with pytest.raises(ValueError, match="backend 'metal' is not a backend"):
        moa_engine.Engine(folder, backend="metal")
    with pytest.raises(ValueError, match="backend 'cuda' needs a CUDA device"):
        moa_engine.Engine(folder, backend="cuda")
    with pytest.raises(ValueError, match="device 'gpu0' is not a device"):
        moa_engine.Engine(folder, device="gpu0")
    if not _C.built_with_cuda():
        with pytest.raises(ValueError, match="device 'cuda' is not supported by this build"):
            moa_engine.Engine(folder, device="cuda")


def test_backend_variable_is_read_and_checked(tiny_dirs):
    # MOA_ENGINE_BACKEND picks the backend of engines that ask for "auto"; a bad value is named.
    folder = str(tiny_dirs["llama3_tied"])
    code = "import sys, moa_engine; print(moa_engine.Engine(sys.argv[1]).backend)"
    env = dict(os.environ, MOA_ENGINE_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code, folder], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["MOA_ENGINE_BACKEND"] = "tpu"
    bad = subprocess.run([sys.executable, "-c", code, folder], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "MOA_ENGINE_BACKEND='tpu' is not a backend" in bad.stderr
