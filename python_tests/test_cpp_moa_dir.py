"""The C++ MoA-directory reader (csrc/engine/moa_dir.cpp, _C.Engine.load_moa / load_expert)
against the Python one (moa_engine/moa_format.py, used by moa_engine.Engine(experts=...)).

The independent reference is the Python reader: both engines start from the same model folder,
one loads the experts through Python (load_peft_adapter -> _C.Engine.add_expert), the other
through C++ (load_moa), and then
- Engine.forward gives bit-identical logits for every domain, "base" and routed rows;
- greedy generation gives identical ids and routing (domain, per-layer experts, router
  probabilities) for named, base and routed requests of ragged lengths in one batch;
- on a broken directory both refuse it with the same Python exception type (ValueError or
  FileNotFoundError), the C++ message names the file at fault, and the engine is left unchanged.

Adapters are made by real PEFT with the options the format supports: per-module rank and alpha
patterns (regex keys, file order), rslora, a regex-string target_modules, exclude_modules,
layers_to_transform with layers_pattern, module subsets. Models: tiny_models.py.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

import moa_engine
from moa_engine import _C
from moa_engine.moa_format import MoAConfig, MoADir, RouterConfig, make_random_peft_adapter
from tiny_models import VARIANTS, tiny_dirs  # noqa: F401  (fixture)

MAX_SEQ_LEN = 64
STRATEGIES = ("per_layer", "last", "vote")

# PEFT LoraConfig options of each expert; every one exercises a rule of the reader.
EXPERTS = {
    "plain": dict(r=4, alpha=8),
    "patterns": dict(
        r=6, alpha=12, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        # Two keys match layer 0's q_proj; the first in the file (sorted by PEFT) wins.
        rank_pattern={"down_proj": 2, "layers.0.self_attn.q_proj": 3, "q_proj": 5},
        alpha_pattern={r"v_pro.": 5, "o_proj": 20},
    ),
    "regex_targets": dict(r=5, alpha=7, target_modules=r".*\.(k_proj|up_proj|gate_proj)"),
    "layer_subset": dict(
        r=3, alpha=9, layers_to_transform=[1], layers_pattern="layers", exclude_modules=["o_proj", "gate_proj"],
    ),
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny models' parallel regions only wait on the 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_moa_dir(folder: Path, out: Path, experts: dict, seed: int, router: bool = True, strategy="last") -> Path:
    """A MoA directory with a random PEFT expert per EXPERTS entry and a random router."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    scratch = out.parent / f"{out.name}-peft"
    dirs = {}
    for k, (name, spec) in enumerate(experts.items()):
        opts = {key: v for key, v in spec.items() if key not in ("r", "alpha")}
        opts.setdefault("target_modules", list(moa_engine.moa_format.TARGET_MODULES))
        dirs[name] = make_random_peft_adapter(
            base, scratch / name, r=spec["r"], alpha=spec["alpha"], seed=seed + k, init_scale=0.5, **opts
        )
    weights = None
    if router:
        gen = torch.Generator().manual_seed(seed)
        cfg = base.config
        # Logits spread by a few units on the pooled hidden states, so choices differ by prompt.
        weights = [torch.randn(len(experts), cfg.hidden_size, generator=gen) * 3.0 for _ in range(cfg.num_hidden_layers)]
    config = MoAConfig(base_model=str(folder), domains=list(experts), router=RouterConfig(strategy=strategy))
    return MoADir.save(out, config, experts=dirs, router=weights)


def engines(folder, moa_dir, strategy=None):
    """(the Python reader's _C.Engine, the C++ reader's), both from `folder`."""
    py = moa_engine.Engine(folder, experts=moa_dir, routing=strategy, max_batch=4, max_seq_len=MAX_SEQ_LEN)._core
    cpp = _C.Engine(str(folder), max_batch=4, max_seq_len=MAX_SEQ_LEN)
    cpp.load_moa(str(moa_dir), strategy or "")
    return py, cpp


def request(prompt, domain, routing="", n=8):
    r = _C.GenerationRequest()
    r.prompt, r.domain, r.routing, r.max_new_tokens = prompt, domain, routing, n
    r.ignore_eos = True
    return r


def outcome(results):
    return [
        (list(r.token_ids), r.finish_reason, r.routing.domain, list(r.routing.layer_domains),
         [list(p) for p in r.routing.router_probs])
        for r in results
    ]  # fmt: skip


@pytest.fixture(scope="module")
def moa_dirs(tiny_dirs, tmp_path_factory):
    """moa_dirs(arch) -> a MoA directory of EXPERTS with a router on that tiny model (cached)."""
    root = tmp_path_factory.mktemp("cpp_moa")
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = make_moa_dir(tiny_dirs[arch], root / arch, EXPERTS, seed=10 * len(cache) + 1)
        return cache[arch]

    return get


# ---------------------------------------------------------------------------------------------
# Same experts, same routers: bit-identical logits and identical generations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(VARIANTS))
def test_forward_logits_identical(arch, tiny_dirs, moa_dirs, gen):
    py, cpp = engines(tiny_dirs[arch], moa_dirs(arch))
    assert cpp.experts == py.experts == list(EXPERTS)
    assert cpp.router_domains == py.router_domains == list(EXPERTS)
    vocab = cpp.config["vocab_size"]
    domains = [*EXPERTS, "base", ""]  # "" routes the row
    ids = torch.randint(0, vocab, (len(domains), 11), generator=gen)
    ref, ref_routing = py.forward_with_routing(ids, domains)
    got, got_routing = cpp.forward_with_routing(ids, domains)
    assert torch.equal(got, ref), f"{arch}: logits differ by {(got - ref).abs().max():.3g}"
    for row, (a, b) in enumerate(zip(got_routing, ref_routing)):
        assert (a.domain, a.layer_domains, a.router_probs) == (b.domain, b.layer_domains, b.router_probs), f"row {row}"
    # Each expert changes the logits: the comparison above is not of base-model rows only.
    base = got[len(EXPERTS)]
    for row, name in enumerate(EXPERTS):
        assert (got[row] - base).abs().max() > 1e-3, f"{arch}: expert {name} has no effect"


@pytest.mark.parametrize("arch", ["llama_gqa", "qwen2_bias"])
@pytest.mark.parametrize("strategy", [None, *STRATEGIES])
def test_greedy_generation_identical(arch, strategy, tiny_dirs, moa_dirs, gen):
    """Named, base and routed requests of ragged lengths in one batch (more than max_batch, so
    continuous batching admits some later), with the directory's strategy or an override."""
    py, cpp = engines(tiny_dirs[arch], moa_dirs(arch), strategy)
    vocab = cpp.config["vocab_size"]
    domains = [*EXPERTS, "base", "", "", "plain", ""]
    lengths = torch.randint(1, 20, (len(domains),), generator=gen).tolist()
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    routing = ["", "vote", "per_layer", "", "last", "", "", ""]  # per-request overrides
    reqs = lambda: [request(p, d, o if d == "" else "") for p, d, o in zip(prompts, domains, routing)]  # noqa: E731
    ref = outcome(py.generate(reqs()))
    got = outcome(cpp.generate(reqs()))
    assert got == ref
    assert {r[2] for r in got} - {"base", "mixed"}, "no request was served by an expert"


def test_load_expert_matches_add_expert(tiny_dirs, moa_dirs, gen):
    folder, moa_dir = tiny_dirs["mistral_window"], moa_dirs("mistral_window")
    py = moa_engine.Engine(folder, max_seq_len=MAX_SEQ_LEN)
    cpp = _C.Engine(str(folder), max_seq_len=MAX_SEQ_LEN)
    for name in EXPERTS:
        py.add_expert(name, moa_dir / "experts" / name)
        cpp.load_expert(f"{name}", str(moa_dir / "experts" / name))
    assert cpp.experts == py.experts and cpp.router_domains == []
    ids = torch.randint(0, cpp.config["vocab_size"], (len(EXPERTS), 9), generator=gen)
    assert torch.equal(cpp.forward(ids, list(EXPERTS)), py._core.forward(ids, list(EXPERTS)))


def test_bfloat16_engine_identical(tiny_dirs, moa_dirs, gen):
    """The file's float32 weights converted to the engine's dtype the same way."""
    folder, moa_dir = tiny_dirs["llama3_tied"], moa_dirs("llama3_tied")
    py = moa_engine.Engine(folder, experts=moa_dir, dtype="bfloat16", max_seq_len=MAX_SEQ_LEN)._core
    cpp = _C.Engine(str(folder), dtype="bfloat16", max_seq_len=MAX_SEQ_LEN)
    cpp.load_moa(str(moa_dir))
    ids = torch.randint(0, cpp.config["vocab_size"], (3, 7), generator=gen)
    domains = ["patterns", "layer_subset", ""]
    assert torch.equal(cpp.forward(ids, domains), py.forward(ids, domains))


# ---------------------------------------------------------------------------------------------
# Broken directories: both readers refuse, with the same exception type
# ---------------------------------------------------------------------------------------------


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def rewrite_safetensors(path: Path, change) -> None:
    """Rewrite a safetensors file through a change to its {name: tensor} dict."""
    import safetensors.torch

    tensors = dict(safetensors.torch.load_file(str(path)))
    change(tensors)
    safetensors.torch.save_file(tensors, str(path))


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8 + n // 2 : 8 + n // 2 + 4] = b"\x00}{]"
    path.write_bytes(bytes(data))


def first_key(path: Path, module="q_proj", half="A") -> str:
    import safetensors

    with safetensors.safe_open(str(path), "pt") as f:
        return next(k for k in f.keys() if f".{module}.lora_{half}." in k)


CFG, ADAPTER, WEIGHTS, ROUTER = "moa_config.json", "adapter_config.json", "adapter_model.safetensors", "router.safetensors"
E = "experts/plain"  # the expert the corruptions below break

# name -> (file that the message must name, relative to the MoA dir, corruption of the dir)
CORRUPTIONS = {
    "config_not_json": (CFG, lambda d: (d / CFG).write_text("{not json")),
    "config_unknown_key": (CFG, lambda d: edit_json(d / CFG, lambda c: c.update(extra=1))),
    "config_missing_key": (CFG, lambda d: edit_json(d / CFG, lambda c: c.pop("eta"))),
    "config_bad_domain": (CFG, lambda d: edit_json(d / CFG, lambda c: c["domains"].__setitem__(0, "../x"))),
    "config_base_domain": (CFG, lambda d: edit_json(d / CFG, lambda c: c["domains"].__setitem__(0, "Base"))),
    "config_bad_strategy": (CFG, lambda d: edit_json(d / CFG, lambda c: c["router"].update(strategy="top2"))),
    "config_newer_version": (CFG, lambda d: edit_json(d / CFG, lambda c: c.update(format_version=2))),
    "config_bool_eta": (CFG, lambda d: edit_json(d / CFG, lambda c: c.update(eta=True))),
    "config_module_subset": (
        "", lambda d: edit_json(d / CFG, lambda c: c.update(target_modules=["q_proj", "k_proj"]))
    ),
    "config_missing": (CFG, lambda d: (d / CFG).unlink()),
    "expert_missing": (f"{E}/{WEIGHTS}", lambda d: (d / E / WEIGHTS).unlink()),
    "adapter_dora": (f"{E}/{ADAPTER}", lambda d: edit_json(d / E / ADAPTER, lambda c: c.update(use_dora=True))),
    "adapter_bias": (f"{E}/{ADAPTER}", lambda d: edit_json(d / E / ADAPTER, lambda c: c.update(bias="all"))),
    "adapter_fan_in": (f"{E}/{ADAPTER}", lambda d: edit_json(d / E / ADAPTER, lambda c: c.update(fan_in_fan_out=True))),
    "adapter_save": (f"{E}/{ADAPTER}", lambda d: edit_json(d / E / ADAPTER, lambda c: c.update(modules_to_save=["lm_head"]))),
    "adapter_type": (f"{E}/{ADAPTER}", lambda d: edit_json(d / E / ADAPTER, lambda c: c.update(peft_type="IA3"))),
    "adapter_r_string": (f"{E}/{ADAPTER}", lambda d: edit_json(d / E / ADAPTER, lambda c: c.update(r="8"))),
    "adapter_rank_pattern": (
        f"{E}/{WEIGHTS}", lambda d: edit_json(d / E / ADAPTER, lambda c: c.update(rank_pattern={"v_proj": 2}))
    ),
    "adapter_untargeted": (
        f"{E}/{WEIGHTS}", lambda d: edit_json(d / E / ADAPTER, lambda c: c.update(target_modules=["q_proj"]))
    ),
    "adapter_unsupported_module": (
        f"{E}/{ADAPTER}", lambda d: edit_json(d / E / ADAPTER, lambda c: c.update(target_modules=["q_proj", "lm_head"]))
    ),
    "weights_truncated": (f"{E}/{WEIGHTS}", lambda d: truncate(d / E / WEIGHTS, 0.7)),
    "weights_header_garbled": (f"{E}/{WEIGHTS}", lambda d: garble_header(d / E / WEIGHTS)),
    "weights_empty": (f"{E}/{WEIGHTS}", lambda d: (d / E / WEIGHTS).write_bytes(b"")),
    "weights_half_missing": (
        f"{E}/{WEIGHTS}", lambda d: rewrite_safetensors(d / E / WEIGHTS, lambda t: t.pop(first_key(d / E / WEIGHTS)))
    ),
    "weights_unknown_tensor": (
        f"{E}/{WEIGHTS}", lambda d: rewrite_safetensors(d / E / WEIGHTS, lambda t: t.update({"lm_head.weight": torch.zeros(2, 2)}))
    ),
    "weights_rank_mismatch": (
        f"{E}/{WEIGHTS}",
        lambda d: rewrite_safetensors(d / E / WEIGHTS, lambda t: t.update({first_key(d / E / WEIGHTS): torch.zeros(5, 96)})),
    ),
    "weights_other_base": (
        E,
        lambda d: rewrite_safetensors(
            d / E / WEIGHTS,
            lambda t: t.update({first_key(d / E / WEIGHTS, "k_proj", "B"): torch.zeros(48, 4)}),
        ),
    ),
    "weights_integer": (
        f"{E}/{WEIGHTS}",
        lambda d: rewrite_safetensors(
            d / E / WEIGHTS, lambda t: t.update({k: v.to(torch.int32) for k, v in t.items() if ".q_proj." in k})
        ),
    ),
    "router_wrong_domains": (ROUTER, lambda d: rewrite_safetensors(d / ROUTER, lambda t: t.update({"layers.0.weight": torch.zeros(3, 96)}))),
    "router_missing_layer": (ROUTER, lambda d: rewrite_safetensors(d / ROUTER, lambda t: t.pop("layers.1.weight"))),
    "router_extra_tensor": (ROUTER, lambda d: rewrite_safetensors(d / ROUTER, lambda t: t.update(bias=torch.zeros(2)))),
    "router_integer": (ROUTER, lambda d: rewrite_safetensors(d / ROUTER, lambda t: t.update({k: v.int() for k, v in t.items()}))),
    "router_other_hidden": ("", lambda d: rewrite_safetensors(d / ROUTER, lambda t: t.update({k: v[:, :80].contiguous() for k, v in t.items()}))),
    "router_truncated": (ROUTER, lambda d: truncate(d / ROUTER, 0.5)),
}  # fmt: skip


@pytest.fixture(scope="module")
def small_moa(tiny_dirs, tmp_path_factory):
    """llama_gqa (3 layers, hidden 96) with two experts and a router."""
    root = tmp_path_factory.mktemp("cpp_moa_errors")
    experts = {"plain": dict(r=4, alpha=8), "layer_subset": EXPERTS["layer_subset"]}
    return tiny_dirs["llama_gqa"], make_moa_dir(tiny_dirs["llama_gqa"], root / "good", experts, seed=5)


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_broken_directory_refused_like_python(case, small_moa, tmp_path):
    folder, good = small_moa
    bad = shutil.copytree(good, tmp_path / "moa")
    named, corrupt = CORRUPTIONS[case]
    corrupt(bad)
    with pytest.raises((ValueError, FileNotFoundError)) as py_err:
        moa_engine.Engine(folder, experts=bad, max_seq_len=MAX_SEQ_LEN)
    cpp = _C.Engine(str(folder), max_seq_len=MAX_SEQ_LEN)
    with pytest.raises((ValueError, FileNotFoundError)) as cpp_err:
        cpp.load_moa(str(bad))
    message = str(cpp_err.value)
    assert type(cpp_err.value) is type(py_err.value), f"C++: {message!r}\nPython: {py_err.value!r}"
    assert str(bad / named) in message, f"the message does not name {bad / named}: {message!r}"
    assert cpp.experts == [] and cpp.router_domains == [], "a failed load_moa changed the engine"


def test_failed_load_leaves_engine_unchanged(small_moa, tmp_path):
    folder, good = small_moa
    cpp = _C.Engine(str(folder), max_seq_len=MAX_SEQ_LEN)
    cpp.load_expert("layer_subset", str(good / "experts" / "layer_subset"))
    with pytest.raises(ValueError, match="'layer_subset' is already loaded"):
        cpp.load_moa(str(good))
    assert cpp.experts == ["layer_subset"] and cpp.router_domains == []
    with pytest.raises(ValueError, match="'top2' is not one of per_layer, last, vote"):
        cpp.load_moa(str(good), "top2")
    no_router = shutil.copytree(good, tmp_path / "no_router")
    (no_router / ROUTER).unlink()
    fresh = _C.Engine(str(folder), max_seq_len=MAX_SEQ_LEN)
    with pytest.raises(ValueError, match="routing 'vote' was given, but .* has no router.safetensors"):
        fresh.load_moa(str(no_router), "vote")
    assert fresh.experts == []
    fresh.load_moa(str(no_router))
    assert fresh.experts == ["plain", "layer_subset"] and fresh.router_domains == []
    with pytest.raises(FileNotFoundError, match="no such MoA directory"):
        fresh.load_moa(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="no such PEFT adapter folder"):
        fresh.load_expert("x", str(tmp_path / "absent"))


def test_python_only_regex_syntax_is_named(small_moa, tmp_path):
    """A pattern std::regex cannot take is refused naming it (Python would accept it)."""
    folder, good = small_moa
    bad = shutil.copytree(good / "experts" / "plain", tmp_path / "plain")
    edit_json(bad / ADAPTER, lambda c: c.update(rank_pattern={"(?P<m>q_proj)": 4}))
    cpp = _C.Engine(str(folder), max_seq_len=MAX_SEQ_LEN)
    with pytest.raises(ValueError, match=r"rank_pattern '\(\?P<m>q_proj\)' is not a regex this reader supports"):
        cpp.load_expert("plain", str(bad))


def test_every_unsupported_option_refused_by_both(small_moa, tmp_path):
    """The C++ table of refused adapter options covers moa_format._UNSUPPORTED (a new entry
    in Python without one in C++ fails here)."""
    from moa_engine.moa_format import _UNSUPPORTED, load_peft_adapter

    folder, good = small_moa
    cpp = _C.Engine(str(folder), max_seq_len=MAX_SEQ_LEN)
    for key, _, what in _UNSUPPORTED:
        bad = shutil.copytree(good / "experts" / "plain", tmp_path / key)
        edit_json(bad / ADAPTER, lambda c: c.update({key: "all" if key == "bias" else True}))
        with pytest.raises(ValueError, match=re.escape(f"{what} is not supported")):
            load_peft_adapter(bad)
        with pytest.raises(ValueError, match=re.escape(f"{bad / ADAPTER}: {what} is not supported ({key}=")):
            cpp.load_expert(key, str(bad))
    assert cpp.experts == []
