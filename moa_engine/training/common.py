"""What every training stage shares: loading the base model (or a MoA directory's model), turning
the data into examples, wrapping for DDP, and the stage's checkpoint folder and log."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from moa_engine.data.records import Record, domains_of, read_records, split_records
from moa_engine.moa_format import MoADir

from .dataset import encode_records
from .modules import MoAModel, enable_checkpointing
from .trainer import TrainConfig, world

# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_base(model=None, cfg: TrainConfig | None = None):
    """(HF causal LM, tokenizer, model folder, the name to record as base_model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moa_engine.models import DEFAULT_MODEL, resolve_model

    folder = resolve_model(model)
    dtype = torch.float64 if cfg is not None and cfg.dtype == "float64" else torch.float32
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    hf.config.use_cache = False
    tokenizer = None
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    name = f"HuggingFaceTB/{DEFAULT_MODEL}" if model is None else str(Path(folder).resolve())
    if cfg is not None:
        hf.to(cfg.device)
        hf.train()  # training mode (HF checkpoints activations only in it); the weights stay frozen
        if cfg.grad_checkpointing:
            enable_checkpointing(hf)
    return hf, tokenizer, folder, name


def base_of_moa(moa: MoADir):
    """The model argument for a MoA directory's base_model (None: the default model)."""
    from moa_engine.engine import _base_model_of

    return _base_model_of(moa)


def load_moa_model(moa: MoADir, cfg: TrainConfig):
    """(MoAModel of the directory's base model with all its experts loaded, on cfg.device; tokenizer)."""
    hf, tokenizer, folder, _ = load_base(base_of_moa(moa), cfg)
    with open(Path(folder) / "config.json", encoding="utf-8") as f:
        base_config = json.load(f)
    module = MoAModel(hf, moa.config.target_modules)
    for e in moa.load_experts(base_config):
        module.load_expert(e)
    module.to(cfg.device)
    return module, tokenizer


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def as_records(data) -> list[Record]:
    """A JSONL path, or a list of Records / record dicts."""
    if isinstance(data, (str, Path)):
        return read_records(data)
    return [r if isinstance(r, Record) else Record.from_dict(r) for r in data]


@dataclass
class DataOptions:
    max_len: int = 512
    overlong: str = "truncate"  # truncate | drop
    pack: bool = False
    val_fraction: float = 0.0  # > 0: hold out this share of the records (deterministic split)


def prepare(records: list[Record], tokenizer, opts: DataOptions, seed: int, domains=None, val_records=None):
    """(train examples by domain, val examples by domain, report). The split is by record
    content and seed (data.records.split_records); or, given val_records, every record trains and
    val_records are the held-out ones."""
    if tokenizer is None:
        raise ValueError("the model folder has no tokenizer (tokenizer.json / tokenizer_config.json)")
    domains = domains_of(records, domains)
    train_records, val_records = _split(records, opts, seed, domains, val_records)
    train_examples, report = encode_records(train_records, tokenizer, opts.max_len, opts.overlong, opts.pack)
    val_examples = []
    if val_records:
        val_examples, _ = encode_records(val_records, tokenizer, opts.max_len, "truncate", False)
    by_domain = {d: [e for e in train_examples if e.domain == d] for d in domains}
    empty = [d for d, ex in by_domain.items() if not ex]
    if empty:
        raise ValueError(f"domain(s) {empty} have no training examples (all went to validation?)")
    val = {d: [e for e in val_examples if e.domain == d] for d in domains}
    return by_domain, val, report


def _split(records: list[Record], opts: DataOptions, seed: int, domains: list[str], val_records):
    """(training records, held-out records): see prepare."""
    if val_records is not None:
        if opts.val_fraction > 0:
            raise ValueError("give held-out records (val_data / --val-data) or a val_fraction, not both")
        if not val_records:
            raise ValueError("val_data: no records")
        foreign = sorted({r.domain for r in val_records} - set(domains))
        if foreign:
            raise ValueError(f"val_data: domain(s) {foreign} are not among the trained domains {domains}")
        train_records = records
    elif opts.val_fraction > 0:
        train_records, val_records = split_records(records, opts.val_fraction, seed)
    else:
        train_records, val_records = records, []
    if not train_records:
        raise ValueError("no training records")
    return train_records, val_records


# ---------------------------------------------------------------------------------------------
# Processes, checkpoints, logs
# ---------------------------------------------------------------------------------------------


def wrap_ddp(module, cfg: TrainConfig):
    """`module` in a DistributedDataParallel wrapper when there are several processes."""
    if world()[1] <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.device(cfg.device).index] if cfg.device.startswith("cuda") else None
    return DistributedDataParallel(module, device_ids=device_ids)


def checkpoint_cfg(cfg: TrainConfig, folder) -> TrainConfig:
    """cfg with its checkpoint folder (default: `folder`) and log (default: <that folder>/log.jsonl)."""
    folder = cfg.checkpoint_dir or str(folder)
    return replace(cfg, checkpoint_dir=folder, log_path=cfg.log_path or str(Path(folder) / "log.jsonl"))


def finish_checkpoints(cfg: TrainConfig) -> None:
    """A finished run's checkpoint is of no further use; its log stays."""
    if world()[0] == 0 and cfg.checkpoint_dir:
        for name in ("checkpoint.pt", "features.pt", "keep_best.pt"):
            (Path(cfg.checkpoint_dir) / name).unlink(missing_ok=True)


def check_margin(margin: float) -> None:
    """The keep-best margin: a finite number of standard errors, >= 0."""
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"keep-best margin must be a finite number >= 0 (standard errors), got {margin!r}")
