"""Float checkpoints to GGUF files (`moa convert --quantize TYPE`), readable by llama.cpp.

    export_gguf(model, out_path, qtype) writes out_path := GGUF(model's weights in qtype)

What goes into the file, as llama.cpp's own converter lays it out:
- metadata: general.architecture ("llama" for llama and mistral, "qwen2"), the sizes,
  RMSNorm epsilon, RoPE base, general.file_type;
- the tokenizer: copied key for key from the GGUF file the folder was converted from (its
  .complete marker names it), else built from tokenizer.json (byte-level BPE, "gpt2"), with
  merges, special ids and the chat template, by the gguf package's vocab readers;
- tensors under GGUF's names (the gguf package's name table); the q/k rows of llama models
  permuted as llama.cpp's rotary kernels expect (the engine and the converter undo it).

Types (the bytes come from the engine's quantizers, `_C._quantize`, which write what ggml's
reference quantizers write):
    layers' projections   qtype (Q4_K needs rows of a multiple of 256 elements, the others
                          of 32; a matrix that does not fit takes Q8_0, or F16 if 32 does
                          not divide it either)
    token_embd, output    Q8_0 for the 4-bit types, else qtype
    norms, biases         F32
The file is written next to out_path under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k")
_ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def _ggml_types():
    import gguf

    T = gguf.GGMLQuantizationType
    F = gguf.LlamaFileType
    return {
        "f32": (T.F32, F.ALL_F32),
        "f16": (T.F16, F.MOSTLY_F16),
        "bf16": (T.BF16, F.MOSTLY_BF16),
        "q8_0": (T.Q8_0, F.MOSTLY_Q8_0),
        "q4_0": (T.Q4_0, F.MOSTLY_Q4_0),
        "q4_1": (T.Q4_1, F.MOSTLY_Q4_1),
        "q4_k": (T.Q4_K, F.MOSTLY_Q4_K_S),
    }


def default_export_path(model, qtype: str) -> Path:
    """Where `moa convert --quantize` writes without --out: $MOA_ENGINE_CACHE/gguf/<name>-<TYPE>.gguf."""
    from moa_engine.models import DEFAULT_MODEL, cache_root

    name = DEFAULT_MODEL if model is None else Path(model).expanduser().resolve().name.removesuffix(".gguf")
    return cache_root() / "gguf" / f"{name}-{qtype.upper()}.gguf"


def export_gguf(model, out_path, qtype: str = "q8_0", progress: bool = True) -> Path:
    """Writes `model` (an HF folder, a .gguf file, or None for the default model) as a GGUF
    file of `qtype` (one of EXPORT_TYPES) at out_path; returns out_path."""
    import gguf
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    from moa_engine import _C
    from moa_engine.models import _GGUF_PERMUTES_QK, resolve_model

    if qtype not in EXPORT_TYPES:
        raise ValueError(f"quantize type must be one of {', '.join(EXPORT_TYPES)}, got {qtype!r}")
    out_path = Path(out_path).expanduser().absolute()
    if out_path.suffix.lower() != ".gguf":
        raise ValueError(f"the output file must end in .gguf, got {out_path}")
    folder = resolve_model(model, progress=progress)
    config = AutoConfig.from_pretrained(str(folder))
    arch = _ARCHES.get(config.model_type)
    if arch is None:
        raise ValueError(
            f"{folder}: model_type {config.model_type!r} cannot be exported; expected one of {', '.join(_ARCHES)}"
        )
    rope = getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) not in (None, "default"):
        raise ValueError(f"{folder}: rope scaling {rope!r} is not exported (only the default RoPE)")
    weights_file = folder / "model.safetensors"
    if not weights_file.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors (sharded checkpoints are not exported)")

    ttype, file_type = _ggml_types()[qtype]
    T = gguf.GGMLQuantizationType
    arch_id = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(folder.name)
        writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_rope_freq_base(float(_rope_theta(config)))
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(int(file_type))
        _add_tokenizer(writer, folder, config)

        with safe_open(str(weights_file), framework="pt") as f:
            names = list(f.keys())
            for hf_name in names:
                module, suffix = hf_name.rsplit(".", 1)
                gguf_base = name_map.get_name(module)
                if gguf_base is None:
                    raise ValueError(f"{weights_file}: no GGUF name for the tensor {hf_name}")
                gguf_name = f"{gguf_base}.{suffix}"
                w = f.get_tensor(hf_name).to(torch.float32)
                if arch in _GGUF_PERMUTES_QK and gguf_name.endswith((".attn_q.weight", ".attn_k.weight")):
                    w = _permute_qk(w, heads if ".attn_q." in gguf_name else kv_heads)
                if w.dim() != 2:
                    writer.add_tensor(gguf_name, w.contiguous().numpy())
                    continue
                is_io = gguf_base in ("token_embd", "output")
                want = T.Q8_0 if is_io and qtype.startswith("q4") else ttype
                writer.add_tensor(gguf_name, *_encode(_C, w, _fitting(want, w.shape[1])))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if progress:
        print(f"moa_engine: wrote {out_path} ({out_path.stat().st_size / 2**20:.1f} MiB, {qtype})", file=sys.stderr)
    return out_path


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", 10000.0))


def _fitting(ttype, k: int):
    import gguf

    T = gguf.GGMLQuantizationType
    for t in (ttype, T.Q8_0, T.F16):
        if k % gguf.GGML_QUANT_SIZES[t][0] == 0:
            return t
    return T.F32


def _encode(_C, w, ttype):
    """(array, kwargs) for GGUFWriter.add_tensor: float arrays for F32 / F16, else the bytes."""
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    if ttype == T.F32:
        return (w.contiguous().numpy(),)
    if ttype == T.F16:
        return (w.contiguous().numpy().astype(np.float16),)
    raw = _C._quantize(w, int(ttype)).numpy()
    return raw, None, ttype


def _permute_qk(weight, heads: int):
    """HF's q/k rows in llama.cpp's order: per head, the (first half, second half) rotary
    dimensions interleaved. The inverse of models._unpermute_qk."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _add_tokenizer(writer, folder: Path, config) -> None:
    source = _source_gguf(folder)
    if source is not None:
        _copy_tokenizer_fields(writer, source)
        return
    import gguf

    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except FileNotFoundError as exc:
        raise ValueError(
            f"{folder}: the tokenizer is not a byte-level BPE tokenizer.json, which is what GGUF export writes"
        ) from exc
    tokens, toktypes = [], []
    for text, _score, toktype in vocab.all_tokens():
        tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        toktypes.append(int(toktype))
    for i in range(len(tokens), config.vocab_size):  # rows the embedding has beyond the tokenizer's
        tokens.append(f"[PAD{i}]")
        toktypes.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(toktypes)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer)


def _source_gguf(folder: Path) -> Path | None:
    """The GGUF file a converted folder came from (its .complete marker), if it still exists."""
    from moa_engine.models import COMPLETE_MARKER

    marker = folder / COMPLETE_MARKER
    try:
        source = Path(json.loads(marker.read_text())["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return source if source.suffix.lower() == ".gguf" and source.is_file() else None


def _copy_tokenizer_fields(writer, source: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(source)
    V = gguf.GGUFValueType
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = V(field.types[0])
        sub = V(field.types[-1]) if vtype == V.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
