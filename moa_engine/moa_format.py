"""The MoA directory: the one place that defines its files, reads them and writes them.

A MoA directory holds a base model's name, one LoRA expert per domain and the routers:

    <moa_dir>/
      moa_config.json              what the directory is (below)
      experts/<domain>/            one standard PEFT LoRA folder per domain, loadable as it is by
        adapter_config.json          peft.PeftModel.from_pretrained(base, "<moa_dir>/experts/<domain>")
        adapter_model.safetensors
      router.safetensors           optional: one router matrix per decoder layer

moa_config.json:
    {"format_version": 1,                  # this module writes 1; a newer version is refused
     "base_model": "HuggingFaceTB/...",    # a local folder or a model name
     "domains": ["code", "math"],          # router order: router output i is domains[i]
     "target_modules": ["q_proj", ...],    # from q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
     "router": {"pooling": "mean", "strategy": "last"},   # strategy: last | per_layer | vote
     "eta": 0.1}                           # weight of the routers' loss in stage 2
  Every key is required and no other is allowed. A domain name is a safe folder name,
  ^[A-Za-z0-9][A-Za-z0-9_.-]*$, not "base" (reserved for "no expert"), unique ignoring case (it
  names a folder, and some file systems ignore case).

experts/<domain>/: what PEFT's save_pretrained writes for a LoRA on a Llama-family model.
  Tensor keys: base_model.model.model.layers.{l}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight and
  base_model.model.model.layers.{l}.mlp.{gate,up,down}_proj.lora_{A,B}.weight; lora_A is
  [r, in], lora_B is [out, r]. Supported: per-module ranks and alphas (rank_pattern,
  alpha_pattern), rslora, layers_to_transform / layers_pattern, exclude_modules. Refused, naming
  the option: DoRA, biases, modules_to_save, fan_in_fan_out, and every option that changes the
  forward beyond a plain low-rank update (see _UNSUPPORTED).

router.safetensors: float32 tensors "layers.{l}.weight", l = 0 .. n_layers - 1, each
  [n_domains, hidden], row i scoring domains[i]. No bias. Router l's logits for a sequence are
  layers.{l}.weight @ mean over the prompt's tokens of layer l's normed input hidden state.
  Absent in a directory made only of experts.

Semantics of a loaded expert (LoraExpert.targets[(l, module)] = (A, B, scale)), per target module:
    y = x @ W^T  +  scale * (x @ A^T) @ B^T        # x: [T, in], A: [r, in], B: [out, r]
  scale = alpha / r, or alpha / sqrt(r) with use_rslora, where r and alpha are the module's own
  (rank_pattern / alpha_pattern, else r / lora_alpha). This is PEFT's LoRA forward exactly.

Pattern matching follows the installed PEFT (0.21): a rank_pattern / alpha_pattern key k matches
the module name n (e.g. "model.layers.0.self_attn.q_proj") when re.match(rf"(.*\\.)?({k})$", n);
the first matching key in the file's order wins. PEFT writes adapter_config.json with sorted keys,
so after a save the order is alphabetical, not the order the patterns were given in.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moa_engine._io import atomic_copy, atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1
CONFIG_FILE = "moa_config.json"
EXPERTS_DIR = "experts"
ROUTER_FILE = "router.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# The modules an expert may adapt, and the submodule of a decoder layer each lives in.
MODULE_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
TARGET_MODULES = tuple(MODULE_PARENT)
STRATEGIES = ("last", "per_layer", "vote")
POOLINGS = ("mean",)
_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED_NAMES = ("base",)

# ---------------------------------------------------------------------------------------------
# moa_config.json
# ---------------------------------------------------------------------------------------------


@dataclass
class RouterConfig:
    pooling: str = "mean"
    strategy: str = "last"

    def __post_init__(self):
        _check_type("router.pooling", self.pooling, str)
        _check_type("router.strategy", self.strategy, str)
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"field 'router.pooling': {self.pooling!r} is not supported (expected one of {list(POOLINGS)})"
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(f"field 'router.strategy': {self.strategy!r} is not one of {list(STRATEGIES)}")

    def to_dict(self) -> dict:
        return {"pooling": self.pooling, "strategy": self.strategy}


@dataclass
class MoAConfig:
    """The contents of moa_config.json. Constructing one validates it (ValueError naming the field)."""

    base_model: str
    domains: list[str]
    target_modules: list[str] = field(default_factory=lambda: list(TARGET_MODULES))
    router: RouterConfig = field(default_factory=RouterConfig)
    eta: float = 0.1
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        _check_type("format_version", self.format_version, int)
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"field 'format_version': {self.format_version} is newer than this moa_engine supports "
                f"({FORMAT_VERSION}); upgrade moa_engine"
            )
        if self.format_version < 1:
            raise ValueError(f"field 'format_version': {self.format_version} is not a valid version (>= 1)")
        _check_type("base_model", self.base_model, str)
        if not self.base_model:
            raise ValueError("field 'base_model': is empty")
        _check_names("domains", self.domains)
        _check_target_modules(self.target_modules)
        if isinstance(self.router, dict):
            self.router = _router_from_dict(self.router)
        _check_type("router", self.router, RouterConfig)
        _check_type("eta", self.eta, (int, float))
        if not math.isfinite(self.eta) or self.eta < 0:
            raise ValueError(f"field 'eta': {self.eta!r} is not a finite number >= 0")
        self.eta = float(self.eta)

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "base_model": self.base_model,
            "domains": list(self.domains),
            "target_modules": list(self.target_modules),
            "router": self.router.to_dict(),
            "eta": self.eta,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = CONFIG_FILE) -> MoAConfig:
        """Validate and build; errors read "<source>: field 'x': problem"."""
        try:
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            keys = ("format_version", "base_model", "domains", "target_modules", "router", "eta")
            _check_keys("", data, keys)
            return cls(**{key: data[key] for key in keys})
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path) -> MoAConfig:
        """Read a moa_config.json file."""
        return cls.from_dict(_read_json(path), source=str(path))

    def save(self, path) -> None:
        atomic_write_json(path, self.to_dict())


def _check_type(name, value, types) -> None:
    """isinstance, except that a bool is never an int here."""
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        expected = " or ".join(t.__name__ for t in types)
        raise ValueError(f"field {name!r}: expected {expected}, got {type(value).__name__} {value!r}")


def _check_keys(prefix, data: dict, allowed) -> None:
    unknown = sorted(set(data) - set(allowed))
    missing = [key for key in allowed if key not in data]
    if unknown:
        named = [prefix + key for key in unknown]
        raise ValueError(f"unknown field(s) {named} (allowed: {[prefix + key for key in allowed]})")
    if missing:
        raise ValueError(f"missing field(s) {[prefix + k for k in missing]}")


def _router_from_dict(data: dict) -> RouterConfig:
    _check_keys("router.", data, ("pooling", "strategy"))
    return RouterConfig(**data)


def _check_names(field_name, names) -> None:
    _check_type(field_name, names, list)
    if not names:
        raise ValueError(f"field {field_name!r}: needs at least one domain")
    seen = {}
    for name in names:
        _check_type(f"{field_name}[]", name, str)
        if not name:
            raise ValueError(f"field {field_name!r}: a domain name is empty")
        if not _DOMAIN_NAME.match(name):
            raise ValueError(
                f"field {field_name!r}: {name!r} is not a safe folder name (expected ^[A-Za-z0-9][A-Za-z0-9_.-]*$)"
            )
        if name.lower() in _RESERVED_NAMES:
            raise ValueError(f"field {field_name!r}: {name!r} is reserved (it means no expert)")
        if name.lower() in seen:
            raise ValueError(
                f"field {field_name!r}: {name!r} duplicates {seen[name.lower()]!r} (names are compared ignoring case)"
            )
        seen[name.lower()] = name


def _check_target_modules(modules) -> None:
    _check_type("target_modules", modules, list)
    if not modules:
        raise ValueError("field 'target_modules': is empty")
    for module in modules:
        _check_type("target_modules[]", module, str)
        if module not in MODULE_PARENT:
            raise ValueError(f"field 'target_modules': {module!r} is not one of {list(TARGET_MODULES)}")
    if len(set(modules)) != len(modules):
        raise ValueError(f"field 'target_modules': {modules} has duplicates")


# ---------------------------------------------------------------------------------------------
# One PEFT LoRA adapter
# ---------------------------------------------------------------------------------------------

# adapter_config.json options the engine cannot honour: (key, predicate "is set", what it is).
_UNSUPPORTED = (
    ("use_dora", bool, "DoRA (use_dora)"),
    ("bias", lambda v: v not in (None, "none"), "bias"),
    ("lora_bias", bool, "lora_bias"),
    ("modules_to_save", bool, "modules_to_save"),
    ("fan_in_fan_out", bool, "fan_in_fan_out"),
    ("trainable_token_indices", bool, "trainable_token_indices"),
    ("target_parameters", bool, "target_parameters"),
    ("layer_replication", bool, "layer_replication"),
    ("alora_invocation_tokens", bool, "aLoRA (alora_invocation_tokens)"),
    ("use_qalora", bool, "QALoRA (use_qalora)"),
    ("use_bdlora", bool, "block-diagonal LoRA (use_bdlora)"),
    ("arrow_config", bool, "arrow_config"),
    ("kasa_config", bool, "KaSA (kasa_config)"),
    ("velora_config", bool, "velora_config"),
    ("monteclora_config", bool, "monteclora_config"),
)

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight, optionally ".lora_A.<adapter>.weight".
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\.(?P<parent>\w+)\.(?P<module>\w+)"
    r"\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)
_LORA_MODULE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?:embedding_)?[AB]\b")


@dataclass
class LoraExpert:
    """One PEFT LoRA adapter in engine terms.

    targets[(layer, module)] = (A [r, in], B [out, r], scale); module is one of TARGET_MODULES.
    Tensors keep the file's dtype. rank is the largest r over the targets.
    """

    name: str
    rank: int
    targets: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]
    path: Path | None = None

    @property
    def modules(self) -> list[str]:
        """The target modules this expert adapts, in TARGET_MODULES order."""
        present = {module for _, module in self.targets}
        return [m for m in TARGET_MODULES if m in present]

    @property
    def hidden_size(self) -> int:
        """The base model's hidden size, read off the adapter's shapes."""
        (layer, module), (A, B, _) = next(iter(self.targets.items()))
        return B.shape[0] if module in ("o_proj", "down_proj") else A.shape[1]


def load_peft_adapter(path, name: str | None = None, base_config: dict | None = None) -> LoraExpert:
    """Read a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) into a LoraExpert.

    name defaults to the folder's name. base_config (the base model's config.json as a dict, or
    a transformers config) adds checks: every shape against the base's, layer indices in range,
    and every module the adapter targets has its weights.
    Raises FileNotFoundError for a missing folder or file, ValueError for anything else, each
    naming the file and the problem.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such PEFT adapter folder")
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    _check_adapter_config(config, config_path)
    if not weights_path.is_file():
        others = sorted(p.name for p in folder.glob("adapter_model.*"))
        hint = f" (found {others}; only safetensors is read)" if others else ""
        raise FileNotFoundError(f"{weights_path}: no such file{hint}")
    pairs = _pair_lora_tensors(_read_safetensors(weights_path), weights_path)
    targets = _scaled_targets(config, pairs, config_path, weights_path)
    _check_consistent_dims(targets, weights_path)
    if base_config is not None:
        _check_against_base(config, targets, _as_dict(base_config), folder)
    rank = max(A.shape[0] for A, _, _ in targets.values())
    return LoraExpert(name=name or folder.name, rank=rank, targets=targets, path=folder)


def _check_adapter_config(config: dict, config_path: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{config_path}: peft_type is {peft_type!r}; only 'LORA' adapters are supported")
    for key, is_set, what in _UNSUPPORTED:
        value = config.get(key)
        if value is not None and is_set(value):
            raise ValueError(f"{config_path}: {what} is not supported ({key}={value!r})")
    for key in ("r", "lora_alpha"):
        if isinstance(config.get(key), bool) or not isinstance(config.get(key), (int, float)):
            raise ValueError(f"{config_path}: {key} is missing or not a number ({config.get(key)!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise ValueError(f"{config_path}: {key} is not a JSON object ({config.get(key)!r})")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        outside = sorted({t for t in targets if t.split(".")[-1] not in MODULE_PARENT})
        if outside:
            raise ValueError(
                f"{config_path}: targets modules the engine does not support: {outside} "
                f"(supported: {list(TARGET_MODULES)})"
            )


def _pair_lora_tensors(tensors: dict, weights_path: Path) -> dict:
    """{(layer, module): (lora_A, lora_B)} from the file's keys; refuses any other key."""
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    outside, unknown = set(), []
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match and MODULE_PARENT.get(match["module"]) == match["parent"]:
            halves.setdefault((int(match["layer"]), match["module"]), {})[match["ab"]] = tensor
        elif (lora := _LORA_MODULE.match(key)) and lora["module"].split(".")[-1] not in MODULE_PARENT:
            outside.add(lora["module"])
        else:
            unknown.append(key)
    if outside:
        raise ValueError(
            f"{weights_path}: adapts modules the engine does not support: {sorted(outside)} "
            f"(supported: {list(TARGET_MODULES)} in model.layers.N)"
        )
    if unknown:
        raise ValueError(f"{weights_path}: unexpected tensor(s) {unknown[:5]}; expected only lora_A / lora_B weights")
    pairs = {}
    for (layer, module), half in halves.items():
        for have, lack in (("A", "B"), ("B", "A")):
            if have in half and lack not in half:
                raise ValueError(f"{weights_path}: {_module_name(layer, module)} has lora_{have} but no lora_{lack}")
        pairs[(layer, module)] = (half["A"], half["B"])
    return pairs


def _scaled_targets(config: dict, pairs: dict, config_path: Path, weights_path: Path) -> dict:
    """{(layer, module): (A, B, scale)} in layer, then TARGET_MODULES order; checks each pair
    against the config (targeted, rank)."""
    targets = {}
    for layer, module in sorted(pairs, key=lambda key: (key[0], TARGET_MODULES.index(key[1]))):
        A, B = pairs[(layer, module)]
        module_name = _module_name(layer, module)
        if not _is_targeted(config, module_name):
            raise ValueError(
                f"{weights_path}: has weights for {module_name}, which {ADAPTER_CONFIG} does not target "
                f"(target_modules={config.get('target_modules')}, "
                f"layers_to_transform={config.get('layers_to_transform')})"
            )
        r, scale = _rank_and_scale(config, module_name, config_path)
        _check_pair_shapes(A, B, r, module_name, weights_path)
        targets[(layer, module)] = (A, B, scale)
    if not targets:
        raise ValueError(f"{weights_path}: holds no LoRA weights")
    return targets


def _check_pair_shapes(A, B, r, module_name, weights_path) -> None:
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(
            f"{weights_path}: {module_name}: expected lora_A [r, in] and lora_B [out, r], "
            f"got {list(A.shape)} and {list(B.shape)}"
        )
    if A.shape[0] != B.shape[1]:
        raise ValueError(
            f"{weights_path}: {module_name}: lora_A {list(A.shape)} has rank {A.shape[0]} "
            f"but lora_B {list(B.shape)} has rank {B.shape[1]}"
        )
    if A.shape[0] != r:
        raise ValueError(
            f"{weights_path}: {module_name}: {ADAPTER_CONFIG} gives rank {r} (r / rank_pattern) "
            f"but lora_A is {list(A.shape)}"
        )
    if not (A.is_floating_point() and B.is_floating_point()):
        raise ValueError(
            f"{weights_path}: {module_name}: lora weights are {A.dtype} / {B.dtype}, expected floating point"
        )


def _check_consistent_dims(targets: dict, weights_path: Path) -> None:
    """Every module type has one (in, out) over the layers, and they agree on the hidden size."""
    seen: dict[str, tuple[int, int, int]] = {}
    hidden = {}
    for (layer, module), (A, B, _) in targets.items():
        in_out = (A.shape[1], B.shape[0])
        if module in seen and seen[module][1:] != in_out:
            raise ValueError(
                f"{weights_path}: {module} is [in={in_out[0]}, out={in_out[1]}] in layer {layer} "
                f"but [in={seen[module][1]}, out={seen[module][2]}] in layer {seen[module][0]}"
            )
        seen.setdefault(module, (layer, *in_out))
        hidden[module] = in_out[1] if module in ("o_proj", "down_proj") else in_out[0]
    if len(set(hidden.values())) > 1:
        raise ValueError(f"{weights_path}: the modules disagree on the hidden size: {hidden}")


def _base_shapes(base: dict) -> tuple[int, dict[str, tuple[int, int]]]:
    """The base model's layer count, and (in, out) of each of its target modules."""
    try:
        n_layers = int(base["num_hidden_layers"])
        hidden, inter = int(base["hidden_size"]), int(base["intermediate_size"])
        heads = int(base["num_attention_heads"])
        kv_heads = int(base.get("num_key_value_heads") or heads)
        head_dim = int(base.get("head_dim") or hidden // heads)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"base_config lacks or has a bad {exc}") from None
    q, kv = heads * head_dim, kv_heads * head_dim
    return n_layers, {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def _check_against_base(config: dict, targets: dict, base: dict, folder: Path) -> None:
    n_layers, shapes = _base_shapes(base)
    for (layer, module), (A, B, _) in targets.items():
        if layer >= n_layers:
            raise ValueError(
                f"{folder}: adapter made for another base: it adapts layer {layer} "
                f"but the base model has {n_layers} layers"
            )
        (n_in, n_out), r = shapes[module], A.shape[0]
        if A.shape[1] != n_in or B.shape[0] != n_out:
            raise ValueError(
                f"{folder}: adapter made for another base: {_module_name(layer, module)} expects "
                f"lora_A [{r}, {n_in}] and lora_B [{n_out}, {r}], got {list(A.shape)} and {list(B.shape)}"
            )
    for layer in range(n_layers):
        for module in TARGET_MODULES:
            if (layer, module) not in targets and _is_targeted(config, _module_name(layer, module)):
                raise ValueError(
                    f"{folder / ADAPTER_WEIGHTS}: has no weights for {_module_name(layer, module)}, "
                    f"which {ADAPTER_CONFIG} targets"
                )


def _module_name(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{MODULE_PARENT[module]}.{module}"


def _is_targeted(config: dict, name: str) -> bool:
    """Whether PEFT (0.21, tuners_utils.check_target_module_exists) puts a LoRA on module `name`."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return False
    if isinstance(exclude, list) and (name in exclude or any(name.endswith(f".{e}") for e in exclude)):
        return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    targets = targets or []
    if name in targets:
        return True
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern")
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    if not match:
        return False
    index = int(match["idx"])
    return index == layers if isinstance(layers, int) else index in layers


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's get_pattern_key: the first key k (file order) with re.match(rf"(.*\\.)?({k})$", name)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _rank_and_scale(config: dict, name: str, config_path: Path) -> tuple[int, float]:
    r = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
    if not r or r <= 0:
        raise ValueError(f"{config_path}: {name} has rank {r!r}; expected a positive integer")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return int(r), float(scale)


def _as_dict(config) -> dict:
    return config if isinstance(config, dict) else config.to_dict()


# ---------------------------------------------------------------------------------------------
# router.safetensors
# ---------------------------------------------------------------------------------------------

_ROUTER_KEY = re.compile(r"^layers\.(\d+)\.weight$")


def save_router(path, weights: list[torch.Tensor]) -> None:
    """Write the routers (one [n_domains, hidden] matrix per layer, in layer order) as float32."""
    _check_router_list(weights, f"routers for {path}")
    # copy=True: safetensors refuses tensors sharing memory (the same router passed twice).
    tensors = {
        f"layers.{l}.weight": w.detach().to("cpu", torch.float32, copy=True).contiguous()
        for l, w in enumerate(weights)
    }
    _write_safetensors(path, tensors)


def load_router(
    path, n_layers: int | None = None, n_domains: int | None = None, hidden: int | None = None
) -> list[torch.Tensor]:
    """Read router.safetensors into a list of float32 [n_domains, hidden] tensors, layer order.
    Each given size is checked (ValueError naming the file and both values)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such router file")
    tensors = _read_safetensors(path)
    layers = {}
    for key, tensor in tensors.items():
        match = _ROUTER_KEY.match(key)
        if not match:
            raise ValueError(f"{path}: unexpected tensor {key!r}; expected only layers.{{l}}.weight")
        layers[int(match[1])] = tensor
    if not layers:
        raise ValueError(f"{path}: holds no router weights")
    missing = [l for l in range(max(layers) + 1) if l not in layers]
    if missing:
        raise ValueError(f"{path}: lacks layers.{missing[0]}.weight (has layers {sorted(layers)})")
    weights = [layers[l] for l in range(len(layers))]
    _check_router_list(weights, str(path))
    if n_layers is not None and len(weights) != n_layers:
        raise ValueError(f"{path}: router has {len(weights)} layers but the model has {n_layers}")
    if n_domains is not None and weights[0].shape[0] != n_domains:
        raise ValueError(f"{path}: router has {weights[0].shape[0]} outputs but the MoA dir has {n_domains} domains")
    if hidden is not None and weights[0].shape[1] != hidden:
        raise ValueError(f"{path}: router input size is {weights[0].shape[1]} but the model's hidden size is {hidden}")
    return [w.to(torch.float32) for w in weights]


def _check_router_list(weights, where: str) -> None:
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError(f"{where}: expected a non-empty list of [n_domains, hidden] tensors, got {weights!r:.80}")
    first = weights[0]
    for l, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
            got = f"{w.dtype} {list(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"{where}: layer {l}: expected a floating [n_domains, hidden] tensor, got {got}")
        if w.shape != first.shape:
            raise ValueError(f"{where}: layer {l} is {list(w.shape)} but layer 0 is {list(first.shape)}")


# ---------------------------------------------------------------------------------------------
# The directory
# ---------------------------------------------------------------------------------------------


@dataclass
class MoADir:
    """A loaded MoA directory: its config, each domain's expert folder, and the routers (or None).
    Experts are parsed on demand (load_experts)."""

    path: Path
    config: MoAConfig
    expert_paths: dict[str, Path]
    router: list[torch.Tensor] | None = None

    @classmethod
    def load(cls, path) -> MoADir:
        """Read moa_config.json and the routers; check every domain's expert folder exists and
        the routers have one output per domain."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such MoA directory")
        config = MoAConfig.load(path / CONFIG_FILE)
        expert_paths = {}
        for domain in config.domains:
            folder = path / EXPERTS_DIR / domain
            for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                if not (folder / file).is_file():
                    raise FileNotFoundError(f"{folder / file}: missing (domain {domain!r} of {path / CONFIG_FILE})")
            expert_paths[domain] = folder
        router = None
        if (path / ROUTER_FILE).exists():
            router = load_router(path / ROUTER_FILE, n_domains=len(config.domains))
        return cls(path=path, config=config, expert_paths=expert_paths, router=router)

    def load_experts(self, base_config: dict | None = None) -> list[LoraExpert]:
        """Every domain's expert, in router order; checks they adapt only config.target_modules
        and agree with each other and the routers on the hidden size."""
        experts = [load_peft_adapter(self.expert_paths[d], d, base_config) for d in self.config.domains]
        hidden = self.router[0].shape[1] if self.router else None
        _check_experts(experts, self.config, hidden, str(self.path))
        return experts

    @staticmethod
    def save(
        path, config: MoAConfig, experts: dict, router: list[torch.Tensor] | None = None, overwrite: bool = False
    ) -> Path:
        """Write a new MoA directory at `path` atomically (built beside it, then renamed).

        experts: {domain: a PEFT LoRA folder, or a peft.PeftModel (its active adapter is saved)},
        one per config.domains. Each is parsed and checked before anything is written. router:
        one [n_domains, hidden] tensor per layer, or None. An existing `path` is an error unless
        overwrite.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
        if not isinstance(config, MoAConfig):
            raise ValueError(f"config: expected a MoAConfig, got {type(config).__name__}")
        missing, extra = set(config.domains) - set(experts), set(experts) - set(config.domains)
        if missing or extra:
            raise ValueError(
                f"experts: expected one per domain {config.domains}; "
                f"missing {sorted(missing)}, extra {sorted(extra)}"
            )
        if router is not None:
            _check_router_list(router, f"router for {path}")
            if router[0].shape[0] != len(config.domains):
                raise ValueError(
                    f"router has {router[0].shape[0]} outputs but the MoA dir has {len(config.domains)} domains"
                )
        with _staging_folder(path, overwrite) as stage, tempfile.TemporaryDirectory() as scratch:
            folders = {d: _adapter_folder(experts[d], Path(scratch) / d) for d in config.domains}
            parsed = [load_peft_adapter(folders[d], d) for d in config.domains]
            _check_experts(parsed, config, router[0].shape[1] if router is not None else None, str(path))
            for domain, folder in folders.items():
                for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                    atomic_copy(folder / file, stage / EXPERTS_DIR / domain / file)
            if router is not None:
                save_router(stage / ROUTER_FILE, router)
            config.save(stage / CONFIG_FILE)
        return path


def _check_experts(experts: list[LoraExpert], config: MoAConfig, router_hidden: int | None, where: str) -> None:
    for expert in experts:
        outside = [m for m in expert.modules if m not in config.target_modules]
        if outside:
            raise ValueError(
                f"{where}: expert {expert.name!r} adapts {outside}, not in the MoA config's "
                f"target_modules {config.target_modules}"
            )
    sizes = {e.name: e.hidden_size for e in experts}
    if router_hidden is not None:
        sizes["router"] = router_hidden
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{where}: experts and router disagree on the hidden size: {sizes}")


def _adapter_folder(expert, scratch: Path) -> Path:
    """A folder holding the expert's PEFT files: the folder given, or a PeftModel saved to scratch."""
    if isinstance(expert, (str, os.PathLike)):
        return Path(expert)
    if hasattr(expert, "save_pretrained") and hasattr(expert, "active_adapter"):
        adapter = expert.active_adapter
        if not isinstance(adapter, str):
            raise ValueError(f"expert: a PeftModel with one active adapter is expected, got {adapter!r}")
        expert.save_pretrained(str(scratch), selected_adapters=[adapter])
        return scratch if adapter == "default" else scratch / adapter
    raise ValueError(f"expert: expected a PEFT folder path or a peft.PeftModel, got {type(expert).__name__}")


class _staging_folder:
    """`with _staging_folder(target, overwrite) as tmp:` fills tmp (a hidden folder beside target)
    and renames it to target on success; removes it on failure."""

    def __init__(self, target: Path, overwrite: bool):
        self.target, self.overwrite = Path(target), overwrite

    def __enter__(self) -> Path:
        parent = self.target.parent
        parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{self.target.name}.tmp-"))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it private
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._move_into_place()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)  # gone already after the rename
        return False

    def _move_into_place(self) -> None:
        if self.target.exists():
            if not self.overwrite:
                raise FileExistsError(f"{self.target}: appeared while writing (pass overwrite=True to replace it)")
            old = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.old-"))
            os.rename(self.target, old / self.target.name)
            os.rename(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.target)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _read_json(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    try:
        return safetensors.torch.load_file(str(path))
    except Exception as exc:  # SafetensorError, or OSError/ValueError on a torn file
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def _write_safetensors(path, tensors: dict[str, torch.Tensor]) -> None:
    import safetensors.torch

    data = safetensors.torch.save(tensors, metadata={"format": "pt"})
    atomic_write_bytes(path, data)


# ---------------------------------------------------------------------------------------------
# Random adapters for tests and benchmarks
# ---------------------------------------------------------------------------------------------


def make_random_peft_adapter(
    base_model,
    out_dir,
    r: int = 8,
    alpha: float = 16,
    target_modules=TARGET_MODULES,
    seed: int = 0,
    init_scale: float | None = None,
    **lora_kwargs,
) -> Path:
    """Save a random LoRA made by real PEFT (get_peft_model + save_pretrained) at out_dir.

    base_model: an HF model folder, or a loaded causal LM (left as it was: the LoRA layers are
    unloaded after saving). lora_kwargs go to peft.LoraConfig (rank_pattern, use_rslora, ...).
    Weights: init_scale None keeps PEFT's init_lora_weights=False (nn.Linear's uniform init for
    A and B); otherwise A ~ N(0, 1/in) and B ~ N(0, init_scale^2 / r), so that B A x has
    elements of about init_scale * rms(x). The global RNG is left untouched. Written atomically.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is a test/benchmark dependency
        raise ImportError(f"make_random_peft_adapter needs peft (pip install peft): {exc}") from exc
    model = base_model
    if isinstance(base_model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)  # a str is a regex
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **lora_kwargs)
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora)
        try:
            if init_scale is not None:
                _draw_lora_weights(peft_model, init_scale)
            with _staging_folder(out_dir, overwrite=True) as stage:
                peft_model.save_pretrained(str(stage))
        finally:
            peft_model.unload()
    return out_dir


@torch.no_grad()
def _draw_lora_weights(peft_model, init_scale: float) -> None:
    for name, param in peft_model.named_parameters():
        if ".lora_A." in name:
            param.normal_(0.0, 1.0 / math.sqrt(param.shape[1]))
        elif ".lora_B." in name:
            param.normal_(0.0, init_scale / math.sqrt(param.shape[1]))
