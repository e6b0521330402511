"""moa_engine.moa_format: the MoA directory (moa_config.json, experts/<domain>/ PEFT folders,
router.safetensors), checked against real PEFT output on a tiny random Llama.

Tiny base: hidden 64, intermediate 112, 2 layers, 4 heads, 2 kv heads (head_dim 16), vocab 128.
"""

import copy
import json
import re
import shutil

import peft  # noqa: F401  (a test dependency: the reference for every adapter check)
import pytest
import safetensors.torch  # noqa: E402
import torch
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from moa_engine.moa_format import (  # noqa: E402
    TARGET_MODULES,
    MoAConfig,
    MoADir,
    RouterConfig,
    load_peft_adapter,
    load_router,
    save_router,
)
from moa_engine.testing import make_random_peft_adapter  # noqa: E402

# PEFT calls a transformers method that warns of its deprecation; the "proj" pattern below is
# meant to match nothing.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match:RuntimeWarning"),
]

HIDDEN, INTER, LAYERS = 64, 112, 2
_LAYER_MODULE = re.compile(r"model\.layers\.(\d+)\.\w+\.(\w+)$")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The tiny Llama saved as an HF folder (config.json + model.safetensors)."""
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(1234)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base_model(base_dir):
    return LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def base_config(base_dir):
    return json.loads((base_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def adapter_dir(base_model, tmp_path_factory):
    """A valid adapter on all seven modules, r 8, the starting point of the error cases."""
    return make_random_peft_adapter(base_model, tmp_path_factory.mktemp("adapters") / "all7", r=8, alpha=16, seed=3)


def lora_modules(peft_model):
    """{(layer, module): PEFT LoRA layer} of a PeftModel's adapter 'default'."""
    found = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            match = _LAYER_MODULE.search(name)
            found[(int(match[1]), match[2])] = module
    return found


def assert_matches_peft(expert, peft_model, gen):
    """Our (A, B, scale) per module give PEFT's get_delta_weight and PEFT's forward."""
    layers = lora_modules(peft_model)
    assert sorted(expert.targets) == sorted(layers)
    for key, (A, B, scale) in expert.targets.items():
        layer = layers[key]
        assert scale == layer.scaling["default"], key
        assert A.shape[0] == layer.r["default"], key
        torch.testing.assert_close(scale * (B @ A), layer.get_delta_weight("default"), msg=str(key))
    # The documented semantics, y = x W^T + scale (x A^T) B^T, on one module's forward.
    key = sorted(expert.targets)[-1]
    A, B, scale = expert.targets[key]
    x = torch.randn(5, A.shape[1], generator=gen)
    with torch.no_grad():
        expected = layers[key].base_layer(x) + scale * (x @ A.T) @ B.T
        torch.testing.assert_close(layers[key](x), expected)


def peft_load(base_model, folder):
    return PeftModel.from_pretrained(copy.deepcopy(base_model), str(folder))


# ---------------------------------------------------------------------------------------------
# moa_config.json
# ---------------------------------------------------------------------------------------------

GOOD_CONFIG = {
    "format_version": 1,
    "base_model": "some/model",
    "domains": ["code", "math_2.v1", "Law-EU"],
    "target_modules": ["q_proj", "v_proj", "down_proj"],
    "router": {"pooling": "mean", "strategy": "vote"},
    "eta": 0.25,
}


def test_config_round_trip(tmp_path):
    config = MoAConfig.from_dict(GOOD_CONFIG)
    assert config.router == RouterConfig("mean", "vote")
    assert config.to_dict() == GOOD_CONFIG
    assert list(config.to_dict()) == list(GOOD_CONFIG)
    config.save(tmp_path / "moa_config.json")
    assert MoAConfig.load(tmp_path / "moa_config.json") == config
    defaults = MoAConfig(base_model="m", domains=["a"])
    assert defaults.target_modules == list(TARGET_MODULES) and defaults.router.strategy == "last"
    assert MoAConfig.from_dict({**GOOD_CONFIG, "eta": 1}).eta == 1.0


CONFIG_ERRORS = [
    ({"extra": 1}, r"unknown field\(s\) \['extra'\]"),
    ({"router": {"pooling": "mean", "strategy": "last", "k": 2}}, r"unknown field\(s\) \['router.k'\]"),
    ({"format_version": 2}, r"'format_version': 2 is newer than this moa_engine supports \(1\)"),
    ({"format_version": "1"}, r"'format_version': expected int, got str"),
    ({"base_model": 3}, r"'base_model': expected str"),
    ({"domains": "code"}, r"'domains': expected list, got str"),
    ({"domains": []}, r"'domains': needs at least one domain"),
    ({"domains": ["a", ""]}, r"'domains': a domain name is empty"),
    ({"domains": ["a", 7]}, r"'domains\[\]': expected str, got int"),
    ({"domains": ["code", "math", "Code"]}, r"'domains': 'Code' duplicates 'code'"),
    ({"domains": ["../etc"]}, r"'domains': '../etc' is not a safe folder name"),
    ({"domains": [".hidden"]}, r"'domains': '.hidden' is not a safe folder name"),
    ({"domains": ["a b"]}, r"'domains': 'a b' is not a safe folder name"),
    ({"domains": ["base"]}, r"'domains': 'base' is reserved"),
    ({"target_modules": ["q_proj", "lm_head"]}, r"'target_modules': 'lm_head' is not one of"),
    ({"target_modules": ["q_proj", "q_proj"]}, r"'target_modules': 'q_proj' is given twice"),
    ({"router": {"pooling": "mean", "strategy": "top1"}}, r"'router.strategy': 'top1' is not one of"),
    ({"router": {"pooling": "max", "strategy": "last"}}, r"'router.pooling': 'max' is not supported"),
    ({"router": "last"}, r"'router': expected an object, got str"),
    ({"eta": True}, r"'eta': expected int or float, got bool"),
    ({"eta": -1.0}, r"'eta': -1.0 is not a finite number >= 0"),
]


@pytest.mark.parametrize("change, message", CONFIG_ERRORS, ids=[m for _, m in CONFIG_ERRORS])
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=r"^cfg\.json: .*" + message):
        MoAConfig.from_dict({**GOOD_CONFIG, **change}, source="cfg.json")


def test_config_missing_field_and_bad_files(tmp_path):
    data = dict(GOOD_CONFIG)
    del data["eta"]
    with pytest.raises(ValueError, match=r"missing field\(s\) \['eta'\]"):
        MoAConfig.from_dict(data)
    with pytest.raises(FileNotFoundError, match="moa_config.json: no such file"):
        MoAConfig.load(tmp_path / "moa_config.json")
    (tmp_path / "moa_config.json").write_text('{"format_version": 1,')
    with pytest.raises(ValueError, match=r"moa_config.json: not valid JSON"):
        MoAConfig.load(tmp_path / "moa_config.json")
    (tmp_path / "moa_config.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"moa_config.json: expected a JSON object, got list"):
        MoAConfig.load(tmp_path / "moa_config.json")


# ---------------------------------------------------------------------------------------------
# PEFT adapters: parsed (A, B, scale) against PEFT itself
# ---------------------------------------------------------------------------------------------

ADAPTERS = {
    "all7": dict(r=8, alpha=16),
    "subset_r4_alpha32": dict(r=4, alpha=32, target_modules=["q_proj", "v_proj"]),
    # Patterns: a full-name regex, a suffix, an alpha pattern for one layer's module only, and
    # "proj", which PEFT matches only as a whole name component, so never here.
    "patterns": dict(
        r=8,
        alpha=16,
        rank_pattern={"^model.layers.0.mlp.down_proj": 2, "k_proj": 4},
        alpha_pattern={"v_proj": 3, "layers.1.self_attn.o_proj": 40, "proj": 99},
    ),
    "rslora": dict(
        r=16,
        alpha=8,
        use_rslora=True,
        rank_pattern={"up_proj": 4},
        target_modules=["gate_proj", "up_proj", "down_proj"],
    ),
    "layers_to_transform": dict(r=6, alpha=6, target_modules=["q_proj", "k_proj"], layers_to_transform=[1]),
    "regex_exclude": dict(
        r=4, alpha=8, target_modules=r".*\.(q_proj|down_proj)", exclude_modules=["model.layers.0.mlp.down_proj"]
    ),
    "init_scale": dict(r=8, alpha=8, init_scale=0.5),
    # Two rank_pattern keys match layer 0's q_proj: the first in the file (sorted by PEFT) wins;
    # rslora scales irrational.
    "first_key_rslora": dict(
        r=6,
        alpha=12,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        rank_pattern={"down_proj": 2, "layers.0.self_attn.q_proj": 3, "q_proj": 5},
        alpha_pattern={r"v_pro.": 5, "o_proj": 20},
    ),
    "layers_pattern_exclude": dict(
        r=3, alpha=9, layers_to_transform=[1], layers_pattern="layers", exclude_modules=["o_proj", "gate_proj"]
    ),
}


@pytest.mark.parametrize("case", list(ADAPTERS))
def test_adapter_matches_peft(case, base_model, base_config, tmp_path, gen):
    folder = make_random_peft_adapter(base_model, tmp_path / case, seed=7, **ADAPTERS[case])
    expert = load_peft_adapter(folder, base_config=base_config)
    assert expert.name == case and expert.path == folder
    assert expert.rank == max(A.shape[0] for A, _, _ in expert.targets.values())
    assert expert.hidden_size == HIDDEN
    assert_matches_peft(expert, peft_load(base_model, folder), gen)


def test_adapter_patterns_and_scales(base_model, tmp_path):
    """The values PEFT's pattern rules give, written out."""
    expert = load_peft_adapter(make_random_peft_adapter(base_model, tmp_path / "p", **ADAPTERS["patterns"]))
    ranks = {key: A.shape[0] for key, (A, _, _) in expert.targets.items()}
    scales = {key: s for key, (_, _, s) in expert.targets.items()}
    assert ranks[(0, "down_proj")] == 2 and ranks[(1, "down_proj")] == 8  # "^model.layers.0..." anchors
    assert ranks[(0, "k_proj")] == ranks[(1, "k_proj")] == 4
    assert scales[(0, "k_proj")] == 16 / 4  # rank_pattern alone changes the scale: alpha / r
    assert scales[(0, "v_proj")] == 3 / 8 and scales[(1, "o_proj")] == 40 / 8 and scales[(0, "o_proj")] == 2.0
    rs = load_peft_adapter(make_random_peft_adapter(base_model, tmp_path / "rs", **ADAPTERS["rslora"]))
    assert rs.targets[(0, "up_proj")][2] == 8 / 2.0 and rs.targets[(0, "gate_proj")][2] == 8 / 4.0
    layers = load_peft_adapter(make_random_peft_adapter(base_model, tmp_path / "l", **ADAPTERS["layers_to_transform"]))
    assert sorted(layers.targets) == [(1, "k_proj"), (1, "q_proj")] and layers.modules == ["q_proj", "k_proj"]


def test_make_random_peft_adapter(base_model, base_dir, tmp_path):
    before = {k: v.clone() for k, v in base_model.state_dict().items()}
    rng_before = torch.get_rng_state()
    a = load_peft_adapter(make_random_peft_adapter(base_model, tmp_path / "a", seed=1, init_scale=0.5))
    assert torch.equal(torch.get_rng_state(), rng_before), "the global RNG must be left as it was"
    assert not any("lora" in name for name, _ in base_model.named_modules()), "LoRA layers left on the base"
    assert base_model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in base_model.state_dict().items())
    again = load_peft_adapter(make_random_peft_adapter(str(base_dir), tmp_path / "a", seed=1, init_scale=0.5))
    other = load_peft_adapter(make_random_peft_adapter(base_model, tmp_path / "b", seed=2, init_scale=0.5))
    for key, (A, B, _) in a.targets.items():
        assert torch.equal(A, again.targets[key][0]) and torch.equal(B, again.targets[key][1])
        assert not torch.equal(A, other.targets[key][0])
    B = torch.cat([B.flatten() for _, B, _ in a.targets.values()])
    assert 0.8 < float(B.std()) / (0.5 / 8**0.5) < 1.2  # B ~ N(0, init_scale^2 / r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"], "temporary folders left behind"


# ---------------------------------------------------------------------------------------------
# PEFT adapters: errors
# ---------------------------------------------------------------------------------------------


def edited_copy(src, dst, config=None, tensors=None):
    """Copy a PEFT folder to dst; config(dict) and tensors(dict) edit in place."""
    shutil.copytree(src, dst)
    if config:
        data = json.loads((dst / "adapter_config.json").read_text())
        config(data)
        (dst / "adapter_config.json").write_text(json.dumps(data))
    if tensors:
        sd = safetensors.torch.load_file(dst / "adapter_model.safetensors")
        tensors(sd)
        safetensors.torch.save_file(sd, dst / "adapter_model.safetensors")
    return dst


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
Q1 = "base_model.model.model.layers.1.self_attn.q_proj"


def _set(**values):
    return lambda d: d.update(values)


def _retype_q1_input(sd):
    sd[f"{Q1}.lora_A.weight"] = torch.randn(8, 32)


ADAPTER_ERRORS = {
    "peft_type": (dict(config=_set(peft_type="IA3")), r"adapter_config.json: peft_type is \"IA3\"; only 'LORA'"),
    "dora": (
        dict(config=_set(use_dora=True)),
        r"adapter_config.json: DoRA \(use_dora\) is not supported \(use_dora=true\)",
    ),
    "bias": (dict(config=_set(bias="all")), r"adapter_config.json: bias is not supported \(bias=\"all\"\)"),
    "modules_to_save": (dict(config=_set(modules_to_save=["lm_head"])), r"modules_to_save is not supported"),
    "fan_in_fan_out": (
        dict(config=_set(fan_in_fan_out=True)),
        r"fan_in_fan_out is not supported \(fan_in_fan_out=true\)",
    ),
    "lora_bias": (dict(config=_set(lora_bias=True)), r"lora_bias is not supported"),
    "targets_outside_config": (
        dict(config=_set(target_modules=["q_proj", "embed_tokens", "lm_head"])),
        r"adapter_config.json: targets modules the engine does not support: \['embed_tokens', 'lm_head'\]",
    ),
    "targets_outside_weights": (
        dict(tensors=lambda sd: sd.update({"base_model.model.lm_head.lora_A.weight": torch.randn(8, 64)})),
        r"adapter_model.safetensors: adapts modules the engine does not support: \['lm_head'\]",
    ),
    "unexpected_tensor": (
        dict(tensors=lambda sd: sd.update({f"{Q0}.lora_magnitude_vector": torch.randn(64)})),
        r"adapter_model.safetensors: unexpected tensor\(s\) "
        r"\['base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector'\]",
    ),
    "a_without_b": (
        dict(tensors=lambda sd: sd.pop(f"{Q1}.lora_B.weight")),
        r"adapter_model.safetensors: model.layers.1.self_attn.q_proj has lora_A but no lora_B",
    ),
    "b_without_a": (
        dict(tensors=lambda sd: sd.pop(f"{Q0}.lora_A.weight")),
        r"model.layers.0.self_attn.q_proj has lora_B but no lora_A",
    ),
    "ranks_differ": (
        dict(tensors=lambda sd: sd.update({f"{Q0}.lora_B.weight": torch.randn(64, 4)})),
        r"model.layers.0.self_attn.q_proj: lora_A \[8, 64\] has rank 8 but lora_B \[64, 4\] has rank 4",
    ),
    "rank_not_config": (
        dict(config=_set(rank_pattern={"layers.1.self_attn.q_proj": 6})),
        r"model.layers.1.self_attn.q_proj: adapter_config.json gives rank 6 \(r / rank_pattern\) "
        r"but lora_A is \[8, 64\]",
    ),
    "layers_disagree": (
        dict(tensors=_retype_q1_input),
        r"adapter_model.safetensors: q_proj is \[in=32, out=64\] in layer 1 but \[in=64, out=64\] in layer 0",
    ),
    "not_targeted_layer": (
        dict(config=_set(layers_to_transform=[0])),
        r"has weights for model.layers.1.self_attn.q_proj, which adapter_config.json does not target",
    ),
    "not_a_matrix": (
        dict(tensors=lambda sd: sd.update({f"{Q0}.lora_A.weight": torch.randn(8, 64, 1)})),
        r"q_proj: expected lora_A \[r, in\] and lora_B \[out, r\], got \[8, 64, 1\] and \[64, 8\]",
    ),
}


@pytest.mark.parametrize("case", list(ADAPTER_ERRORS))
def test_adapter_errors(case, adapter_dir, tmp_path):
    edits, message = ADAPTER_ERRORS[case]
    folder = edited_copy(adapter_dir, tmp_path / "bad", **edits)
    with pytest.raises(ValueError, match=message):
        load_peft_adapter(folder)


def test_adapter_keys_with_adapter_name_or_without_prefix(adapter_dir, tmp_path):
    """Keys as a PeftModel's state_dict has them (".lora_A.default.weight"), or without the
    "base_model.model." prefix, read the same."""
    want = load_peft_adapter(adapter_dir).targets

    def rename(edit):
        return lambda sd: [sd.update({edit(k): sd.pop(k)}) for k in list(sd)]

    with_name = rename(lambda k: k.replace(".weight", ".default.weight"))
    named = edited_copy(adapter_dir, tmp_path / "named", tensors=with_name)
    bare = edited_copy(adapter_dir, tmp_path / "bare", tensors=rename(lambda k: k.removeprefix("base_model.model.")))
    for folder in (named, bare):
        got = load_peft_adapter(folder).targets
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k][0], want[k][0]) and torch.equal(got[k][1], want[k][1]) for k in want)


def test_adapter_file_errors(adapter_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such PEFT adapter folder"):
        load_peft_adapter(tmp_path / "nowhere")
    folder = edited_copy(adapter_dir, tmp_path / "a")
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    with pytest.raises(ValueError, match=r"a/adapter_config.json: not valid JSON"):
        load_peft_adapter(folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"a/adapter_config.json: no such file"):
        load_peft_adapter(folder)

    folder = edited_copy(adapter_dir, tmp_path / "b")
    weights = folder / "adapter_model.safetensors"
    payload = weights.read_bytes()
    for corrupt in (payload[: len(payload) // 2], b"\x00" * 7, b"\xff" * 64 + payload[64:]):
        weights.write_bytes(corrupt)
        with pytest.raises(
            ValueError,
            match=r"b/adapter_model.safetensors: (not a safetensors file|corrupt safetensors header|corrupt entry for tensor)",
        ):
            load_peft_adapter(folder)
    weights.unlink()
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    message = r"adapter_model.safetensors: no such file \(found \['adapter_model.bin'\]; only safetensors"
    with pytest.raises(FileNotFoundError, match=message):
        load_peft_adapter(folder)


def test_adapter_for_another_base(adapter_dir, base_config, tmp_path):
    wider = {**base_config, "hidden_size": 80, "head_dim": 16}
    with pytest.raises(
        ValueError,
        match=r"adapter made for another base: model.layers.0.self_attn.q_proj expects lora_A \[8, 80\] "
        r"and lora_B \[64, 8\], got \[8, 64\] and \[64, 8\]",
    ):
        load_peft_adapter(adapter_dir, base_config=wider)
    fewer_kv = {**base_config, "num_key_value_heads": 1}
    message = r"k_proj expects lora_A \[8, 64\] and lora_B \[16, 8\], got \[8, 64\] and \[32, 8\]"
    with pytest.raises(ValueError, match=message):
        load_peft_adapter(adapter_dir, base_config=fewer_kv)
    with pytest.raises(ValueError, match=r"adapts layer 1 but the base model has 1 layers"):
        load_peft_adapter(adapter_dir, base_config={**base_config, "num_hidden_layers": 1})
    with pytest.raises(ValueError, match=r"base_config: missing required field 'intermediate_size'"):
        load_peft_adapter(adapter_dir, base_config={k: v for k, v in base_config.items() if k != "intermediate_size"})
    folder = edited_copy(
        adapter_dir, tmp_path / "holes", tensors=lambda sd: [sd.pop(f"{Q1}.lora_{ab}.weight") for ab in "AB"]
    )
    load_peft_adapter(folder)  # fine without a base to compare with
    message = r"has no weights for model.layers.1.self_attn.q_proj, which adapter_config.json targets"
    with pytest.raises(ValueError, match=message):
        load_peft_adapter(folder, base_config=base_config)


def test_overlapping_rank_patterns_that_peft_cannot_reload(base_model, tmp_path):
    """PEFT gives a module the rank of the first rank_pattern key that matches it, in the
    config's order. PEFT before 0.22 saved the keys sorted, so overlapping patterns gave a file
    whose config disagrees with its weights, which PEFT itself cannot load: we refuse it with a
    clear message. Where the saved order is the order PEFT applied, the file loads, with PEFT's
    ranks."""
    folder = make_random_peft_adapter(
        base_model,
        tmp_path / "overlap",
        target_modules=["q_proj"],
        rank_pattern={"q_proj": 2, "layers.1.self_attn.q_proj": 6},
    )
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    # The order PEFT applied: "q_proj" matches layer 1 first, so its rank is 2.
    config["rank_pattern"] = {"q_proj": 2, "layers.1.self_attn.q_proj": 6}
    config_path.write_text(json.dumps(config))
    reference = peft_load(base_model, folder).base_model.model.model.layers[1].self_attn.q_proj
    assert tuple(reference.lora_A["default"].weight.shape) == (2, 64)
    ours = load_peft_adapter(folder)
    assert tuple(ours.targets[(1, "q_proj")][0].shape) == (2, 64)
    # The sorted order older PEFT wrote: layer 1's key now matches first and says 6.
    config["rank_pattern"] = dict(sorted(config["rank_pattern"].items()))
    config_path.write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_load(base_model, folder)
    message = r"layers.1.self_attn.q_proj: adapter_config.json gives rank 6 .* lora_A is \[2, 64\]"
    with pytest.raises(ValueError, match=message):
        load_peft_adapter(folder)


# ---------------------------------------------------------------------------------------------
# router.safetensors
# ---------------------------------------------------------------------------------------------


def test_router_round_trip(tmp_path, gen):
    weights = [torch.randn(3, HIDDEN, generator=gen, dtype=torch.float64), torch.randn(HIDDEN, 3, generator=gen).t()]
    save_router(tmp_path / "router.safetensors", weights)
    loaded = load_router(tmp_path / "router.safetensors", n_layers=2, n_domains=3, hidden=HIDDEN)
    assert [w.dtype for w in loaded] == [torch.float32] * 2
    for got, want in zip(loaded, weights):
        assert torch.equal(got, want.float())
    keys = safetensors.torch.load_file(tmp_path / "router.safetensors").keys()
    assert sorted(keys) == ["layers.0.weight", "layers.1.weight"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router.safetensors"]


def test_router_errors(tmp_path, gen):
    path = tmp_path / "router.safetensors"
    save_router(path, [torch.randn(3, HIDDEN, generator=gen)] * 2)
    with pytest.raises(ValueError, match=r"router has 3 outputs but the MoA dir has 2 domains"):
        load_router(path, n_domains=2)
    with pytest.raises(ValueError, match=r"router has 2 layers but the model has 3"):
        load_router(path, n_layers=3)
    with pytest.raises(ValueError, match=r"router input size is 64 but the model's hidden size is 80"):
        load_router(path, hidden=80)
    w = torch.randn(3, HIDDEN, generator=gen)
    safetensors.torch.save_file({"layers.0.weight": w, "layers.2.weight": w.clone()}, path)
    with pytest.raises(ValueError, match=r"router.safetensors: lacks layers.1.weight \(has layers \[0, 2\]\)"):
        load_router(path)
    safetensors.torch.save_file({"layers.0.weight": w, "layers.1.weight": w[:2].clone()}, path)
    with pytest.raises(ValueError, match=r"layer 1 is \[2, 64\] but layer 0 is \[3, 64\]"):
        load_router(path)
    safetensors.torch.save_file({"layers.0.weight": w, "layers.0.bias": w[0].clone()}, path)
    with pytest.raises(ValueError, match=r"unexpected tensor 'layers.0.bias'"):
        load_router(path)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(
        ValueError,
        match=r"router.safetensors: (not a safetensors file|corrupt safetensors header|corrupt entry for tensor)",
    ):
        load_router(path)
    with pytest.raises(FileNotFoundError, match=r"none.safetensors: no such router file"):
        load_router(tmp_path / "none.safetensors")
    message = r"layer 0: expected a floating \[n_domains, hidden\] tensor, got torch.float32 \[64\]"
    with pytest.raises(ValueError, match=message):
        save_router(path, [w[0]])
    with pytest.raises(ValueError, match=r"expected a non-empty list"):
        save_router(path, [])


# ---------------------------------------------------------------------------------------------
# The MoA directory
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def experts(base_model, tmp_path):
    """Two experts: 'code' as a PEFT folder, 'math' as a live PeftModel whose adapter is not 'default'."""
    code = make_random_peft_adapter(base_model, tmp_path / "src" / "code", r=4, alpha=8, seed=11)
    math_model = get_peft_model(
        copy.deepcopy(base_model),
        LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
        adapter_name="math",
    )
    return {"code": code, "math": math_model}


def test_moa_dir_round_trip(experts, base_model, base_config, tmp_path, gen):
    config = MoAConfig(base_model="tiny", domains=["math", "code"], router=RouterConfig(strategy="per_layer"))
    router = [torch.randn(2, HIDDEN, generator=gen) for _ in range(LAYERS)]
    out = MoADir.save(tmp_path / "moa", config, experts, router)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "experts",
        "experts/code",
        "experts/code/adapter_config.json",
        "experts/code/adapter_model.safetensors",
        "experts/math",
        "experts/math/adapter_config.json",
        "experts/math/adapter_model.safetensors",
        "moa_config.json",
        "router.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moa", "src"], "temporary folders left behind"

    moa = MoADir.load(out)
    assert moa.config == config and list(moa.expert_paths) == ["math", "code"]
    assert all(torch.equal(a, b) for a, b in zip(moa.router, router))
    loaded = moa.load_experts(base_config)
    assert [e.name for e in loaded] == ["math", "code"]
    for expert in loaded:
        assert_matches_peft(expert, peft_load(base_model, out / "experts" / expert.name), gen)

    folders = {"math": out / "experts/math", "code": out / "experts/code"}
    no_router = MoADir.save(tmp_path / "experts_only", config, folders)
    assert MoADir.load(no_router).router is None


def test_moa_dir_overwrite(experts, tmp_path):
    config = MoAConfig(base_model="tiny", domains=["code"])
    out = MoADir.save(tmp_path / "moa", config, {"code": experts["code"]})
    with pytest.raises(FileExistsError, match=r"moa: already exists \(pass overwrite=True"):
        MoADir.save(out, config, {"code": experts["code"]})
    config2 = MoAConfig(base_model="tiny", domains=["math"])
    MoADir.save(out, config2, {"math": experts["math"]}, overwrite=True)
    assert sorted(p.name for p in (out / "experts").iterdir()) == ["math"]
    assert MoADir.load(out).config == config2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moa", "src"]


def test_moa_dir_save_errors(experts, tmp_path, gen):
    config = MoAConfig(base_model="tiny", domains=["code", "math"], target_modules=["q_proj", "down_proj"])
    out = tmp_path / "moa"
    with pytest.raises(ValueError, match=r"missing \['math'\], extra \['law'\]"):
        MoADir.save(out, config, {"code": experts["code"], "law": experts["math"]})
    with pytest.raises(ValueError, match=r"router has 3 outputs but the MoA dir has 2 domains"):
        MoADir.save(out, config, experts, [torch.randn(3, HIDDEN, generator=gen)])
    message = r"expert 'code' adapts \['k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj'\], not in"
    with pytest.raises(ValueError, match=message):
        MoADir.save(out, config, experts)
    wide = MoAConfig(base_model="tiny", domains=["code", "math"])
    message = r"experts and router disagree on the hidden size: \{'code': 64, 'math': 64, 'router': 80\}"
    with pytest.raises(ValueError, match=message):
        MoADir.save(out, wide, experts, [torch.randn(2, 80, generator=gen)])
    broken = edited_copy(experts["code"], tmp_path / "broken", config=_set(use_dora=True))
    with pytest.raises(ValueError, match=r"broken/adapter_config.json: DoRA"):
        MoADir.save(out, wide, {"code": broken, "math": experts["math"]})
    with pytest.raises(ValueError, match=r"expected a PEFT folder path or a peft.PeftModel, got dict"):
        MoADir.save(out, wide, {"code": {}, "math": experts["math"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "src"], "a failed save left files"


def test_moa_dir_load_errors(experts, tmp_path, gen):
    config = MoAConfig(base_model="tiny", domains=["code", "math"])
    out = MoADir.save(tmp_path / "moa", config, experts, [torch.randn(2, HIDDEN, generator=gen)])
    save_router(out / "router.safetensors", [torch.randn(3, HIDDEN, generator=gen)])
    with pytest.raises(ValueError, match=r"router has 3 outputs but the MoA dir has 2 domains"):
        MoADir.load(out)
    (out / "router.safetensors").unlink()
    (out / "experts/math/adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"experts/math/adapter_model.safetensors: missing \(domain 'math' of"):
        MoADir.load(out)
    shutil.rmtree(out / "experts")
    with pytest.raises(FileNotFoundError, match=r"experts/code/adapter_config.json: missing"):
        MoADir.load(out)
    (out / "moa_config.json").write_text(json.dumps({**config.to_dict(), "format_version": 9}))
    with pytest.raises(ValueError, match=r"moa/moa_config.json: field 'format_version': 9 is newer"):
        MoADir.load(out)
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such MoA directory"):
        MoADir.load(tmp_path / "nowhere")
