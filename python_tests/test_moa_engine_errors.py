"""moa_engine.Engine's errors with experts and routers: each names the problem (pytest.raises
with match), and a failed call leaves the engine as it was.

Unknown domains, adapters made for another base model, routers that do not fit the experts or
the model, routing asked for without a router, corrupt or missing adapter files, duplicate and
unknown expert names, and domain lists of the wrong length. Models: tiny_models.py (llama_gqa:
3 layers, hidden 96, vocab 517).
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch
from tiny_models import build_model, seed_of, tiny_dirs  # noqa: F401  (fixture)

import moa_engine
from moa_engine.moa_format import MoAConfig, MoADir, RouterConfig, save_router
from moa_engine.testing import make_random_peft_adapter

HIDDEN, LAYERS, VOCAB = 96, 3, 517  # llama_gqa


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on the 2 shared cores these tests run on, parallel regions of a
    tiny model spend most of their time waiting for a descheduled thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapters(tiny_dirs, tmp_path_factory):
    """PEFT folders: A, B (llama_gqa), and adapters made for other bases: mistral (hidden 80),
    qwen (hidden 96 like llama_gqa, other k/v and MLP widths), deep (llama_gqa's shapes, 4 layers)."""
    root = tmp_path_factory.mktemp("error_adapters")
    deep = build_model("llama_gqa", seed=seed_of("llama_gqa"), num_hidden_layers=4)
    return {
        "A": make_random_peft_adapter(tiny_dirs["llama_gqa"], root / "A", r=4, alpha=8, seed=1, init_scale=0.5),
        "B": make_random_peft_adapter(
            tiny_dirs["llama_gqa"],
            root / "B",
            r=8,
            alpha=16,
            seed=2,
            init_scale=0.5,
            target_modules=["q_proj", "v_proj"],
        ),
        "mistral": make_random_peft_adapter(tiny_dirs["mistral_window"], root / "mistral", r=4, seed=3),
        "qwen": make_random_peft_adapter(tiny_dirs["qwen2_bias"], root / "qwen", r=4, seed=4),
        "deep": make_random_peft_adapter(deep, root / "deep", r=4, seed=5),
    }


@pytest.fixture
def engine(tiny_dirs, adapters):
    """llama_gqa with the named experts A and B, no router."""
    return moa_engine.Engine(
        tiny_dirs["llama_gqa"], experts={"A": adapters["A"], "B": adapters["B"]}, max_batch=2, max_seq_len=64
    )


def save_moa_dir(path, base_folder, experts, router=None, strategy="last"):
    config = MoAConfig(
        base_model=os.path.relpath(base_folder, path), domains=list(experts), router=RouterConfig(strategy=strategy)
    )
    return MoADir.save(path, config, experts=experts, router=router)


def random_router(gen, n_domains, hidden=HIDDEN, layers=LAYERS):
    return [torch.randn(n_domains, hidden, generator=gen) for _ in range(layers)]


@pytest.fixture
def moa_dir(tiny_dirs, adapters, tmp_path, gen):
    """A valid MoA dir on llama_gqa: domains A and B, a random router."""
    experts = {"A": adapters["A"], "B": adapters["B"]}
    return save_moa_dir(tmp_path / "moa", tiny_dirs["llama_gqa"], experts, random_router(gen, 2))


def prompt(gen, n=6):
    return torch.randint(0, VOCAB, (n,), generator=gen).tolist()


def _request(ids, domain):
    """A low-level request (moa_engine._C.GenerationRequest)."""
    r = moa_engine._C.GenerationRequest()
    r.prompt = ids
    r.max_new_tokens = 2
    r.domain = domain
    return r


def assert_still_serves(engine, gen, experts=("A", "B")):
    """After a failed call: nothing queued, the experts as before, and generation works."""
    assert engine._core.idle()
    assert engine.experts == list(experts)
    out = engine.generate([prompt(gen)] * len(experts), max_new_tokens=3, domain=list(experts))
    assert [c.domain for c in out] == list(experts)


# ---------------------------------------------------------------------------------------------
# Unknown domains
# ---------------------------------------------------------------------------------------------


def test_unknown_domain_lists_the_known_ones(engine, gen):
    known = r"unknown domain 'nope' \(known: base, A, B\)"
    with pytest.raises(ValueError, match=known):
        engine.generate([prompt(gen)], max_new_tokens=3, domain="nope")
    with pytest.raises(ValueError, match=known):  # one bad request fails the whole call
        engine.generate([prompt(gen), prompt(gen)], max_new_tokens=3, domain=["A", "nope"])
    with pytest.raises(ValueError, match=known):
        engine.forward(torch.tensor([prompt(gen)]), domain="nope")
    with pytest.raises(ValueError, match=known):
        engine.forward(torch.tensor([prompt(gen), prompt(gen)]), domain=["base", "nope"])
    with pytest.raises(ValueError, match=r"unknown domain 'a' \(known: base, A, B\)"):  # names are case-sensitive
        engine.generate([prompt(gen)], max_new_tokens=3, domain="a")
    with pytest.raises(ValueError, match=r"domain: expected names, 'base' or None, got \['A', 3\]"):
        engine.generate([prompt(gen), prompt(gen)], max_new_tokens=3, domain=["A", 3])
    assert_still_serves(engine, gen)


# ---------------------------------------------------------------------------------------------
# Adapters made for another base model
# ---------------------------------------------------------------------------------------------

ANOTHER_BASE = {
    "mistral": r"adapter made for another base: model\.layers\.0\.self_attn\.q_proj expects lora_A \[4, 96\]",
    "qwen": r"adapter made for another base: model\.layers\.0\.self_attn\.k_proj expects lora_A \[4, 96\] "
    r"and lora_B \[32, 4\], got \[4, 96\] and \[48, 4\]",
    "deep": r"adapter made for another base: it adapts layer 3 but the base model has 3 layers",
}


@pytest.mark.parametrize("how", ["add_expert", "constructor", "moa_dir"])
@pytest.mark.parametrize("which", list(ANOTHER_BASE))
def test_adapter_made_for_another_base(which, how, engine, tiny_dirs, adapters, tmp_path, gen):
    message = ANOTHER_BASE[which]
    if how == "add_expert":
        with pytest.raises(ValueError, match=message):
            engine.add_expert("X", adapters[which])
        assert_still_serves(engine, gen)
    elif how == "constructor":
        with pytest.raises(ValueError, match=message):
            moa_engine.Engine(tiny_dirs["llama_gqa"], experts={"A": adapters["A"], "X": adapters[which]})
    else:  # MoADir.save cannot know the base; loading it on the base does.
        moa = save_moa_dir(tmp_path / "moa", tiny_dirs["llama_gqa"], {"X": adapters[which]})
        with pytest.raises(ValueError, match=message):
            moa_engine.Engine(experts=moa)


def test_low_level_expert_with_wrong_shapes(engine, gen):
    """_C.Engine.add_expert checks shapes itself (callers other than the Python face)."""
    pieces = [(0, "q_proj", torch.randn(4, 80), torch.randn(96, 4), 1.0)]
    with pytest.raises(
        ValueError,
        match=r"layer 0 q_proj expects lora_A \[r, 96\] and lora_B \[96, r\], got \[4, 80\]"
        r" and \[96, 4\] \(an adapter made for another base model\?\)",
    ):
        engine._core.add_expert("X", pieces)
    with pytest.raises(ValueError, match=r"layer 3 is out of range \(the model has 3 layers\)"):
        engine._core.add_expert("X", [(3, "q_proj", torch.randn(4, 96), torch.randn(96, 4), 1.0)])
    with pytest.raises(ValueError, match=r"module 'lm_head' is not a target linear"):
        engine._core.add_expert("X", [(0, "lm_head", torch.randn(4, 96), torch.randn(517, 4), 1.0)])
    assert_still_serves(engine, gen)


# ---------------------------------------------------------------------------------------------
# Routers that do not fit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,message",
    [
        ((3, HIDDEN, LAYERS), r"router has 3 outputs but the MoA dir has 2 domains"),
        ((1, HIDDEN, LAYERS), r"router has 1 outputs but the MoA dir has 2 domains"),
        (
            (2, HIDDEN + 1, LAYERS),
            r"experts and router disagree on the hidden size: "
            r"\{'A': 96, 'B': 96, 'router': 97\}",
        ),
        ((2, HIDDEN, LAYERS + 1), r"router.safetensors: router has 4 layers but the model has 3"),
        ((2, HIDDEN, LAYERS - 1), r"router.safetensors: router has 2 layers but the model has 3"),
    ],
    ids=["one_domain_too_many", "one_domain_too_few", "wrong_hidden", "one_layer_too_many", "one_layer_too_few"],
)
def test_router_that_does_not_fit_the_moa_dir(shape, message, moa_dir, gen):
    n_domains, hidden, layers = shape
    save_router(moa_dir / "router.safetensors", random_router(gen, n_domains, hidden, layers))
    with pytest.raises(ValueError, match=message):
        moa_engine.Engine(experts=moa_dir)


def test_moa_dir_save_refuses_a_router_of_the_wrong_size(tiny_dirs, adapters, tmp_path, gen):
    experts = {"A": adapters["A"], "B": adapters["B"]}
    with pytest.raises(ValueError, match=r"router has 3 outputs but the MoA dir has 2 domains"):
        save_moa_dir(tmp_path / "moa", tiny_dirs["llama_gqa"], experts, random_router(gen, 3))
    assert not (tmp_path / "moa").exists()


def test_low_level_router_checks(engine, gen):
    core = engine._core
    with pytest.raises(ValueError, match=r"router layer 0: expected \[3, 96\] \(domains x hidden\), got \[2, 96\]"):
        core.set_router(["A", "B", "C"], random_router(gen, 2), "last")
    with pytest.raises(ValueError, match=r"router layer 0: expected \[2, 96\] \(domains x hidden\), got \[2, 95\]"):
        core.set_router(["A", "B"], random_router(gen, 2, hidden=95), "last")
    with pytest.raises(ValueError, match=r"router: expected one matrix per layer \(3\), got 1"):
        core.set_router(["A", "B"], random_router(gen, 2, layers=1), "last")
    with pytest.raises(ValueError, match=r"routing strategy 'sideways' is not one of per_layer, last, vote"):
        core.set_router(["A", "B"], random_router(gen, 2), "sideways")
    with pytest.raises(ValueError, match=r"a router needs at least one domain"):
        core.set_router([], [torch.zeros(0, HIDDEN)] * LAYERS, "last")
    assert engine.router_domains == []  # nothing was set
    with pytest.raises(ValueError, match="no router"):
        engine.generate([prompt(gen)], max_new_tokens=2)
    assert_still_serves(engine, gen)


# ---------------------------------------------------------------------------------------------
# Routing asked for without a router
# ---------------------------------------------------------------------------------------------

NO_ROUTER = (
    r"the request names no domain and the engine has no router to choose one: "
    r"name a domain \(known: A, B\) or 'base'"
)


def test_routing_without_a_router(engine, tiny_dirs, adapters, gen):
    with pytest.raises(ValueError, match=NO_ROUTER):
        engine.generate([prompt(gen)], max_new_tokens=2)  # domain None by default
    with pytest.raises(ValueError, match=NO_ROUTER):
        engine.generate([prompt(gen), prompt(gen)], max_new_tokens=2, domain=["A", None])
    with pytest.raises(ValueError, match=r"routing 'last' was asked for, but the engine has no router"):
        engine.generate([prompt(gen)], max_new_tokens=2, routing="last")
    with pytest.raises(ValueError, match=NO_ROUTER):
        engine.forward(torch.tensor([prompt(gen)]))
    with pytest.raises(ValueError, match=NO_ROUTER):
        engine._core.submit(_request(prompt(gen), ""))
    assert_still_serves(engine, gen)
    with pytest.raises(ValueError, match=r"routing='last' was given, but the engine has no router"):
        moa_engine.Engine(tiny_dirs["llama_gqa"], experts={"A": adapters["A"]}, routing="last")
    with pytest.raises(ValueError, match=r"routing='vote' was given, but the engine has no router"):
        moa_engine.Engine(tiny_dirs["llama_gqa"], routing="vote")


def test_routing_strategy_without_any_router_or_expert(tiny_dirs, gen):
    """An engine with no experts runs the base model for domain None; asking it for a routing
    strategy is an error, as Engine(routing=...) is."""
    engine = moa_engine.Engine(tiny_dirs["llama_gqa"], max_batch=2, max_seq_len=64)
    assert engine.generate([prompt(gen)], max_new_tokens=2)[0].domain == "base"
    with pytest.raises(ValueError, match=r"no router"):
        engine.generate([prompt(gen)], max_new_tokens=2, routing="last")


def test_unknown_routing_strategy(moa_dir, gen):
    engine = moa_engine.Engine(experts=moa_dir, max_batch=2, max_seq_len=64)
    with pytest.raises(ValueError, match=r"routing strategy 'sideways' is not one of per_layer, last, vote"):
        engine.generate([prompt(gen)], max_new_tokens=2, routing="sideways")
    with pytest.raises(ValueError, match=r"routing strategy 'sideways' is not one of per_layer, last, vote"):
        engine.generate([prompt(gen), prompt(gen)], max_new_tokens=2, domain=["A", None], routing="sideways")
    with pytest.raises(ValueError, match=r"routing strategy 'sideways' is not one of per_layer, last, vote"):
        moa_engine.Engine(experts=moa_dir, routing="sideways")
    assert engine._core.idle()


def test_unknown_routing_strategy_when_no_request_is_routed(moa_dir, gen):
    """A misspelt strategy is a bad argument even when every request names its domain."""
    engine = moa_engine.Engine(experts=moa_dir, max_batch=2, max_seq_len=64)
    with pytest.raises(ValueError, match=r"sideways"):
        engine.generate([prompt(gen)], max_new_tokens=2, domain="A", routing="sideways")


# ---------------------------------------------------------------------------------------------
# Corrupt or missing adapter files
# ---------------------------------------------------------------------------------------------


def _truncate(folder):
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {  # name: (damage(folder), exception, message)
    "truncated_weights": (
        _truncate,
        ValueError,
        r"adapter_model\.safetensors: (not a safetensors file|corrupt safetensors header|corrupt entry for tensor)",
    ),
    "empty_weights": (
        lambda f: (f / "adapter_model.safetensors").write_bytes(b""),
        ValueError,
        r"adapter_model\.safetensors: (not a safetensors file|corrupt safetensors header|corrupt entry for tensor)",
    ),
    "missing_config": (
        lambda f: (f / "adapter_config.json").unlink(),
        FileNotFoundError,
        r"adapter_config\.json: (no such file|missing)",
    ),
    "garbage_config": (
        lambda f: (f / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,'),
        ValueError,
        r"adapter_config\.json: not valid JSON",
    ),
    "config_not_an_object": (
        lambda f: (f / "adapter_config.json").write_text("[1, 2]"),
        ValueError,
        r"adapter_config\.json: expected a JSON object",
    ),
    "missing_weights": (
        lambda f: (f / "adapter_model.safetensors").unlink(),
        FileNotFoundError,
        r"adapter_model\.safetensors: (no such file|missing)",
    ),
}


@pytest.mark.parametrize("how", ["add_expert", "constructor", "moa_dir"])
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_or_missing_adapter_file(case, how, engine, tiny_dirs, adapters, moa_dir, tmp_path, gen):
    damage, exc, message = CORRUPTIONS[case]
    if how == "moa_dir":
        folder = moa_dir / "experts" / "B"
        damage(folder)
        with pytest.raises(exc, match=message):
            moa_engine.Engine(experts=moa_dir)
        return
    folder = shutil.copytree(adapters["B"], tmp_path / "damaged")
    damage(folder)
    with pytest.raises(exc, match=message):
        if how == "add_expert":
            engine.add_expert("C", folder)
        else:
            moa_engine.Engine(tiny_dirs["llama_gqa"], experts={"A": adapters["A"], "C": folder})
    if how == "add_expert":
        assert_still_serves(engine, gen)


def test_missing_adapter_folder_or_moa_dir(engine, tmp_path, gen):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nowhere'}: no such PEFT adapter folder")):
        engine.add_expert("C", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nowhere'}: no such MoA directory")):
        moa_engine.Engine(experts=tmp_path / "nowhere")
    assert_still_serves(engine, gen)


# ---------------------------------------------------------------------------------------------
# Expert names and domain lists
# ---------------------------------------------------------------------------------------------


def test_duplicate_expert_name(engine, adapters, gen):
    p = prompt(gen)
    before = engine.generate([p], max_new_tokens=5, domain="A")[0].token_ids
    with pytest.raises(ValueError, match=r"an expert named 'A' is already loaded \(remove it first\)"):
        engine.add_expert("A", adapters["B"])
    assert engine.generate([p], max_new_tokens=5, domain="A")[0].token_ids == before  # A's weights kept
    assert_still_serves(engine, gen)


def test_remove_unknown_expert(engine, gen):
    with pytest.raises(ValueError, match=r"unknown expert 'Z' \(loaded: A, B\)"):
        engine.remove_expert("Z")
    with pytest.raises(ValueError, match=r"unknown expert 'base' \(loaded: A, B\)"):
        engine.remove_expert("base")
    engine.remove_expert("B")
    with pytest.raises(ValueError, match=r"unknown expert 'B' \(loaded: A\)"):  # removed twice
        engine.remove_expert("B")
    assert_still_serves(engine, gen, experts=("A",))


def test_reserved_expert_name(engine, adapters, gen):
    with pytest.raises(ValueError, match=r"expert name 'base' is reserved"):
        engine.add_expert("base", adapters["B"])
    assert_still_serves(engine, gen)


@pytest.mark.parametrize("name", ["", None], ids=["empty", "none"])
def test_expert_needs_a_name(name, engine, adapters, tmp_path, gen):
    """add_expert("" or None, folder) must not load the expert under another name (the folder's):
    "" in a request means "route", so such an expert could never be named."""
    folder = shutil.copytree(adapters["B"], tmp_path / "fresh")
    with pytest.raises((ValueError, TypeError), match=r"name"):
        engine.add_expert(name, folder)
    assert_still_serves(engine, gen)


def test_domain_list_of_the_wrong_length(engine, gen):
    with pytest.raises(ValueError, match=r"domain: expected one value or one per prompt \(3\), got 2"):
        engine.generate([prompt(gen)] * 3, max_new_tokens=2, domain=["A", "B"])
    with pytest.raises(ValueError, match=r"domain: expected one value or one per prompt \(1\), got 0"):
        engine.generate([prompt(gen)], max_new_tokens=2, domain=[])
    with pytest.raises(ValueError, match=r"domain: expected one value or one per prompt \(2\), got 3"):
        engine.forward(torch.tensor([prompt(gen), prompt(gen)]), domain=["A", "B", "A"])
    with pytest.raises(ValueError, match=r"domain: expected one value or one per sequence \(2\), got 3"):
        engine._core.forward(torch.tensor([prompt(gen), prompt(gen)]), ["A", "B", "A"])
    assert_still_serves(engine, gen)
