"""The C++ GGUF reader (csrc/engine/gguf.h) through moa_engine._C._gguf_config / _gguf_tensors.

References: the gguf package's GGUFReader for the tensor list (names, types, shapes in GGUF
order, absolute data offsets, sizes) and HF transformers' GGUF config reader for the config
of the default model; tiny files written with gguf.GGUFWriter (llama, qwen2 with q/k/v
biases, mistral) with F32 / F16 / Q8_0 tensors in awkward shapes. Then every kind of broken
file: the ValueError names the file and the problem; and seeded random corruptions, each of
which must read or raise ValueError, never crash.
"""

from __future__ import annotations

import struct
import time

import gguf
import numpy as np
import pytest
import torch
from conftest import seeded_generator

from moa_engine import _C, models

Q = gguf.GGMLQuantizationType
HIDDEN, INTER, HEADS, KV_HEADS, LAYERS, VOCAB = 64, 96, 4, 2, 2, 50


@pytest.fixture(scope="module")
def default_reader():
    return gguf.GGUFReader(models.default_gguf_path())


def reader_tensors(path) -> list[dict]:
    """GGUFReader's tensor list in _gguf_tensors' form."""
    return [
        dict(
            name=t.name,
            type=t.tensor_type.name,
            type_id=int(t.tensor_type),
            shape=[int(n) for n in t.shape],
            offset=int(t.data_offset),
            nbytes=int(t.n_bytes),
        )
        for t in gguf.GGUFReader(path).tensors
    ]


def test_default_model_tensors_match_gguf_reader(default_reader):
    path = models.default_gguf_path()
    start = time.perf_counter()
    tensors = _C._gguf_tensors(str(path))
    elapsed = time.perf_counter() - start
    expected = [
        dict(
            name=t.name,
            type=t.tensor_type.name,
            type_id=int(t.tensor_type),
            shape=[int(n) for n in t.shape],
            offset=int(t.data_offset),
            nbytes=int(t.n_bytes),
        )
        for t in default_reader.tensors
    ]
    assert tensors == expected
    assert elapsed < 0.1, f"reading {path.name} took {elapsed * 1000:.0f} ms"


def test_default_model_config_matches_transformers(default_reader, monkeypatch):
    from transformers import AutoConfig

    # transformers reads the file with gguf.GGUFReader (seconds on this file): hand it the
    # fixture's reader instead of parsing the file again.
    monkeypatch.setattr(gguf, "GGUFReader", lambda *args, **kwargs: default_reader)
    path = models.default_gguf_path()
    start = time.perf_counter()
    c = _C._gguf_config(str(path))
    elapsed = time.perf_counter() - start
    hf = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    theta = (getattr(hf, "rope_parameters", None) or {}).get("rope_theta", getattr(hf, "rope_theta", None))
    assert c["model_type"] == hf.model_type == "llama"
    assert (c["vocab_size"], c["hidden_size"], c["intermediate_size"]) == (
        hf.vocab_size,
        hf.hidden_size,
        hf.intermediate_size,
    )
    assert (c["num_layers"], c["num_heads"], c["num_kv_heads"], c["head_dim"]) == (
        hf.num_hidden_layers,
        hf.num_attention_heads,
        hf.num_key_value_heads,
        hf.head_dim,
    )
    assert c["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-7)
    assert c["rope_theta"] == pytest.approx(theta)
    assert c["max_position_embeddings"] == hf.max_position_embeddings
    assert c["tie_word_embeddings"] == hf.tie_word_embeddings
    assert (c["bos_token_id"], c["eos_token_ids"], c["attention_bias"], c["torch_dtype"]) == (1, [2], False, "")
    assert elapsed < 0.1


# ---------------------------------------------------------------------------------------------
# Tiny files
# ---------------------------------------------------------------------------------------------


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen).numpy()


def write_tiny(path, gen, arch="llama", *, bias=False, tied=False, metadata=None, extra_tensors=()):
    """A tiny model file in llama.cpp's layout; numpy shapes are [rows, row length] (GGUF
    reverses them: ne[0] is the row length). Q8_0 tensors need rows of a multiple of 32."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    w.add_token_list([f"tok{i}" for i in range(VOCAB)])
    w.add_bos_token_id(5)
    w.add_eos_token_id(7)
    w.add_eot_token_id(9)
    for key, (kind, value) in (metadata or {}).items():
        getattr(w, f"add_{kind}")(key, value)

    def q8(name, rows, cols):
        w.add_tensor(name, gguf.quants.quantize(randn(gen, rows, cols), Q.Q8_0), raw_dtype=Q.Q8_0)

    w.add_tensor("token_embd.weight", randn(gen, VOCAB, HIDDEN).astype(np.float16))
    hd = HIDDEN // HEADS
    for layer in range(LAYERS):
        p = f"blk.{layer}."
        w.add_tensor(p + "attn_norm.weight", randn(gen, HIDDEN))
        q8(p + "attn_q.weight", HEADS * hd, HIDDEN)
        q8(p + "attn_k.weight", KV_HEADS * hd, HIDDEN)
        w.add_tensor(p + "attn_v.weight", randn(gen, KV_HEADS * hd, HIDDEN).astype(np.float16))
        if bias:
            w.add_tensor(p + "attn_q.bias", randn(gen, HEADS * hd))
            w.add_tensor(p + "attn_k.bias", randn(gen, KV_HEADS * hd))
            w.add_tensor(p + "attn_v.bias", randn(gen, KV_HEADS * hd))
        w.add_tensor(p + "attn_output.weight", randn(gen, HIDDEN, HEADS * hd))
        w.add_tensor(p + "ffn_norm.weight", randn(gen, HIDDEN))
        q8(p + "ffn_gate.weight", INTER, HIDDEN)
        q8(p + "ffn_up.weight", INTER, HIDDEN)
        q8(p + "ffn_down.weight", HIDDEN, INTER)
    w.add_tensor("output_norm.weight", randn(gen, HIDDEN))
    if not tied:
        q8("output.weight", VOCAB, HIDDEN)
    for name, array, qtype in extra_tensors:
        w.add_tensor(name, array, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def expected_config(arch, *, bias, tied, sliding_window=0):
    return dict(
        model_type=arch,
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_layers=LAYERS,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=HIDDEN // HEADS,
        rms_norm_eps=pytest.approx(1e-6, rel=1e-6),
        rope_theta=500000.0,
        rope_llama3_factor=0.0,
        rope_llama3_low_freq_factor=1.0,
        rope_llama3_high_freq_factor=4.0,
        rope_llama3_original_max_position=8192,
        max_position_embeddings=256,
        sliding_window=sliding_window,
        attention_bias=bias,
        tie_word_embeddings=tied,
        torch_dtype="",
        eos_token_ids=[7, 9],
        bos_token_id=5,
    )


@pytest.mark.parametrize(
    "arch,bias,tied,window",
    [("llama", False, False, 0), ("qwen2", True, False, 0), ("mistral", False, True, 4096), ("qwen2", True, True, 0)],
)
def test_tiny_files(tmp_path, gen, arch, bias, tied, window):
    awkward = [
        ("odd.f32", randn(gen, 3, 5, 7), None),  # 3-D, odd sizes
        ("odd.f16", randn(gen, 7, 33).astype(np.float16), None),
        ("odd.q8_0", gguf.quants.quantize(randn(gen, 5, 96), Q.Q8_0), Q.Q8_0),  # 5 rows of 3 blocks
        ("odd.4d", randn(gen, 2, 1, 3, 4), None),
        ("odd.1", randn(gen, 1), None),
    ]
    metadata = {f"{arch}.attention.sliding_window": ("uint32", window)} if window else None
    path = write_tiny(
        tmp_path / f"{arch}.gguf", gen, arch, bias=bias, tied=tied, metadata=metadata, extra_tensors=awkward
    )
    tensors = _C._gguf_tensors(str(path))
    assert tensors == reader_tensors(path)
    by_name = {t["name"]: t for t in tensors}
    assert by_name["odd.f32"]["shape"] == [7, 5, 3] and by_name["odd.q8_0"]["shape"] == [96, 5]
    assert by_name["odd.q8_0"]["nbytes"] == 5 * 3 * 34 and by_name["odd.4d"]["shape"] == [4, 3, 1, 2]
    # Bytes at the offsets are the tensors' own.
    raw = path.read_bytes()
    for t in gguf.GGUFReader(path).tensors:
        info = by_name[t.name]
        assert raw[info["offset"] : info["offset"] + info["nbytes"]] == t.data.tobytes()
    assert _C._gguf_config(str(path)) == expected_config(arch, bias=bias, tied=tied, sliding_window=window)


def test_config_fallbacks(tmp_path, gen):
    """No head_count_kv (= heads), no vocab_size key (tokens), key_length as head_dim, no eot."""
    w = gguf.GGUFWriter(str(tmp_path / "f.gguf"), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_key_length(8)
    w.add_value_length(8)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_eos_token_id(3)
    w.add_tensor("token_embd.weight", randn(gen, 40, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    c = _C._gguf_config(str(tmp_path / "f.gguf"))
    assert (c["num_kv_heads"], c["head_dim"], c["vocab_size"], c["rope_theta"]) == (2, 8, 40, 10000.0)
    assert (c["eos_token_ids"], c["bos_token_id"], c["tie_word_embeddings"]) == ([3], -1, True)


# ---------------------------------------------------------------------------------------------
# Broken files
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory, request):
    gen = seeded_generator(request.node.nodeid)
    return write_tiny(tmp_path_factory.mktemp("gguf") / "good.gguf", gen).read_bytes()


def tensor_info_at(raw: bytes, name: str) -> int:
    """Offset of the tensor info's n_dims field (right after the name)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    at = raw.find(key)
    assert at > 0
    return at + len(key)


def kv_at(raw: bytes, key: str) -> int:
    """Offset of the metadata pair's value type (right after the key)."""
    k = struct.pack("<Q", len(key)) + key.encode()
    at = raw.find(k)
    assert at > 0
    return at + len(k)


def patched(raw: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(raw)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def tensor_field(raw, name, field, value):
    at = tensor_info_at(raw, name)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    offsets = {"n_dims": (at, "<I"), "ne0": (at + 4, "<Q"), "ne1": (at + 12, "<Q")}
    offsets["type"] = (at + 4 + 8 * n_dims, "<I")
    offsets["offset"] = (at + 8 + 8 * n_dims, "<Q")
    where, fmt = offsets[field]
    return patched(raw, where, fmt, value)


def broken_cases(raw: bytes):
    size = len(raw)
    tokens = kv_at(raw, "tokenizer.ggml.tokens")
    name = kv_at(raw, "general.architecture")
    return {
        "empty": (b"", ["shorter than the 24-byte header"]),
        "short": (raw[:20], ["20 bytes", "shorter than the 24-byte header"]),
        "magic": (b"GGML" + raw[4:], ['bad magic: found "GGML"']),
        "version 1": (patched(raw, 4, "<I", 1), ["unsupported GGUF version 1"]),
        "version 7": (patched(raw, 4, "<I", 7), ["unsupported GGUF version 7"]),
        "tensor count": (patched(raw, 8, "<Q", 1 << 61), ["cannot fit"]),
        "kv count": (patched(raw, 16, "<Q", 2**64 - 1), ["cannot fit"]),
        "key length": (patched(raw, 24, "<Q", size), ["past the end"]),
        "string length": (patched(raw, name + 4, "<Q", 1 << 40), ["general.architecture", "past the end"]),
        "value type": (patched(raw, name, "<I", 13), ["general.architecture", "unknown value type 13"]),
        "element type": (patched(raw, tokens + 4, "<I", 77), ["tokenizer.ggml.tokens", "unknown element type 77"]),
        "array length": (patched(raw, tokens + 8, "<Q", 1 << 60), ["tokenizer.ggml.tokens", "claims"]),
        "array past the end": (patched(raw, tokens + 8, "<Q", size // 16), ["tokenizer.ggml.tokens' element"]),
        "n_dims 0": (tensor_field(raw, "blk.0.attn_q.weight", "n_dims", 0), ["blk.0.attn_q.weight has 0 dimensions"]),
        "n_dims 5": (tensor_field(raw, "blk.0.attn_q.weight", "n_dims", 5), ["blk.0.attn_q.weight has 5 dimensions"]),
        "dim 0": (tensor_field(raw, "blk.1.attn_v.weight", "ne1", 0), ["blk.1.attn_v.weight", "dimension 1 of 0"]),
        "dim negative": (tensor_field(raw, "blk.1.attn_v.weight", "ne1", 2**63), ["dimension 1 of"]),
        "overflow": (
            tensor_field(
                tensor_field(raw, "blk.1.attn_v.weight", "ne0", 1 << 40), "blk.1.attn_v.weight", "ne1", 1 << 40
            ),
            ["blk.1.attn_v.weight", "overflows int64"],
        ),
        "unserved type": (
            tensor_field(raw, "blk.0.attn_q.weight", "type", 10),
            [
                "tensor blk.0.attn_q.weight has type Q2_K (ggml type 10), which moa_engine does not serve "
                "(it serves F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)"
            ],
        ),
        "block size": (
            tensor_field(raw, "blk.0.ffn_up.weight", "ne0", 40),
            ["blk.0.ffn_up.weight", "rows of 40 elements, not a multiple of its block size 32"],
        ),
        "unaligned": (
            tensor_field(raw, "output.weight", "offset", 8),
            ["output.weight", "not a multiple of the alignment 32"],
        ),
        "offset past the end": (
            tensor_field(raw, "output.weight", "offset", 1 << 50),
            ["truncated file: tensor output.weight needs bytes [", f"the file has {size} bytes"],
        ),
        "truncated": (
            raw[: size - 1000],
            ["truncated file: tensor output.weight needs bytes [", f"the file has {size - 1000} bytes"],
        ),
        "truncated header": (
            raw[: tensor_info_at(raw, "blk.0.attn_q.weight") + 2],
            ["truncated file: tensor blk.0.attn_q.weight (its n_dims) needs 4 bytes"],
        ),
        "tensor name not UTF-8": (
            raw.replace(b"blk.1.attn_q.weight", b"blk.1.attn_q.\xff\xfeight"),
            ["tensor info", "not valid UTF-8"],
        ),
    }


BROKEN = [
    "empty",
    "short",
    "magic",
    "version 1",
    "version 7",
    "tensor count",
    "kv count",
    "key length",
    "string length",
    "value type",
    "element type",
    "array length",
    "array past the end",
    "n_dims 0",
    "n_dims 5",
    "dim 0",
    "dim negative",
    "overflow",
    "unserved type",
    "block size",
    "unaligned",
    "offset past the end",
    "truncated",
    "truncated header",
    "tensor name not UTF-8",
]


@pytest.mark.parametrize("case", BROKEN)
def test_broken_file(tmp_path, good_bytes, case):
    raw, needles = broken_cases(good_bytes)[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw)
    for fn in (_C._gguf_tensors, _C._gguf_config):
        with pytest.raises(ValueError) as err:
            fn(str(path))
        message = str(err.value)
        assert message.startswith(f"{path}: "), message
        for needle in needles:
            assert needle in message, message


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        _C._gguf_tensors(str(tmp_path / "nope.gguf"))


def write_with(tmp_path, gen, *, arch="llama", metadata=None, extra_tensors=(), name="m.gguf"):
    return write_tiny(tmp_path / name, gen, arch, metadata=metadata, extra_tensors=extra_tensors)


def test_alignment_not_power_of_two(tmp_path, gen):
    path = write_with(tmp_path, gen, metadata={"general.alignment": ("uint32", 32)})
    raw = path.read_bytes()
    at = kv_at(raw, "general.alignment")
    path.write_bytes(patched(raw, at + 4, "<I", 48))
    with pytest.raises(ValueError, match="general.alignment 48 is not a power of two"):
        _C._gguf_tensors(str(path))


def test_duplicate_tensor_name(tmp_path, gen, good_bytes):
    raw = good_bytes
    # Rename blk.1.attn_k.weight to blk.1.attn_q.weight (same length) in the tensor infos.
    at = raw.find(b"blk.1.attn_k.weight")
    path = tmp_path / "dup.gguf"
    path.write_bytes(raw[:at] + b"blk.1.attn_q.weight" + raw[at + len("blk.1.attn_q.weight") :])
    with pytest.raises(ValueError, match="duplicate tensor name 'blk.1.attn_q.weight'"):
        _C._gguf_tensors(str(path))


def test_duplicate_key(tmp_path, good_bytes):
    at = good_bytes.find(b"tokenizer.ggml.eot_token_id")
    path = tmp_path / "dup.gguf"
    path.write_bytes(good_bytes[:at] + b"tokenizer.ggml.eos_token_id" + good_bytes[at + 27 :])
    with pytest.raises(ValueError, match="duplicate metadata key 'tokenizer.ggml.eos_token_id'"):
        _C._gguf_tensors(str(path))


@pytest.mark.parametrize(
    "metadata,extra,needles",
    [
        ({}, [], None),  # the baseline reads
        (
            {"general.architecture": ("string", "gpt2")},
            [],
            ["'gpt2' is not supported (supported: llama, mistral, qwen2)"],
        ),
        (
            {"llama.attention.head_count_kv": ("uint32", 3)},
            [],
            ["must be a multiple of llama.attention.head_count_kv (3)"],
        ),
        ({"llama.block_count": ("uint32", 0)}, [], ["'llama.block_count' > 0, got 0"]),
        (
            {"llama.rope.scaling.type": ("string", "yarn"), "llama.rope.scaling.factor": ("float32", 4.0)},
            [],
            ["'yarn'"],
        ),
        ({"llama.rope.scaling.factor": ("float32", 8.0)}, [], ["rope scaling 'linear'"]),
        ({"llama.expert_count": ("uint32", 8)}, [], ["mixture-of-experts"]),
        ({"llama.attention.key_length": ("uint32", 7)}, [], ["even head_dim > 0, got 7"]),
        (
            {},
            [("rope_freqs.weight", np.ones(8, np.float32), None)],
            ["llama3 rope scaling from GGUF is not supported yet"],
        ),
        ({}, [("blk.0.ffn_up.bias", np.ones(INTER, np.float32), None)], ["MLP biases"]),
    ],
)
def test_config_errors(tmp_path, gen, metadata, extra, needles):
    arch = metadata.get("general.architecture", ("", "llama"))[1]
    rest = {k: v for k, v in metadata.items() if k != "general.architecture"}
    path = write_with(tmp_path, gen, arch=arch, metadata=rest, extra_tensors=extra)
    if needles is None:
        assert _C._gguf_config(str(path))["model_type"] == "llama"
        return
    _C._gguf_tensors(str(path))  # the reader itself accepts the file
    with pytest.raises(ValueError) as err:
        _C._gguf_config(str(path))
    assert str(err.value).startswith(f"{path}: ")
    for needle in needles:
        assert needle in str(err.value)


def test_missing_required_metadata(tmp_path, good_bytes):
    """Renaming a key (same length) removes it."""
    for key in ["llama.block_count", "llama.embedding_length", "llama.attention.head_count", "llama.context_length"]:
        at = good_bytes.find(key.encode())
        path = tmp_path / "m.gguf"
        path.write_bytes(good_bytes[:at] + b"X" + good_bytes[at + 1 :])
        with pytest.raises(ValueError, match=f"missing required metadata '{key}'"):
            _C._gguf_config(str(path))


def test_random_corruptions(tmp_path, gen, good_bytes):
    """~200 seeded byte flips, splices, truncations and header-field overwrites: each either
    reads or raises ValueError (a crash would take the test process down)."""
    path = tmp_path / "fuzz.gguf"
    header_end = tensor_info_at(good_bytes, "output.weight") + 32
    refused = 0
    for _ in range(200):
        b = bytearray(good_bytes)
        kind = int(torch.randint(4, (), generator=gen))
        if kind == 0:  # bit flips in the header
            for _ in range(int(torch.randint(1, 9, (), generator=gen))):
                at = int(torch.randint(header_end, (), generator=gen))
                b[at] ^= 1 << int(torch.randint(8, (), generator=gen))
        elif kind == 1:  # truncation
            del b[int(torch.randint(len(b), (), generator=gen)) :]
        elif kind == 2:  # an 8-byte field overwritten by an awkward number
            at = int(torch.randint(header_end - 8, (), generator=gen))
            values = [0, 1, 2, 5, 31, 255, 1 << 31, 1 << 32, 1 << 62, 2**64 - 1, len(b)]
            struct.pack_into("<Q", b, at, values[int(torch.randint(len(values), (), generator=gen))])
        else:  # splice
            at = int(torch.randint(header_end, (), generator=gen))
            b[at:at] = bytes(
                torch.randint(256, (int(torch.randint(1, 16, (), generator=gen)),), generator=gen).tolist()
            )
        path.write_bytes(bytes(b))
        try:
            _C._gguf_tensors(str(path))
            _C._gguf_config(str(path))
        except ValueError as e:
            assert str(e).startswith(f"{path}: ")
            refused += 1
    assert refused > 100
