"""Tiny random HF Llama-family models for the engine tests, and their HF references.

Each variant is small (2-3 layers, hidden 80-96, vocab 300-613) and awkward on purpose:
head_dim 16 or 24 (24 is not a multiple of 16), GQA, MQA and MHA, tied and untied embeddings,
qwen2 q/k/v biases, llama3 rope scaling, an explicit head_dim that differs from hidden / heads,
and a mistral sliding window of 8 that matters at the tests' sequence lengths (20-70).

Weights are drawn from a fixed seed with scales chosen so the model is not flat: attention
scores have a spread of ~2, logits a spread of ~3 (peaked but not one-hot), norms are
1 +- noise, biases are non-zero. Greedy decoding then gives varied tokens.

Test modules import the fixtures:

    from tiny_models import tiny_dirs, hf_models  # noqa: F401  (fixtures)

tiny_dirs: {variant name: folder}, built once per session; hf_models(name, dtype): the HF model
loaded back from that folder (cached), the reference the engine is compared with.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

# name -> (model_type, config kwargs). All variants share eos 2 / bos 1 and max_position 256.
VARIANTS = {
    # GQA 6:2, head_dim derived (96 / 6 = 16), untied, small rope_theta so positions matter.
    "llama_gqa": (
        "llama",
        dict(
            vocab_size=517,
            hidden_size=96,
            intermediate_size=200,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_theta=500.0,
            rms_norm_eps=1e-5,
        ),
    ),
    # MHA, explicit head_dim 24 != 80 / 4, tied embeddings, llama3 rope scaling whose
    # original context (32) puts the head's frequencies in all three llama3 bands.
    "llama3_tied": (
        "llama",
        dict(
            vocab_size=389,
            hidden_size=80,
            intermediate_size=136,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=24,
            tie_word_embeddings=True,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    # q/k/v biases, GQA 4:2, head_dim 24 derived (96 / 4), untied.
    "qwen2_bias": (
        "qwen2",
        dict(
            vocab_size=613,
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_theta=1000.0,
            rms_norm_eps=1e-6,
        ),
    ),
    # MQA 5:1, head_dim 16, sliding window 8.
    "mistral_window": (
        "mistral",
        dict(
            vocab_size=300,
            hidden_size=80,
            intermediate_size=144,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=1,
            head_dim=16,
            tie_word_embeddings=False,
            rope_theta=1000.0,
            rms_norm_eps=1e-5,
            sliding_window=8,
        ),
    ),
}

COMMON = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=256)

# Standard deviation of each parameter kind (matched on the parameter name).
_SCALES = (
    ("norm", None),  # 1 + 0.1 N(0, 1)
    ("bias", 0.2),
    ("q_proj", 0.15),
    ("k_proj", 0.15),
    ("embed_tokens", 0.3),
    ("lm_head", 0.3),
    # Layer outputs large against the embedding, or a tied model keeps predicting its input token.
    ("o_proj", 0.3),
    ("down_proj", 0.3),
    ("", 0.1),
)


def seed_of(name: str) -> int:
    """The seed of a variant's weights in tiny_dirs (its index in VARIANTS)."""
    return list(VARIANTS).index(name)


def make_config(name: str, **overrides):
    """The transformers config of a variant, with overrides (e.g. sliding_window=None)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    model_type, kwargs = VARIANTS[name]
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[model_type]
    return cls(**{**COMMON, **kwargs, **overrides})


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter from a fixed seed with the scales of _SCALES."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            std = next(s for key, s in _SCALES if key in name)
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if std is None else std * noise)


def build_model(name: str, seed: int = 0, **overrides):
    """A float32 eval-mode HF model of the variant with random non-trivial weights."""
    from transformers import AutoModelForCausalLM

    config = make_config(name, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    return model.eval()


def save_model(model, folder: Path, max_shard_size=None) -> Path:
    """save_pretrained as safetensors; a max_shard_size gives shards and an index.json."""
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(folder), **kwargs)
    return folder


def copy_model_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes) -> None:
    """Rewrite config.json with some fields changed (None removes a field)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{variant: folder} for every variant (seed: seed_of(variant)), plus "llama_gqa_sharded": the
    same weights as llama_gqa saved in shards of at most 100 KB with an index.json."""
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for name in VARIANTS:
        model = build_model(name, seed=seed_of(name))
        dirs[name] = save_model(model, root / name)
        if name == "llama_gqa":
            dirs["llama_gqa_sharded"] = save_model(model, root / "llama_gqa_sharded", max_shard_size="100KB")
    return dirs


@pytest.fixture(scope="session")
def hf_models(tiny_dirs):
    """hf_models(name, dtype=torch.float32) -> the HF model loaded back from the variant's
    folder (eager attention), cached."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(name, dtype=torch.float32):
        if (name, dtype) not in cache:
            model = AutoModelForCausalLM.from_pretrained(str(tiny_dirs[name]), dtype=dtype, attn_implementation="eager")
            cache[name, dtype] = model.eval()
        return cache[name, dtype]

    return get
