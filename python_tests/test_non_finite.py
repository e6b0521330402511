"""Non-finite numbers never reach a caller as tokens.

- An expert or a router with a NaN or inf weight is refused at load, naming the file and the
  tensor: by Engine.add_expert (the C++ PEFT reader), by the MoA reader (MoADir.load and
  Engine(experts=moa_dir)), and by the low-level add_expert / set_router. The engine is left
  as it was.
- An expert whose weights are finite but overflow the activations (huge lora_B) loads, and
  the requests it serves end with finish_reason "error" and a message; the other requests of
  the same batch are served exactly as alone.
"""

from __future__ import annotations

import os
import shutil

import pytest
import safetensors.torch
import torch
from tiny_models import tiny_dirs  # noqa: F401  (fixture)

import moa_engine
from moa_engine.moa_format import MoAConfig, MoADir, RouterConfig
from moa_engine.testing import make_random_peft_adapter

NAME = "llama_gqa"  # vocab 517, hidden 96, 3 layers
MAX_SEQ_LEN = 64


@pytest.fixture(scope="module")
def good_adapter(tiny_dirs, tmp_path_factory):
    return make_random_peft_adapter(tiny_dirs[NAME], tmp_path_factory.mktemp("nf") / "good", r=4, seed=3)


def spoil(adapter_dir, gen, value, which="lora_B"):
    """Writes `value` into one random element of one random `which` tensor of the adapter's
    weights, in place; returns that tensor's name."""
    path = adapter_dir / "adapter_model.safetensors"
    weights = safetensors.torch.load_file(path)
    names = sorted(k for k in weights if which in k)
    name = names[int(torch.randint(len(names), (), generator=gen))]
    flat = weights[name].view(-1)
    flat[int(torch.randint(flat.numel(), (), generator=gen))] = value
    safetensors.torch.save_file(weights, path)  # bypasses the writers' checks on purpose
    return name


def copy_of(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", ["lora_A", "lora_B"])
def test_add_expert_refuses_non_finite_weights(value, which, tiny_dirs, good_adapter, tmp_path, gen):
    bad = copy_of(good_adapter, tmp_path / "bad")
    name = spoil(bad, gen, value, which)
    engine = moa_engine.Engine(tiny_dirs[NAME], max_batch=2, max_seq_len=MAX_SEQ_LEN)
    with pytest.raises(ValueError) as exc:
        engine.add_expert("bad", bad)
    message = str(exc.value)
    assert name in message and "non-finite" in message and "adapter_model.safetensors" in message, message
    assert ("1 NaN" if value != value else "1 inf") in message, message
    assert engine.experts == []
    engine.add_expert("good", good_adapter)  # the engine is as it was, and still loads
    [c] = engine.generate([[1, 2, 3]], max_new_tokens=3, domain="good")
    assert c.finish_reason == "length" and c.error is None


def moa_dir_with(tiny_dirs, experts, path, router=None):
    config = MoAConfig(
        base_model=os.path.relpath(tiny_dirs[NAME], path), domains=list(experts), router=RouterConfig(strategy="last")
    )
    return MoADir.save(path, config, experts=experts, router=router)


def test_moa_reader_refuses_a_non_finite_expert(tiny_dirs, good_adapter, tmp_path, gen):
    moa_dir = moa_dir_with(tiny_dirs, {"code": good_adapter, "math": good_adapter}, tmp_path / "moa")
    name = spoil(moa_dir / "experts" / "math", gen, float("nan"))
    for load in (MoADir.load, lambda p: moa_engine.Engine(experts=p, max_seq_len=MAX_SEQ_LEN)):
        with pytest.raises(ValueError) as exc:
            load(moa_dir)
        assert name in str(exc.value) and "math" in str(exc.value) and "non-finite" in str(exc.value), exc.value


def test_moa_reader_refuses_a_non_finite_router(tiny_dirs, good_adapter, tmp_path, gen):
    router = [torch.randn(2, 96, generator=gen) for _ in range(3)]
    moa_dir = moa_dir_with(tiny_dirs, {"code": good_adapter, "math": good_adapter}, tmp_path / "moa", router)
    weights = safetensors.torch.load_file(moa_dir / "router.safetensors")
    layer = f"layers.{int(torch.randint(3, (), generator=gen))}.weight"
    weights[layer][1, 5] = float("inf")
    safetensors.torch.save_file(weights, moa_dir / "router.safetensors")
    for load in (MoADir.load, lambda p: moa_engine.Engine(experts=p, max_seq_len=MAX_SEQ_LEN)):
        with pytest.raises(ValueError) as exc:
            load(moa_dir)
        assert layer in str(exc.value) and "router.safetensors" in str(exc.value), exc.value


def test_low_level_add_expert_and_set_router_refuse_non_finite(tiny_dirs, gen):
    engine = moa_engine.Engine(tiny_dirs[NAME], max_batch=2, max_seq_len=MAX_SEQ_LEN)
    a, b = torch.randn(4, 96, generator=gen), torch.randn(96, 4, generator=gen)
    b[7, 2] = float("nan")
    with pytest.raises(ValueError, match=r"expert 'x': layer 1 q_proj lora_B has non-finite values \(1 NaN, 0 inf\)"):
        engine._core.add_expert("x", [(1, "q_proj", a, b, 1.0)])
    with pytest.raises(ValueError, match="has scale"):
        engine._core.add_expert("x", [(1, "q_proj", a, torch.zeros(96, 4), float("inf"))])
    assert engine.experts == []
    router = [torch.randn(1, 96, generator=gen) for _ in range(3)]
    router[2][0, 0] = float("-inf")
    with pytest.raises(ValueError, match="router layer 2 has non-finite values"):
        engine._core.set_router(["x"], router, "last")
    assert engine.router_domains == []


@pytest.fixture(scope="module")
def overflowing(tiny_dirs, good_adapter, tmp_path_factory):
    """An engine with a good expert and one whose finite lora_B (1e30) overflows to inf."""
    huge = copy_of(good_adapter, tmp_path_factory.mktemp("nf") / "huge")
    path = huge / "adapter_model.safetensors"
    weights = safetensors.torch.load_file(path)
    safetensors.torch.save_file({k: v.fill_(1e30) if "lora_B" in k else v for k, v in weights.items()}, path)
    engine = moa_engine.Engine(tiny_dirs[NAME], max_batch=3, max_seq_len=MAX_SEQ_LEN)
    engine.add_expert("huge", huge)  # finite weights: it loads
    engine.add_expert("good", good_adapter)
    return engine


def random_prompt(gen, lo=2, hi=11):
    n = int(torch.randint(lo, hi, (), generator=gen))
    return torch.randint(0, 517, (n,), generator=gen).tolist()


def test_non_finite_logits_fail_only_the_requests_they_touch(overflowing, gen):
    engine = overflowing
    prompts = [random_prompt(gen) for _ in range(5)]
    domains = ["good", "huge", "base", "huge", "good"]
    out = engine.generate(prompts, max_new_tokens=7, domain=domains)  # 5 requests over 3 slots
    for c, d, p in zip(out, domains, prompts):
        if d == "huge":
            assert c.finish_reason == "error" and c.token_ids == [], (d, c)
            assert "non-finite logits" in c.error and "'huge'" in c.error, c.error
        else:
            [solo] = engine.generate([p], max_new_tokens=7, domain=d)
            assert c.error is None and c.finish_reason == solo.finish_reason
            assert c.token_ids == solo.token_ids, d


def test_non_finite_logits_through_the_step_api_free_the_slot(overflowing, gen):
    engine = overflowing
    rid = engine.submit(random_prompt(gen), moa_engine.SamplingParams(max_new_tokens=5), domain="huge")
    events = [e for e in engine.step() if e.request_id == rid]
    assert [(e.finished, e.finish_reason, e.token) for e in events] == [(True, "error", -1)]
    assert "non-finite logits" in events[0].error
    assert engine.idle()
    [c] = engine.generate([random_prompt(gen)], max_new_tokens=4, domain="good")  # the engine goes on
    assert c.finish_reason == "length" and len(c.token_ids) == 4
