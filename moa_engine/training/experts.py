"""Stage 1: one LoRA expert per domain, and the mixed-LoRA baseline (one LoRA on every domain).

All domains train in one run (mixed batches, each sample through its domain's expert) or one
after another (sequential); both give the same experts (losses.py: each expert's gradient is that
of its own domain's mean loss).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from moa_engine.data.records import Record
from moa_engine.moa_format import TARGET_MODULES, MoAConfig, MoADir

from .common import (
    DataOptions,
    as_records,
    check_margin,
    checkpoint_cfg,
    finish_checkpoints,
    load_base,
    prepare,
    wrap_ddp,
)
from .dataset import EncodeReport, Example, examples_digest, steps_for
from .keep_best import evaluate_lm, make_keeper
from .logs import append_log
from .losses import stage1_loss
from .modules import MoAModel
from .trainer import (
    Group,
    Plan,
    TrainConfig,
    _barrier,
    config_fingerprint,
    init_distributed,
    set_trainable,
    train,
    world,
)

MIXED = "mixed"  # the mixed-LoRA baseline's one domain


@dataclass
class ExpertOptions:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGET_MODULES
    use_rslora: bool = False


def expert_seed(seed: int, domain: str) -> int:
    """The seed of an expert's initialisation: a function of (run seed, its domain) only."""
    return int.from_bytes(hashlib.sha256(f"expert:{seed}:{domain}".encode()).digest()[:8], "big") >> 1


def train_experts(
    data,
    out,
    model=None,
    cfg: TrainConfig | None = None,
    expert: ExpertOptions | None = None,
    data_opts: DataOptions | None = None,
    domains=None,
    sequential: bool = False,
    overwrite: bool = False,
    keep_best: int = 0,
    keep_best_margin: float = 0.0,
    val_data=None,
) -> dict:
    """Stage 1: one LoRA expert per domain of `data` (a JSONL path or records), written as a MoA
    directory at `out` (experts only, no router). Returns a summary dict. The held-out records are
    `val_data` (a JSONL path or records; then all of `data` trains) or a data_opts.val_fraction
    share of `data`. keep_best > 0: every keep_best steps each expert's held-out loss is measured
    and each expert ends at its best weights; a later state counts as better only by more than
    keep_best_margin standard errors (see KeepBest)."""
    check_margin(keep_best_margin)
    cfg = cfg or TrainConfig(steps=100)
    expert = expert or ExpertOptions()
    data_opts = data_opts or DataOptions()
    out = Path(out)
    if out.exists() and not overwrite and not cfg.resume:
        raise FileExistsError(f"{out}: already exists (pass overwrite to replace it)")
    cfg.device = init_distributed(cfg.device)
    cfg = checkpoint_cfg(cfg, Path(f"{out}.train") / "experts")
    cfg.check()
    run = _start(data, model, cfg, expert, data_opts, domains, val_data, sequential, keep_best, keep_best_margin)
    trained = _train_one_at_a_time(run) if sequential else _train_together(run)
    if trained.kept:
        append_log(cfg, {"stage": "keep-best", "kept": trained.kept, "history": trained.history})
    val_loss = evaluate_lm(run.module, run.val, run.names, cfg) if any(run.val.values()) else {}
    _write_experts(run, out)
    _barrier()
    for sub in trained.cfgs:
        finish_checkpoints(sub)
    return {
        "out": str(out),
        "domains": run.names,
        "steps": run.steps,
        "data": run.report.summary(),
        "val_loss": val_loss,
        "kept": trained.kept or None,
        "log": cfg.log_path,
        "final": trained.log[-1] if trained.log else None,
    }


@dataclass
class _Run:
    """A stage-1 run, ready to train: the model with a fresh expert per domain and its data."""

    cfg: TrainConfig
    module: MoAModel
    base_name: str  # recorded as the experts' base_model
    train: dict[str, list[Example]]
    val: dict[str, list[Example]]
    report: EncodeReport
    names: list[str]  # the domains, in router order
    steps: dict[str, int]
    groups: list[Group]  # one per expert, in the order of names
    fingerprint: dict
    keep_best: int
    keep_best_margin: float


@dataclass
class _Trained:
    log: list[dict] = field(default_factory=list)  # the per-step records
    kept: dict = field(default_factory=dict)  # keep-best: {domain: {"step", "val_loss"}}
    history: list[dict] = field(default_factory=list)  # keep-best's measurements
    cfgs: list[TrainConfig] = field(default_factory=list)  # the configs run (their checkpoint folders)


def _start(
    data,
    model,
    cfg: TrainConfig,
    expert: ExpertOptions,
    data_opts: DataOptions,
    domains,
    val_data,
    sequential: bool,
    keep_best: int,
    keep_best_margin: float,
) -> _Run:
    """Load the base model and the data, and add an expert per domain."""
    torch.manual_seed(cfg.seed)
    hf, tokenizer, folder, base_name = load_base(model, cfg)
    records = as_records(data)
    held_out = as_records(val_data) if val_data is not None else None
    train_ex, val_ex, report = prepare(records, tokenizer, data_opts, cfg.seed, domains, held_out)
    names = list(train_ex)
    module = MoAModel(hf, expert.targets)
    for d in names:  # each expert's initialisation depends on (seed, its name) only
        module.add_expert(d, expert.rank, expert.alpha, seed=expert_seed(cfg.seed, d), use_rslora=expert.use_rslora)
    module.to(cfg.device)
    steps = {d: steps_for(len(train_ex[d]), cfg.batch, cfg.steps, cfg.epochs) for d in names}
    fingerprint = config_fingerprint(
        cfg,
        stage="experts",
        data=examples_digest([e for d in names for e in train_ex[d]]),
        rank=expert.rank,
        alpha=expert.alpha,
        targets=list(expert.targets),
        sequential=sequential,
        keep_best=keep_best,
        **({"keep_best_margin": keep_best_margin} if keep_best_margin else {}),
        **({"val_data": examples_digest([e for d in names for e in val_ex[d]])} if held_out is not None else {}),
    )
    groups = [Group(d, module.expert_parameters(d), steps[d], cfg.lr) for d in names]
    return _Run(
        cfg, module, base_name, train_ex, val_ex, report, names, steps, groups, fingerprint, keep_best, keep_best_margin
    )


def _train_groups(run: _Run, groups: list[Group], plan: Plan, val: dict[str, list[Example]], cfg: TrainConfig):
    """Train `groups` on `plan` (keep-best on `val` when asked); (the step log, the KeepBest or None)."""
    set_trainable(run.module, groups)
    keeper = make_keeper(run.module, val, run.names, cfg, run.keep_best, plan.total_steps, run.keep_best_margin)
    log = train(
        wrap_ddp(run.module, cfg),
        groups,
        plan,
        stage1_loss(list(range(len(run.names)))),
        cfg,
        run.module,
        after_step=keeper,
    )
    return log, keeper


def _train_together(run: _Run) -> _Trained:
    """Every domain in one run: mixed batches, each sample through its own domain's expert."""
    plan = Plan(run.train, run.steps, {d: k for k, d in enumerate(run.names)}, run.fingerprint)
    log, keeper = _train_groups(run, run.groups, plan, run.val, run.cfg)
    trained = _Trained(log=log, cfgs=[run.cfg])
    if keeper is not None:
        trained.kept, trained.history = keeper.restore(), keeper.history
    return trained


def _train_one_at_a_time(run: _Run) -> _Trained:
    """One domain at a time: the same steps, each expert alone (one checkpoint folder each)."""
    trained = _Trained()
    for i, d in enumerate(run.names):
        folder = Path(run.cfg.checkpoint_dir) / d
        # resuming: a finished domain reloads its final checkpoint; one not begun starts fresh
        sub = replace(
            run.cfg,
            checkpoint_dir=str(folder),
            log_path=str(folder / "log.jsonl"),
            resume=run.cfg.resume and (folder / "checkpoint.pt").exists(),
        )
        plan = Plan(
            {d: run.train[d]},
            {d: run.steps[d]},
            {x: k for k, x in enumerate(run.names)},
            {**run.fingerprint, "domain": d},
        )
        log, keeper = _train_groups(run, [run.groups[i]], plan, {d: run.val[d]}, sub)
        trained.log += log
        if keeper is not None:
            trained.kept.update(keeper.restore())
            trained.history += [{"domain": d, **h} for h in keeper.history]
        trained.cfgs.append(sub)
    return trained


def _write_experts(run: _Run, out: Path) -> None:
    """The MoA directory of the trained experts (no router), from the first process."""
    if world()[0] != 0:
        return
    config = MoAConfig(base_model=run.base_name, domains=run.names, target_modules=list(run.module.target_modules))
    with tempfile.TemporaryDirectory() as scratch:
        folders = {d: run.module.save_expert(d, Path(scratch) / d, run.base_name) for d in run.names}
        MoADir.save(out, config, folders, overwrite=True)


# ---------------------------------------------------------------------------------------------
# The mixed-LoRA baseline
# ---------------------------------------------------------------------------------------------


def mixed_records(records, domain: str = MIXED) -> list[Record]:
    """Every record (a JSONL path or records) relabelled as one domain, `domain`: the data of
    the mixed-LoRA baseline."""
    return [Record(domain, r.prompt, r.response, r.text) for r in as_records(records)]


def train_mixed_lora(data, out, val_data=None, domain: str = MIXED, **kwargs) -> dict:
    """The mixed-LoRA baseline that MoA is compared with: one LoRA trained on every domain's
    records together. train_experts on `data` (and the held-out `val_data`, if any) with every
    record relabelled `domain` (mixed_records); kwargs are train_experts' other arguments. The
    MoA directory at `out` holds one expert, `domain`: evaluate it in mode `domain` (that expert
    for every record). Returns train_experts' summary."""
    held_out = None if val_data is None else mixed_records(val_data, domain)
    return train_experts(mixed_records(data, domain), out, val_data=held_out, **kwargs)
