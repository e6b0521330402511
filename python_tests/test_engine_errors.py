"""Bad inputs to moa_engine.Engine: every one raises the documented exception with a message
that names the problem, and leaves the engine usable.

Model folders are damaged copies of a tiny random model (tiny_models.py): config.json
edits, safetensors files with a tensor removed or reshaped, truncated files, garbage and
lying headers, broken shard indexes. A fuzz loop (random byte flips and truncations) runs in
a subprocess, so a crash shows up as a failing test rather than a dead pytest.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
from tiny_models import copy_model_dir, edit_config, tiny_dirs  # noqa: F401  (fixture)

import moa_engine
from moa_engine import _C, models

NAME = "llama_gqa"  # vocab 517, hidden 96, 6 heads (head_dim 16), 2 kv heads, 3 layers, untied
VOCAB = 517


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    return moa_engine.Engine(tiny_dirs[NAME], max_batch=2, max_seq_len=40)


@pytest.fixture
def folder(tiny_dirs, tmp_path):
    """A fresh copy of the tiny model's folder, to damage."""
    return copy_model_dir(tiny_dirs[NAME], tmp_path / "model")


def load(folder, **options):
    return moa_engine.Engine(folder, max_batch=1, max_seq_len=32, **options)


def read_safetensors(path: Path):
    """(header dict, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors(path: Path, header: dict, data: bytes, header_len: int | None = None) -> None:
    """A safetensors file with the given header and data; header_len overrides the length field."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if header_len is None else header_len) + text + data)


def assert_engine_works(engine, prompt=(5, 9, 200)):
    """The engine is idle and generates as before (greedy is deterministic)."""
    assert engine._core.idle()
    first = engine.generate([list(prompt)], max_new_tokens=4, ignore_eos=True)[0].token_ids
    assert len(first) == 4
    assert engine.generate([list(prompt)], max_new_tokens=4, ignore_eos=True)[0].token_ids == first


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------

BAD_REQUESTS = [
    # (prompts, generate kwargs, exception, message pattern)
    ([[]], {}, ValueError, r"prompt is empty"),
    ([[4, 5], []], {}, ValueError, r"prompt is empty"),
    ([], {}, ValueError, r"prompts is empty"),
    ([4, 5, 6], {}, ValueError, r"flat list of ints"),
    ([[1.5, 2.0]], {}, ValueError, r"string or a list of token ids, got list"),
    ([3.5], {}, ValueError, r"string or a list of token ids, got float"),
    (["hello"], {}, ValueError, r"text prompts need a tokenizer"),
    (
        [[1, 2, 3] * 8],
        dict(max_new_tokens=17),
        ValueError,
        r"prompt \(24 tokens\) \+ max_new_tokens \(17\) = 41 exceeds max_seq_len \(40\)",
    ),
    ([[1]], dict(max_new_tokens=40), ValueError, r"= 41 exceeds max_seq_len \(40\)"),
    ([[1, 2]], dict(max_new_tokens=0), ValueError, r"max_new_tokens must be > 0, got 0"),
    ([[1, 2]], dict(max_new_tokens=-3), ValueError, r"max_new_tokens must be > 0, got -3"),
    ([[1, VOCAB]], {}, ValueError, rf"prompt token 1 is {VOCAB}, outside the vocabulary \[0, {VOCAB}\)"),
    ([[3, 4], [-1, 7]], {}, ValueError, rf"prompt token 0 is -1, outside the vocabulary \[0, {VOCAB}\)"),
    ([[1, 2]], dict(temperature=1.0, top_p=0.0), ValueError, r"top_p must be in \(0, 1\], got 0"),
    ([[1, 2]], dict(temperature=1.0, top_p=1.5), ValueError, r"top_p must be in \(0, 1\], got 1.5"),
    ([[1, 2]], dict(temperature=1.0, top_p=-0.2), ValueError, r"top_p must be in \(0, 1\], got -0.2"),
    ([[1, 2]], dict(temperature=1.0, top_p=math.nan), ValueError, r"top_p must be in \(0, 1\], got nan"),
    ([[1, 2]], dict(temperature=-0.5), ValueError, r"temperature must be >= 0, got -0.5"),
    ([[1, 2]], dict(temperature=math.nan), ValueError, r"temperature must be >= 0, got nan"),
    ([[1, 2]], dict(temperature=1.0, top_k=-1), ValueError, r"top_k must be >= 0 \(0: no limit\), got -1"),
    ([[1, 2]], dict(temperature=1.0, seed=-1), ValueError, r"seed must be in \[0, 2\*\*64\), got -1"),
    (
        [[1, 2]],
        dict(temperature=1.0, seed=2**64),
        ValueError,
        r"seed must be in \[0, 2\*\*64\), got 18446744073709551616",
    ),
    ([[1, 2]], dict(stop="x"), ValueError, r"stop strings need a tokenizer"),
    ([[1, 2]], dict(stop=["ok", ""]), ValueError, r"stop must be a non-empty string or a list of them"),
    ([[1, 2]], dict(chat=True), ValueError, r"chat=True needs text prompts or message lists, not token ids"),
]


@pytest.mark.parametrize("prompts,kwargs,exc,pattern", BAD_REQUESTS, ids=[p for *_, p in BAD_REQUESTS])
def test_bad_request_raises_and_leaves_the_engine_usable(engine, prompts, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        engine.generate(prompts, **{"max_new_tokens": 4, **kwargs})
    assert_engine_works(engine)


def test_limits_themselves_are_accepted(engine):
    """The edges of the valid ranges: prompt + max_new_tokens == max_seq_len, top_p = 1,
    the largest token id, temperature 0, seed 2**64 - 1."""
    [c] = engine.generate([[VOCAB - 1] * 30], max_new_tokens=10, ignore_eos=True)
    assert len(c.token_ids) == 10
    [c] = engine.generate([[0]], max_new_tokens=39, temperature=1.0, top_p=1.0, seed=2**64 - 1, ignore_eos=True)
    assert len(c.token_ids) == 39


def test_a_bad_request_in_a_batch_runs_none_of_them(engine):
    """generate() checks every request before it runs any (all or nothing)."""
    with pytest.raises(ValueError, match=r"prompt token 2 is 9999"):
        engine.generate([[1, 2, 3], [4, 5, 9999]], max_new_tokens=3)
    assert engine._core.idle()
    # Nothing was queued: the next step has no events.
    assert engine._core.step() == []
    assert_engine_works(engine)


def test_low_level_request_errors(engine):
    core = engine._core
    r = _C.GenerationRequest()
    r.prompt = [1, 2]
    r.max_new_tokens = 3
    r.stop_sequences = [[5], []]
    with pytest.raises(ValueError, match=r"stop sequences must not be empty"):
        core.submit(r)
    r.stop_sequences = []
    r.prompt = []
    with pytest.raises(ValueError, match=r"prompt is empty"):
        core.generate([r])
    assert core.idle()


def test_stream_without_a_tokenizer_is_refused(engine):
    with pytest.raises(ValueError, match=r"stream\(\) needs a tokenizer"):
        next(engine.stream([1, 2, 3]))


def test_on_token_exception_propagates_and_frees_the_engine(engine):
    prompts = [[7, 8, 9], [10, 11]]
    ref = [list(r.token_ids) for r in engine._core.generate([request(p, 6) for p in prompts])]

    def boom(index, token):
        raise KeyError("boom from on_token")

    with pytest.raises(KeyError, match="boom from on_token"):
        engine._core.generate([request(p, 6) for p in prompts], boom)
    assert engine._core.idle()
    assert [list(r.token_ids) for r in engine._core.generate([request(p, 6) for p in prompts])] == ref


def request(prompt, max_new_tokens):
    r = _C.GenerationRequest()
    r.prompt = list(prompt)
    r.max_new_tokens = max_new_tokens
    r.ignore_eos = True
    return r


# ---------------------------------------------------------------------------------------------
# forward()
# ---------------------------------------------------------------------------------------------

BAD_FORWARD = [
    (lambda: torch.zeros(2, 3, 4, dtype=torch.long), r"expected \[B, T\], got a 3-D tensor"),
    (lambda: torch.tensor(5), r"expected \[B, T\], got a 0-D tensor"),
    (lambda: torch.rand(2, 3), r"expected an integer tensor, got Float"),
    (lambda: torch.ones(2, 3, dtype=torch.bool), r"expected an integer tensor, got Bool"),
    (lambda: torch.zeros(2, 0, dtype=torch.long), r"expected B > 0 and T > 0, got \[2, 0\]"),
    (lambda: torch.zeros(0, 5, dtype=torch.long), r"expected B > 0 and T > 0, got \[0, 5\]"),
    (lambda: torch.zeros(1, 41, dtype=torch.long), r"T = 41 exceeds max_seq_len \(40\)"),
    (lambda: torch.tensor([[1, 2, VOCAB]]), rf"token ids must be in \[0, {VOCAB}\), got values in \[1, {VOCAB}\]"),
    (lambda: torch.tensor([[-3, 2, 4]]), rf"token ids must be in \[0, {VOCAB}\), got values in \[-3, 4\]"),
]


@pytest.mark.parametrize("make,pattern", BAD_FORWARD, ids=[p for _, p in BAD_FORWARD])
def test_bad_forward_input_raises(engine, make, pattern):
    with pytest.raises(ValueError, match=pattern):
        engine.forward(make())
    assert engine.forward(torch.tensor([[1, 2, 3]])).shape == (1, 3, VOCAB)


# ---------------------------------------------------------------------------------------------
# Engine options and model paths
# ---------------------------------------------------------------------------------------------

BAD_OPTIONS = [
    (dict(dtype="float16"), r"dtype 'float16' is supported on CUDA only; on CPU use 'float32' or 'bfloat16'"),
    (dict(dtype="int8"), r"dtype 'int8' is not supported \(expected auto, float32, bfloat16 or float16\)"),
    (dict(device="cuda"), r"device 'cuda' is not supported by this build"),
    (dict(max_batch=0), r"max_batch must be > 0, got 0"),
    (dict(max_seq_len=1), r"max_seq_len must be > 1, got 1"),
    (dict(max_prefill_tokens=0), r"max_prefill_tokens must be > 0, got 0"),
]


@pytest.mark.parametrize("options,pattern", BAD_OPTIONS, ids=[p for _, p in BAD_OPTIONS])
def test_bad_engine_options_raise(tiny_dirs, options, pattern):
    kwargs = {"max_batch": 1, "max_seq_len": 32, **options}
    with pytest.raises(ValueError, match=pattern):
        moa_engine.Engine(tiny_dirs[NAME], **kwargs)


def test_missing_model_paths_raise_file_not_found(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match=r"not found \(no file or folder at"):
        moa_engine.Engine(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no such model folder"):
        _C.Engine(str(tmp_path / "nowhere"))
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(FileNotFoundError, match=r"is a file but not a \.gguf file"):
        moa_engine.Engine(tmp_path / "weights.bin")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        moa_engine.Engine(folder)
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing \(a model folder needs config\.json\)"):
        _C.Engine(str(folder))


def test_folder_without_weights_raises_file_not_found(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        load(folder)


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    (dict(model_type="gpt2"), r"model_type 'gpt2' is not supported \(supported: llama, mistral, qwen2\)"),
    (dict(model_type=None), r"model_type '' is not supported"),
    (dict(hidden_size=None), r"missing required field 'hidden_size'"),
    (dict(hidden_size="96"), r"field 'hidden_size' has the wrong type \(\"96\"\)"),
    (dict(vocab_size=0), r"expected 'vocab_size' > 0, got 0"),
    (dict(num_key_value_heads=4), r"num_attention_heads \(6\) must be a multiple of num_key_value_heads \(4\)"),
    (dict(head_dim=15), r"expected an even head_dim > 0, got 15"),
    (
        dict(hidden_size=100, head_dim=None),
        r"hidden_size \(100\) is not a multiple of num_attention_heads \(6\) and head_dim is not given",
    ),
    (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported \(supported: silu\)"),
    (dict(mlp_bias=True), r"mlp_bias = true is not supported"),
    (
        dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0}),
        r"rope_scaling type 'yarn' is not supported",
    ),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": -1.0}), r"expected rope_theta > 0"),
    (dict(eos_token_id="two"), r"field 'eos_token_id' must be an integer or a list"),
]


@pytest.mark.parametrize("changes,pattern", BAD_CONFIGS, ids=[p[:40] for _, p in BAD_CONFIGS])
def test_bad_config_raises_value_error_naming_it(folder, changes, pattern):
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=r"config\.json: " + pattern):
        load(folder)


def test_qwen2_sliding_window_is_refused(tiny_dirs, tmp_path):
    folder = copy_model_dir(tiny_dirs["qwen2_bias"], tmp_path / "qwen")
    edit_config(folder, use_sliding_window=True, sliding_window=8)
    with pytest.raises(ValueError, match=r"qwen2 with use_sliding_window = true is not supported"):
        load(folder)


@pytest.mark.parametrize("text", ['{"model_type": "llama", ', "not json", "[1, 2]", ""])
def test_invalid_config_json_raises(folder, text):
    (folder / "config.json").write_text(text)
    pattern = r"expected a JSON object" if text == "[1, 2]" else r"not valid JSON"
    with pytest.raises(ValueError, match=r"config\.json: " + pattern):
        load(folder)


@pytest.mark.slow
@pytest.mark.parametrize("field", ["vocab_size", "eos_token_id"])
def test_deeply_nested_config_value_is_an_error_not_a_crash(folder, field):
    """A value nested 100k deep: the message describes it instead of printing it (printing
    recurses once per level and overflowed the stack). Run in a child process."""
    text = (folder / "config.json").read_text()
    depth = 100_000
    text = text.replace(f'"{field}": ', f'"{field}": ' + "[" * depth + "1" + "]" * depth + ', "_was": ', 1)
    (folder / "config.json").write_text(text)
    code = (
        "import sys, moa_engine._C as C\n"
        "try:\n    C.Engine(sys.argv[1])\nexcept ValueError as e:\n    print('ValueError', str(e)[:300])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"child died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("ValueError") and f"'{field}'" in proc.stdout and "a list of 1 items" in proc.stdout


def test_invalid_generation_config_json_raises(folder):
    (folder / "generation_config.json").write_text("{eos: 2}")
    with pytest.raises(ValueError, match=r"generation_config\.json: not valid JSON"):
        load(folder)


# ---------------------------------------------------------------------------------------------
# Tensors: missing, misshapen, wrong dtype, config / checkpoint disagreement
# ---------------------------------------------------------------------------------------------


def rewrite_tensors(folder, edit):
    """Load model.safetensors, let edit(tensors) change the dict, save it back."""
    path = folder / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    edit(tensors)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.2.self_attn.v_proj.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.embed_tokens.weight",
        "model.layers.0.post_attention_layernorm.weight",
    ],
)
def test_missing_tensor_is_named(folder, name):
    rewrite_tensors(folder, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"missing tensor '{name}' \(needed by llama with this config\.json\)"):
        load(folder)


def test_untied_config_over_a_tied_checkpoint_names_lm_head(tiny_dirs, tmp_path):
    folder = copy_model_dir(tiny_dirs["llama3_tied"], tmp_path / "tied")
    edit_config(folder, tie_word_embeddings=False)
    with pytest.raises(ValueError, match=r"missing tensor 'lm_head\.weight'"):
        load(folder)


def test_qwen2_without_its_biases_names_the_bias(tiny_dirs, tmp_path):
    folder = copy_model_dir(tiny_dirs["qwen2_bias"], tmp_path / "qwen")
    rewrite_tensors(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
        load(folder)


@pytest.mark.parametrize(
    "name,shape,want",
    [
        ("model.layers.0.self_attn.k_proj.weight", [33, 96], [32, 96]),
        ("model.layers.2.mlp.down_proj.weight", [96, 199], [96, 200]),
        ("model.norm.weight", [96, 1], [96]),
        ("model.embed_tokens.weight", [516, 96], [517, 96]),
        ("lm_head.weight", [96, 517], [517, 96]),
    ],
)
def test_misshapen_tensor_names_both_shapes(folder, gen, name, shape, want):
    rewrite_tensors(folder, lambda t: t.__setitem__(name, torch.randn(shape, generator=gen)))
    s = lambda v: r"\[" + ", ".join(map(str, v)) + r"\]"  # noqa: E731
    pattern = rf"tensor '{name}' has shape {s(shape)}, expected {s(want)} from config\.json"
    with pytest.raises(ValueError, match=pattern):
        load(folder)


def test_config_sizes_that_disagree_with_the_checkpoint_name_the_tensor(folder):
    edit_config(folder, intermediate_size=201)
    pattern = r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[200, 96\], expected \[201, 96\]"
    with pytest.raises(ValueError, match=pattern):
        load(folder)


def test_absurd_config_sizes_are_a_value_error_not_an_allocation_failure(folder):
    """A config.json whose vocab_size disagrees wildly with the checkpoint is the same
    error as a small disagreement: the checkpoint's shape is checked before memory of the
    config's size is allocated."""
    edit_config(folder, vocab_size=10**12)
    pattern = r"'model\.embed_tokens\.weight' has shape \[517, 96\], expected \[1000000000000, 96\]"
    with pytest.raises(ValueError, match=pattern):
        load(folder)


def test_integer_tensor_is_refused(folder):
    name = "model.layers.1.input_layernorm.weight"
    rewrite_tensors(folder, lambda t: t.__setitem__(name, torch.ones(96, dtype=torch.int32)))
    with pytest.raises(ValueError, match=rf"tensor '{name}' is not floating point"):
        load(folder)


def test_mixed_float_dtypes_load_as_the_engine_dtype(folder, tiny_dirs, gen):
    """Tensors stored in other float types are converted on load (not an error)."""

    def edit(t):
        for key in list(t)[::3]:
            t[key] = t[key].to(torch.float64 if len(key) % 2 else torch.float16)

    rewrite_tensors(folder, edit)
    ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
    got = load(folder, dtype="float32").forward(ids)
    ref = load(tiny_dirs[NAME]).forward(ids)
    assert float((got - ref).abs().max() / ref.abs().max()) < 2e-2


# ---------------------------------------------------------------------------------------------
# Corrupt safetensors files
# ---------------------------------------------------------------------------------------------


def test_truncated_file_raises(folder):
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    pattern = (
        r"model\.safetensors: corrupt entry for tensor '.*': data_offsets \[\d+, \d+\) fall outside the \d+ data bytes"
    )
    with pytest.raises(ValueError, match=pattern + r" \(truncated file\?\)"):
        load(folder)
    path.write_bytes(raw[:5])
    with pytest.raises(ValueError, match=r"not a safetensors file \(5 bytes, shorter than its 8-byte header length\)"):
        load(folder)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"not a safetensors file \(0 bytes"):
        load(folder)
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(raw[: 8 + n // 2])  # cut inside the header
    with pytest.raises(ValueError, match=rf"corrupt safetensors header length {n} \(file has {8 + n // 2} bytes\)"):
        load(folder)


def test_garbage_header_raises(folder, gen):
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[8:40] = bytes(torch.randint(0, 256, (32,), generator=gen, dtype=torch.uint8).tolist())
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt safetensors header \("):
        load(folder)


@pytest.mark.parametrize("header_len", [2**40, 2**64 - 1, 200 << 20])
def test_header_length_beyond_the_file_raises(folder, header_len):
    path = folder / "model.safetensors"
    header, data = read_safetensors(path)
    write_safetensors(path, header, data, header_len=header_len)
    with pytest.raises(ValueError, match=rf"corrupt safetensors header length {header_len} \(file has \d+ bytes\)"):
        load(folder)


def shift_offsets(name, begin, end):
    def edit(header, data):
        header[name]["data_offsets"] = [begin(header[name]["data_offsets"]), end(header[name]["data_offsets"])]

    return edit


def set_entry(name, **fields):
    def edit(header, data):
        header[name].update(fields)

    return edit


NORM = "model.layers.1.input_layernorm.weight"
BAD_HEADERS = [
    (
        shift_offsets(NORM, lambda o: o[0], lambda o: 10**9),
        r"data_offsets \[\d+, 1000000000\) fall outside the \d+ data bytes",
    ),
    (shift_offsets(NORM, lambda o: o[1], lambda o: o[0]), r"data_offsets \[\d+, \d+\) fall outside"),
    (
        shift_offsets(NORM, lambda o: o[0], lambda o: o[1] - 4),
        r"its shape and dtype need 384 bytes, data_offsets give 380",
    ),
    (set_entry(NORM, data_offsets=[-4, 380]), r"data_offsets is not a pair of non-negative integers"),
    (set_entry(NORM, data_offsets=[0]), r"data_offsets is not a pair of non-negative integers"),
    (set_entry(NORM, dtype="F8_E4M3"), r"unsupported dtype F8_E4M3"),
    (set_entry(NORM, dtype=7), r"dtype is not a string"),
    (set_entry(NORM, shape="96"), r"shape is not a list"),
    (set_entry(NORM, shape=[-96]), r"shape holds a value that is not a non-negative integer"),
    (set_entry(NORM, shape=[2**62, 2**62]), r"shape is too large"),
    (set_entry(NORM, shape=[97]), r"its shape and dtype need 388 bytes, data_offsets give 384"),
    (lambda h, d: h.__setitem__(NORM, [1, 2]), r"expected an object with dtype, shape and data_offsets"),
]


@pytest.mark.parametrize("edit,pattern", BAD_HEADERS, ids=[p[:45] for _, p in BAD_HEADERS])
def test_lying_header_entry_names_the_tensor(folder, edit, pattern):
    path = folder / "model.safetensors"
    header, data = read_safetensors(path)
    edit(header, data)
    write_safetensors(path, header, data)
    with pytest.raises(ValueError, match=rf"corrupt entry for tensor '{NORM}': {pattern}"):
        load(folder)


def test_header_that_is_not_an_object_raises(folder):
    write_safetensors(folder / "model.safetensors", [1, 2, 3], b"")
    with pytest.raises(ValueError, match=r"corrupt safetensors header \(not a JSON object\)"):
        load(folder)


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def sharded(tiny_dirs, tmp_path):
    return copy_model_dir(tiny_dirs["llama_gqa_sharded"], tmp_path / "sharded")


def edit_index(folder, edit):
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))
    return index


def test_sharded_index_errors(sharded):
    index_path = sharded / "model.safetensors.index.json"
    original = index_path.read_text()
    index = json.loads(original)
    name = "model.layers.1.mlp.up_proj.weight"
    shard = index["weight_map"][name]

    (sharded / shard).rename(sharded / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match=rf"{shard}: shard named by .*index\.json is missing"):
        load(sharded)
    (sharded / "moved.safetensors").rename(sharded / shard)

    index_path.write_text(original[:-20])
    with pytest.raises(ValueError, match=r"index\.json: not valid JSON"):
        load(sharded)

    index_path.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"expected an object with a 'weight_map' object"):
        load(sharded)

    index_path.write_text(original)
    edit_index(sharded, lambda i: i["weight_map"].update({name: "../model.safetensors"}))
    with pytest.raises(ValueError, match=r"names a file outside the folder: \.\./model\.safetensors"):
        load(sharded)

    index_path.write_text(original)
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != shard)
    edit_index(sharded, lambda i: i["weight_map"].update({name: other}))
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(name)}' is not in its shard {other}"):
        load(sharded)

    index_path.write_text(original)
    assert load(sharded).config["num_layers"] == 3  # the repaired folder loads


def test_tensor_in_two_shards_raises(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    shard = index["weight_map"][name]
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != shard)
    tensors = safetensors.torch.load_file(sharded / other)
    tensors[name] = safetensors.torch.load_file(sharded / shard)[name]
    safetensors.torch.save_file(tensors, sharded / other, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor '{name}' appears in more than one file"):
        load(sharded)


# ---------------------------------------------------------------------------------------------
# Tokenizer-dependent errors (a tiny model with the default model's tokenizer)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_with_tokenizer(tiny_dirs, tmp_path_factory):
    """The tiny model with SmolLM2's tokenizer, whose ids (up to 49151) mostly fall outside
    the tiny vocabulary of 517."""
    default = models.default_model_dir(progress=False)
    folder = copy_model_dir(tiny_dirs[NAME], tmp_path_factory.mktemp("tok") / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default / name, folder / name)
    return moa_engine.Engine(folder, max_batch=2, max_seq_len=40)


def test_text_errors_with_a_tokenizer(engine_with_tokenizer):
    e = engine_with_tokenizer
    with pytest.raises(ValueError, match=r"prompt is empty"):
        e.generate([""])
    with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, {VOCAB}\)"):
        e.generate(["Bonjour, tout le monde"], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"exceeds max_seq_len \(40\)"):
        e.generate(["a " * 60], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"outside the vocabulary"):
        next(e.stream("Bonjour, tout le monde", max_new_tokens=2))
    assert_engine_works(e)


# ---------------------------------------------------------------------------------------------
# Fuzzing, in a subprocess
# ---------------------------------------------------------------------------------------------

FUZZ_SCRIPT = textwrap.dedent(
    """
    import json, os, random, struct, sys, collections
    import torch
    from moa_engine import _C

    folder, seed, trials = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    path = os.path.join(folder, "model.safetensors")
    config_path = os.path.join(folder, "config.json")
    raw = open(path, "rb").read()
    config = open(config_path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    rng = random.Random(seed)
    outcomes = collections.Counter()
    records = []  # (trial, kind, exception type, documented type?, message)

    def write(p, data):
        tmp = p + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)

    for trial in range(trials):
        kind = rng.choice(["flip_header", "flip_header", "truncate", "length", "flip_config", "flip_data"])
        data, conf = bytearray(raw), bytearray(config)
        if kind == "flip_header":
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(8 + n)] = rng.randrange(256)
        elif kind == "truncate":
            data = data[: rng.randrange(len(data))]
        elif kind == "length":
            lengths = [rng.randrange(2**64), n + rng.randint(-50, 50), rng.randrange(len(raw) * 2)]
            data[:8] = struct.pack("<Q", rng.choice(lengths))
        elif kind == "flip_config":
            for _ in range(rng.randint(1, 3)):
                conf[rng.randrange(len(conf))] = rng.choice(b'0123456789{}[]",:. -aez')
        else:
            for _ in range(64):
                data[8 + n + rng.randrange(len(raw) - 8 - n)] = rng.randrange(256)
        write(path, bytes(data))
        write(config_path, bytes(conf))
        try:
            engine = _C.Engine(folder, max_batch=1, max_seq_len=8)
            logits = engine.forward(torch.tensor([[1, 2, 3]]))
            assert logits.shape[:2] == (1, 3)
            outcomes["loaded"] += 1
        except BaseException as e:
            outcomes[type(e).__name__] += 1
            documented = isinstance(e, (ValueError, FileNotFoundError))
            records.append((trial, kind, type(e).__name__, documented, str(e)[:300]))
    print(json.dumps({"outcomes": outcomes, "records": records}))
    """
)


@pytest.fixture(scope="module")
def fuzz_result(tiny_dirs, tmp_path_factory):
    """Outcomes of 600 random corruptions of the tiny mistral model (fixed seed), each loaded
    and run in a child process: {"outcomes": {kind: count}, "records": [...]}."""
    folder = copy_model_dir(tiny_dirs["mistral_window"], tmp_path_factory.mktemp("fuzz") / "model")
    proc = subprocess.run(
        [sys.executable, "-c", FUZZ_SCRIPT, str(folder), "20240611", "600"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, f"fuzz process died (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_random_corruptions_load_or_raise_never_crash(fuzz_result):
    wrong = [r for r in fuzz_result["records"] if not r[3]]
    assert wrong == [], f"{len(wrong)} corruptions raised an undocumented exception type: {wrong[:10]}"
    outcomes = fuzz_result["outcomes"]
    # Both outcomes occur, so the loop tests something.
    assert outcomes.get("loaded", 0) >= 50 and sum(outcomes.values()) - outcomes["loaded"] >= 300, outcomes


def test_random_corruption_errors_name_the_damaged_file(fuzz_result):
    """Every error says which file is damaged (and is a plain ValueError / FileNotFoundError
    with a readable message, not a UnicodeDecodeError about the message itself)."""
    unclear = [r for r in fuzz_result["records"] if not re.search(r"(model\.safetensors|config\.json)\b", r[4])]
    types = sorted({r[2] for r in unclear})
    total = len(fuzz_result["records"])
    assert unclear == [], f"{len(unclear)} of {total} errors ({types}) do not name the file, e.g. {unclear[:3]}"


def test_non_utf8_bytes_in_the_header_give_a_readable_error(folder):
    """A non-UTF-8 byte inside the header's JSON is reported as a corrupt header, like any
    other garbage (the error message must survive the C++ -> Python conversion)."""
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"model.layers.0.mlp.up_proj.weight"')
    raw[at + 5] = 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt safetensors header") as info:
        load(folder)
    assert type(info.value) is ValueError
