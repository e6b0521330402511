"""The MoA directory in Python: its vocabulary, the one writer, and the reader's Python face.

A MoA directory holds a base model's name, one PEFT LoRA expert per domain and the routers:

    <moa_dir>/
      moa_config.json              base model, domains (router order), target modules, router, eta
      experts/<domain>/            one standard PEFT LoRA folder per domain
        adapter_config.json
        adapter_model.safetensors
      router.safetensors           optional: one [n_domains, hidden] float32 matrix per layer

The format is specified in docs/moa-format.md. Reading and checking it is done by one reader,
in C++ (csrc/engine/moa_dir.h), which the C++ engine uses directly and this module reaches
through moa_engine._C: MoAConfig.load / from_dict, load_peft_adapter, load_router and
MoADir.load all call it. Writing is done here, once: MoAConfig.save, save_peft_adapter,
save_router and MoADir.save (which checks what it wrote with the reader before it puts the
directory in place).

Semantics of a loaded expert (LoraExpert.targets[(l, module)] = (A, B, scale)), per module:
    y = x @ W^T  +  scale * (x @ A^T) @ B^T        # x: [T, in], A: [r, in], B: [out, r]
which is PEFT's LoRA forward.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moa_engine import _C
from moa_engine._io import atomic_copy, atomic_write_bytes, atomic_write_json, staged_folder
from moa_engine.routing import STRATEGIES

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
POOLINGS = ("mean",)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "CONFIG_FILE",
    "EXPERTS_DIR",
    "FORMAT_VERSION",
    "MODULE_PARENT",
    "POOLINGS",
    "ROUTER_FILE",
    "STRATEGIES",
    "TARGET_MODULES",
    "LoraExpert",
    "MoAConfig",
    "MoADir",
    "RouterConfig",
    "load_peft_adapter",
    "load_router",
    "lora_adapter_config",
    "save_peft_adapter",
    "save_router",
]

# ---------------------------------------------------------------------------------------------
# moa_config.json
# ---------------------------------------------------------------------------------------------


@dataclass
class RouterConfig:
    pooling: str = "mean"
    strategy: str = "last"

    def to_dict(self) -> dict:
        return {"pooling": self.pooling, "strategy": self.strategy}


@dataclass
class MoAConfig:
    """The contents of moa_config.json. Constructing one checks it with the format's reader
    (ValueError naming the field)."""

    base_model: str
    domains: list[str]
    target_modules: list[str] = field(default_factory=lambda: list(TARGET_MODULES))
    router: RouterConfig = field(default_factory=RouterConfig)
    eta: float = 0.1
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        try:
            text = json.dumps(self.to_dict(), allow_nan=False)
        except (TypeError, ValueError) as exc:  # a value JSON cannot hold (an object, nan)
            raise ValueError(f"MoAConfig: {exc}") from None
        self._set(_C.moa_parse_config(text, "MoAConfig"))

    def _set(self, parsed: dict) -> None:
        """Take the fields as the reader parsed them (lists, float eta)."""
        self.base_model = parsed["base_model"]
        self.domains = list(parsed["domains"])
        self.target_modules = list(parsed["target_modules"])
        self.router = RouterConfig(**parsed["router"])
        self.eta = float(parsed["eta"])
        self.format_version = int(parsed["format_version"])

    def to_dict(self) -> dict:
        router = self.router.to_dict() if isinstance(self.router, RouterConfig) else self.router
        return {
            "format_version": self.format_version,
            "base_model": self.base_model,
            "domains": list(self.domains) if isinstance(self.domains, (list, tuple)) else self.domains,
            "target_modules": (
                list(self.target_modules) if isinstance(self.target_modules, (list, tuple)) else self.target_modules
            ),
            "router": router,
            "eta": self.eta,
        }

    @classmethod
    def _from_parsed(cls, parsed: dict) -> MoAConfig:
        config = cls.__new__(cls)
        config._set(parsed)
        return config

    @classmethod
    def from_dict(cls, data: dict, source: str = CONFIG_FILE) -> MoAConfig:
        """Check and build; errors read "<source>: field 'x': problem"."""
        try:
            text = json.dumps(data, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None
        return cls._from_parsed(_C.moa_parse_config(text, source))

    @classmethod
    def load(cls, path) -> MoAConfig:
        """Read a moa_config.json file."""
        return cls._from_parsed(_C.moa_read_config(os.fspath(path)))

    def save(self, path) -> None:
        atomic_write_json(path, self.to_dict())


# ---------------------------------------------------------------------------------------------
# One PEFT LoRA adapter
# ---------------------------------------------------------------------------------------------


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


def _expert(parsed: dict, path: Path | None) -> LoraExpert:
    targets = {(layer, module): (A, B, scale) for layer, module, A, B, scale in parsed["targets"]}
    return LoraExpert(name=parsed["name"], rank=parsed["rank"], targets=targets, path=path)


def _base_json(base_config) -> str | None:
    """The base model's config (config.json as a dict, or a transformers config) as JSON text."""
    if base_config is None:
        return None
    if hasattr(base_config, "to_json_string"):
        return base_config.to_json_string(use_diff=False)
    return json.dumps(base_config)


def load_peft_adapter(path, name: str | None = None, base_config: dict | None = None) -> LoraExpert:
    """Read a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) into a LoraExpert.

    name defaults to the folder's name. base_config (the base model's config.json as a dict, or
    a transformers config) adds checks: every shape against the base's, layer indices in range,
    and every module the adapter targets has its weights.
    Raises FileNotFoundError for a missing folder or file, ValueError for anything else, each
    naming the file and the problem.
    """
    folder = Path(path)
    parsed = _C.moa_read_adapter(str(folder), name or folder.name, _base_json(base_config))
    return _expert(parsed, folder)


def lora_adapter_config(base_model: str, rank: int, alpha: float, target_modules, use_rslora: bool = False) -> dict:
    """The adapter_config.json that PEFT (0.x) writes for a plain LoRA on a causal LM."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_peft_adapter(folder, adapter_config: dict, weights: dict) -> Path:
    """Write a PEFT LoRA folder atomically (built beside `folder`, then renamed over it).

    weights: {(layer, module): (A [r, in], B [out, r])}, saved as float32 under PEFT's names
    (base_model.model.model.layers.{layer}.{parent}.{module}.lora_{A,B}.weight).
    """
    tensors = {}
    for (layer, module), (A, B) in sorted(weights.items()):
        prefix = f"base_model.model.model.layers.{layer}.{MODULE_PARENT[module]}.{module}"
        tensors[f"{prefix}.lora_A.weight"] = A.detach().to("cpu", torch.float32).contiguous().clone()
        tensors[f"{prefix}.lora_B.weight"] = B.detach().to("cpu", torch.float32).contiguous().clone()
    folder = Path(folder)
    with staged_folder(folder, overwrite=True) as stage:
        atomic_write_bytes(
            stage / ADAPTER_CONFIG, (json.dumps(adapter_config, indent=2, sort_keys=True) + "\n").encode()
        )
        _write_safetensors(stage / ADAPTER_WEIGHTS, tensors)
    return folder


# ---------------------------------------------------------------------------------------------
# router.safetensors
# ---------------------------------------------------------------------------------------------


def save_router(path, weights: list[torch.Tensor]) -> None:
    """Write the routers (one [n_domains, hidden] matrix per layer, in layer order) as float32."""
    _check_router_list(weights, f"routers for {path}")
    # copy=True: safetensors refuses tensors sharing memory (the same router passed twice).
    tensors = {
        f"layers.{layer}.weight": w.detach().to("cpu", torch.float32, copy=True).contiguous()
        for layer, w in enumerate(weights)
    }
    _write_safetensors(path, tensors)


def load_router(
    path, n_layers: int | None = None, n_domains: int | None = None, hidden: int | None = None
) -> list[torch.Tensor]:
    """Read router.safetensors into a list of float32 [n_domains, hidden] tensors, layer order.
    Each given size is checked (ValueError naming the file and both values)."""
    sizes = {"n_domains": n_domains, "n_layers": n_layers, "hidden": hidden}
    return list(_C.moa_read_router(os.fspath(path), **{k: -1 if v is None else v for k, v in sizes.items()}))


def _check_router_list(weights, where: str) -> None:
    """The writer's argument check: a non-empty list of equal floating [n_domains, hidden] tensors."""
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError(f"{where}: expected a non-empty list of [n_domains, hidden] tensors, got {weights!r:.80}")
    first = weights[0]
    for layer, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
            got = f"{w.dtype} {list(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"{where}: layer {layer}: expected a floating [n_domains, hidden] tensor, got {got}")
        if w.shape != first.shape:
            raise ValueError(f"{where}: layer {layer} is {list(w.shape)} but layer 0 is {list(first.shape)}")


# ---------------------------------------------------------------------------------------------
# The directory
# ---------------------------------------------------------------------------------------------


@dataclass
class MoADir:
    """A loaded MoA directory: its config, each domain's expert folder, and the routers (or None).
    Loading checks every file; load_experts gives the experts' weights."""

    path: Path
    config: MoAConfig
    expert_paths: dict[str, Path]
    router: list[torch.Tensor] | None = None

    @classmethod
    def load(cls, path) -> MoADir:
        """Read and check the whole directory: the config, every expert and the routers."""
        path = Path(path)
        parsed = _C.moa_read_dir(str(path))
        config = MoAConfig._from_parsed(parsed["config"])
        expert_paths = {d: path / EXPERTS_DIR / d for d in config.domains}
        router = list(parsed["router"]) if parsed["router"] is not None else None
        return cls(path=path, config=config, expert_paths=expert_paths, router=router)

    def load_experts(self, base_config: dict | None = None) -> list[LoraExpert]:
        """Every domain's expert with its weights, in router order; with base_config, also
        checked against the base model."""
        parsed = _C.moa_read_dir(str(self.path), _base_json(base_config), tensors=True)
        return [_expert(e, self.expert_paths[e["name"]]) for e in parsed["experts"]]

    @staticmethod
    def save(
        path, config: MoAConfig, experts: dict, router: list[torch.Tensor] | None = None, overwrite: bool = False
    ) -> Path:
        """Write a new MoA directory at `path` atomically (built beside it, then renamed).

        experts: {domain: a PEFT LoRA folder, or a peft.PeftModel (its active adapter is saved)},
        one per config.domains. Each is read and checked before anything is written, and the
        directory as a whole before it is put in place. router: one [n_domains, hidden] tensor
        per layer, or None. An existing `path` is an error unless overwrite.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
        if not isinstance(config, MoAConfig):
            raise ValueError(f"config: expected a MoAConfig, got {type(config).__name__}")
        missing, extra = set(config.domains) - set(experts), set(experts) - set(config.domains)
        if missing or extra:
            raise ValueError(
                f"experts: expected one per domain {config.domains}; missing {sorted(missing)}, extra {sorted(extra)}"
            )
        if router is not None:
            _check_router_list(router, f"router for {path}")
        with staged_folder(path, overwrite) as stage, tempfile.TemporaryDirectory() as scratch:
            folders = {d: _adapter_folder(experts[d], Path(scratch) / d) for d in config.domains}
            for domain, folder in folders.items():
                _C.moa_read_adapter(str(folder), domain)  # checked where it is, before it is copied
                for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                    atomic_copy(folder / file, stage / EXPERTS_DIR / domain / file)
            if router is not None:
                save_router(stage / ROUTER_FILE, router)
            config.save(stage / CONFIG_FILE)
            _check_written(stage, path)
        return path


def _check_written(stage: Path, path: Path) -> None:
    """Read the staged directory back; an error names the directory it is about to become."""
    try:
        _C.moa_read_dir(str(stage))
    except (ValueError, FileNotFoundError) as exc:
        raise type(exc)(str(exc).replace(str(stage), str(path))) from None


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


def _write_safetensors(path, tensors: dict[str, torch.Tensor]) -> None:
    import safetensors.torch

    data = safetensors.torch.save(tensors, metadata={"format": "pt"})
    atomic_write_bytes(path, data)
