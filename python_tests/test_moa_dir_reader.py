"""The MoA-directory reader: one reader, in C++ (csrc/engine/moa_dir.h), used by the C++
engine (_C.Engine.load_moa / load_expert) and by Python (moa_engine.Engine(experts=...),
moa_format, training) alike.

- Every broken directory is refused with the right exception (ValueError or
  FileNotFoundError) and a message naming the file at fault, through both doors, and the
  engine is left unchanged.
- Python-only regex syntax in a pattern is refused by name; every unsupported PEFT option is
  refused by name.

Adapters are made by real PEFT (moa_engine.testing); models: tiny_models.py. That the
experts it reads compute PEFT's forward is tested in test_moa_format.py (scales and deltas
against PEFT) and test_moa_engine.py (the engine against PEFT).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_dirs  # noqa: F401  (fixture)

import moa_engine
from moa_engine import _C
from moa_engine.moa_format import MoAConfig, MoADir, RouterConfig, load_peft_adapter
from moa_engine.testing import make_random_peft_adapter

MAX_SEQ_LEN = 64

# The experts of the broken directories: a plain one and one on a layer subset.
EXPERTS = {
    "plain": dict(r=4, alpha=8),
    "layer_subset": dict(
        r=3, alpha=9, layers_to_transform=[1], layers_pattern="layers", exclude_modules=["o_proj", "gate_proj"]
    ),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny models' parallel regions only wait on the 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_moa_dir(folder: Path, out: Path, experts: dict, seed: int, router: bool = True, strategy="last") -> Path:
    """A MoA directory with a random PEFT expert per `experts` entry and a random router."""
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
        weights = [
            torch.randn(len(experts), cfg.hidden_size, generator=gen) * 3.0 for _ in range(cfg.num_hidden_layers)
        ]
    config = MoAConfig(base_model=str(folder), domains=list(experts), router=RouterConfig(strategy=strategy))
    return MoADir.save(out, config, experts=dirs, router=weights)


# ---------------------------------------------------------------------------------------------
# Broken directories: refused with the right exception, naming the file
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


CFG, ADAPTER, WEIGHTS, ROUTER = (
    "moa_config.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "router.safetensors",
)
E = "experts/plain"  # the expert the corruptions below break

# name -> (file that the message must name, relative to the MoA dir, corruption of the dir).
# A missing file is a FileNotFoundError; anything else a ValueError.
MISSING = {"config_missing", "expert_missing"}
CORRUPTIONS = {
    "config_not_json": (CFG, lambda d: (d / CFG).write_text("{not json")),
    "config_unknown_key": (CFG, lambda d: edit_json(d / CFG, lambda c: c.update(extra=1))),
    "config_missing_key": (CFG, lambda d: edit_json(d / CFG, lambda c: c.pop("eta"))),
    "config_bad_domain": (CFG, lambda d: edit_json(d / CFG, lambda c: c["domains"].__setitem__(0, "../x"))),
    "config_base_domain": (CFG, lambda d: edit_json(d / CFG, lambda c: c["domains"].__setitem__(0, "Base"))),
    "config_bad_strategy": (CFG, lambda d: edit_json(d / CFG, lambda c: c["router"].update(strategy="top2"))),
    "config_newer_version": (CFG, lambda d: edit_json(d / CFG, lambda c: c.update(format_version=2))),
    "config_bool_eta": (CFG, lambda d: edit_json(d / CFG, lambda c: c.update(eta=True))),
    "config_module_subset": ("", lambda d: edit_json(d / CFG, lambda c: c.update(target_modules=["q_proj", "k_proj"]))),
    "config_missing": (CFG, lambda d: (d / CFG).unlink()),
    "expert_missing": (f"{E}/{WEIGHTS}", lambda d: (d / E / WEIGHTS).unlink()),
    "adapter_dora": (f"{E}/{ADAPTER}", lambda d: edit_json(d / E / ADAPTER, lambda c: c.update(use_dora=True))),
    "adapter_bias": (f"{E}/{ADAPTER}", lambda d: edit_json(d / E / ADAPTER, lambda c: c.update(bias="all"))),
    "adapter_fan_in": (f"{E}/{ADAPTER}", lambda d: edit_json(d / E / ADAPTER, lambda c: c.update(fan_in_fan_out=True))),
    "adapter_save": (
        f"{E}/{ADAPTER}",
        lambda d: edit_json(d / E / ADAPTER, lambda c: c.update(modules_to_save=["lm_head"])),
    ),
    "adapter_type": (f"{E}/{ADAPTER}", lambda d: edit_json(d / E / ADAPTER, lambda c: c.update(peft_type="IA3"))),
    "adapter_r_string": (f"{E}/{ADAPTER}", lambda d: edit_json(d / E / ADAPTER, lambda c: c.update(r="8"))),
    "adapter_rank_pattern": (
        f"{E}/{WEIGHTS}",
        lambda d: edit_json(d / E / ADAPTER, lambda c: c.update(rank_pattern={"v_proj": 2})),
    ),
    "adapter_untargeted": (
        f"{E}/{WEIGHTS}",
        lambda d: edit_json(d / E / ADAPTER, lambda c: c.update(target_modules=["q_proj"])),
    ),
    "adapter_unsupported_module": (
        f"{E}/{ADAPTER}",
        lambda d: edit_json(d / E / ADAPTER, lambda c: c.update(target_modules=["q_proj", "lm_head"])),
    ),
    "weights_truncated": (f"{E}/{WEIGHTS}", lambda d: truncate(d / E / WEIGHTS, 0.7)),
    "weights_header_garbled": (f"{E}/{WEIGHTS}", lambda d: garble_header(d / E / WEIGHTS)),
    "weights_empty": (f"{E}/{WEIGHTS}", lambda d: (d / E / WEIGHTS).write_bytes(b"")),
    "weights_half_missing": (
        f"{E}/{WEIGHTS}",
        lambda d: rewrite_safetensors(d / E / WEIGHTS, lambda t: t.pop(first_key(d / E / WEIGHTS))),
    ),
    "weights_unknown_tensor": (
        f"{E}/{WEIGHTS}",
        lambda d: rewrite_safetensors(d / E / WEIGHTS, lambda t: t.update({"lm_head.weight": torch.zeros(2, 2)})),
    ),
    "weights_rank_mismatch": (
        f"{E}/{WEIGHTS}",
        lambda d: rewrite_safetensors(
            d / E / WEIGHTS, lambda t: t.update({first_key(d / E / WEIGHTS): torch.zeros(5, 96)})
        ),
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
    "router_wrong_domains": (
        ROUTER,
        lambda d: rewrite_safetensors(d / ROUTER, lambda t: t.update({"layers.0.weight": torch.zeros(3, 96)})),
    ),
    "router_missing_layer": (ROUTER, lambda d: rewrite_safetensors(d / ROUTER, lambda t: t.pop("layers.1.weight"))),
    "router_extra_tensor": (ROUTER, lambda d: rewrite_safetensors(d / ROUTER, lambda t: t.update(bias=torch.zeros(2)))),
    "router_integer": (
        ROUTER,
        lambda d: rewrite_safetensors(d / ROUTER, lambda t: t.update({k: v.int() for k, v in t.items()})),
    ),
    "router_other_hidden": (
        "",
        lambda d: rewrite_safetensors(
            d / ROUTER, lambda t: t.update({k: v[:, :80].contiguous() for k, v in t.items()})
        ),
    ),
    "router_truncated": (ROUTER, lambda d: truncate(d / ROUTER, 0.5)),
}


@pytest.fixture(scope="module")
def small_moa(tiny_dirs, tmp_path_factory):
    """llama_gqa (3 layers, hidden 96) with two experts and a router."""
    root = tmp_path_factory.mktemp("cpp_moa_errors")
    return tiny_dirs["llama_gqa"], make_moa_dir(tiny_dirs["llama_gqa"], root / "good", EXPERTS, seed=5)


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_broken_directory_is_refused_naming_the_file(case, small_moa, tmp_path):
    folder, good = small_moa
    bad = shutil.copytree(good, tmp_path / "moa")
    named, corrupt = CORRUPTIONS[case]
    corrupt(bad)
    expected = FileNotFoundError if case in MISSING else ValueError
    with pytest.raises(expected) as from_python:
        moa_engine.Engine(folder, experts=bad, max_seq_len=MAX_SEQ_LEN)
    cpp = _C.Engine(str(folder), max_seq_len=MAX_SEQ_LEN)
    with pytest.raises(expected) as from_cpp:
        cpp.load_moa(str(bad))
    for err in (from_python, from_cpp):
        assert type(err.value) is expected, repr(err.value)
        assert str(bad / named) in str(err.value), f"the message does not name {bad / named}: {err.value}"
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


# Every adapter_config.json option that changes the forward beyond a plain low-rank update:
# key -> how the message names it (docs/moa-format.md lists them).
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "bias": "bias",
    "lora_bias": "lora_bias",
    "modules_to_save": "modules_to_save",
    "fan_in_fan_out": "fan_in_fan_out",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters",
    "layer_replication": "layer_replication",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "arrow_config",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "velora_config",
    "monteclora_config": "monteclora_config",
}


def test_every_unsupported_option_is_refused(small_moa, tmp_path):
    folder, good = small_moa
    cpp = _C.Engine(str(folder), max_seq_len=MAX_SEQ_LEN)
    for key, what in UNSUPPORTED.items():
        bad = shutil.copytree(good / "experts" / "plain", tmp_path / key)
        edit_json(bad / ADAPTER, lambda c, key=key: c.update({key: "all" if key == "bias" else True}))
        message = re.escape(f"{bad / ADAPTER}: {what} is not supported ({key}=")
        with pytest.raises(ValueError, match=message):
            load_peft_adapter(bad)
        with pytest.raises(ValueError, match=message):
            cpp.load_expert(key, str(bad))
        # unset (false, null, empty) is fine
        edit_json(bad / ADAPTER, lambda c, key=key: c.update({key: "none" if key == "bias" else None}))
        load_peft_adapter(bad)
    assert cpp.experts == []
