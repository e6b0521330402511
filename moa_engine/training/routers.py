"""Stage 2: per-layer routers from the domain labels,
L = L_LM + eta * mean_l CE(router_l(pooled input of layer l), domain);
experts frozen (a fit on cached features, router_fit.py), or tuned with the routers (joint).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moa_engine.data.records import Record
from moa_engine.moa_format import ADAPTER_CONFIG, MoAConfig, MoADir, RouterConfig

from .common import (
    DataOptions,
    as_records,
    check_margin,
    checkpoint_cfg,
    finish_checkpoints,
    load_moa_model,
    prepare,
    wrap_ddp,
)
from .dataset import EncodeReport, Example, examples_digest, steps_for
from .keep_best import make_keeper
from .logs import append_log
from .losses import stage2_loss
from .modules import MoAModel
from .router_fit import fit_routers, router_accuracy, shared_router_features
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


@dataclass
class RouterFit:
    """The routers' fit on cached features (see fit_routers): full-batch AdamW steps."""

    steps: int = 300
    lr: float = 3e-2
    weight_decay: float = 0.0


@dataclass
class RouterOptions:
    """What train_router does, besides its TrainConfig and DataOptions: its keyword arguments."""

    eta: float | None = None  # the routers' loss weight (None: the MoA directory's)
    joint: bool = False  # tune the experts together with the routers
    expert_lr: float | None = None  # joint: the experts' learning rate (None: cfg.lr / 10)
    strategy: str | None = None  # the serving strategy to record (None: the directory's)
    init_from_existing: bool = False  # start from the directory's routers
    refit: RouterFit = field(default_factory=RouterFit)  # joint: the routers' fit on the tuned experts afterwards
    keep_best: int = 0  # joint: early stopping per expert, every keep_best steps
    keep_best_margin: float = 0.0
    fixed_domains: list[str] = field(default_factory=list)  # frozen experts: router rows kept as they are


def train_router(
    moa_dir,
    data,
    cfg: TrainConfig | None = None,
    eta: float | None = None,
    joint: bool = False,
    expert_lr: float | None = None,
    data_opts: DataOptions | None = None,
    strategy: str | None = None,
    out=None,
    init_from_existing: bool = False,
    refit: RouterFit | None = None,
    keep_best: int = 0,
    keep_best_margin: float = 0.0,
    fixed_domains=(),
) -> dict:
    """Stage 2: train the routers of `moa_dir` on `data` (records of its domains, each domain
    weighing the same). Writes the MoA directory (in place, atomically, unless `out`).

    Experts frozen (default): the LM loss is a constant and the routers do not change the
    label-routed forward, so one no-grad forward over every record's prompt gives the routers'
    inputs and the routers are fitted on them: cfg.steps (or epochs: each step is a full pass)
    full-batch AdamW steps at cfg.lr; cfg.batch is the prompts per encoding forward.
    joint: cfg.steps steps of cfg.batch samples per domain of L = L_LM + eta * mean_l CE, the
    routers at cfg.lr and the experts at expert_lr; then the routers are refitted on the tuned
    experts' features (`refit`; RouterFit(steps=0): keep the jointly trained routers).
    keep_best > 0 (joint only): every keep_best steps each expert's loss on its domain's held-out
    examples (data_opts.val_fraction > 0) is measured, and each expert ends at its best weights,
    the stage-1 ones (step 0) included; a later state counts as better only by more than
    keep_best_margin standard errors (see KeepBest).
    fixed_domains (with the experts frozen, and init_from_existing): these domains' router rows
    keep their values and only the others are fitted, so a domain added to a MoA cannot change
    how the old domains' rows score a prompt (add_domain's router_rows="new")."""
    opts = RouterOptions(
        eta=eta,
        joint=joint,
        expert_lr=expert_lr,
        strategy=strategy,
        init_from_existing=init_from_existing,
        refit=refit or RouterFit(),
        keep_best=keep_best,
        keep_best_margin=keep_best_margin,
        fixed_domains=list(fixed_domains),
    )
    run = _start(moa_dir, data, cfg, opts, data_opts or DataOptions(), out)
    log, kept = _train_jointly(run) if opts.joint else ([], None)
    fit_steps, fit_lr, fit_wd = _fit_settings(run)
    fit = _fit(run, fit_steps, fit_lr, fit_wd) if fit_steps else None
    accuracy = router_accuracy(run.module, run.val, run.domains, run.cfg) if any(run.val.values()) else {}
    _write_moa_dir(run)
    _barrier()
    finish_checkpoints(run.cfg)
    return {
        "out": str(run.out),
        "domains": run.domains,
        "steps": max(len(log), fit_steps),
        "joint_steps": len(log),
        "fit": fit,
        "kept": kept,
        "data": run.report.summary(),
        "val_router_accuracy": accuracy,
        "log": run.cfg.log_path,
        "final": log[-1] if log else fit,
    }


@dataclass
class _Run:
    """A stage-2 run, ready to train: the MoA directory's model with its routers, and the data."""

    moa: MoADir
    out: Path
    cfg: TrainConfig
    opts: RouterOptions
    eta: float
    module: MoAModel
    domains: list[str]  # the directory's domains: the routers' outputs
    present: list[str]  # the domains with records
    index: dict[str, int]  # domain -> router output
    train: dict[str, list[Example]]
    val: dict[str, list[Example]]
    report: EncodeReport
    fingerprint: dict


def _start(moa_dir, data, cfg: TrainConfig | None, opts: RouterOptions, data_opts: DataOptions, out) -> _Run:
    """Check the arguments, load the directory's model and the data, and set the routers."""
    check_margin(opts.keep_best_margin)
    cfg = cfg or TrainConfig(steps=RouterFit.steps, lr=RouterFit.lr)
    moa = MoADir.load(moa_dir)
    out = Path(out) if out is not None else moa.path
    cfg.device = init_distributed(cfg.device)
    cfg = checkpoint_cfg(cfg, Path(f"{out}.train") / "router")
    eta = moa.config.eta if opts.eta is None else opts.eta
    records = as_records(data)
    present = _check_args(moa, records, cfg, opts, eta)
    torch.manual_seed(cfg.seed)
    module, tokenizer = load_moa_model(moa, cfg)
    train_ex, val_ex, report = prepare(records, tokenizer, data_opts, cfg.seed, present)
    domains = list(moa.config.domains)
    if opts.init_from_existing and moa.router is not None:
        module.set_routers(domains, moa.router)  # e.g. widened routers: old rows kept
    else:
        module.set_routers(domains)
    fingerprint = config_fingerprint(
        cfg,
        stage="router",
        data=examples_digest([e for d in present for e in train_ex[d]]),
        eta=eta,
        joint=opts.joint,
        expert_lr=opts.expert_lr,
        domains=domains,
        keep_best=opts.keep_best,
        router_inputs="random-expert",
        **({"keep_best_margin": opts.keep_best_margin} if opts.keep_best_margin else {}),
        **({"fixed_domains": sorted(opts.fixed_domains)} if opts.fixed_domains else {}),
    )
    index = {d: k for k, d in enumerate(domains)}
    return _Run(moa, out, cfg, opts, eta, module, domains, present, index, train_ex, val_ex, report, fingerprint)


def _check_args(moa: MoADir, records: list[Record], cfg: TrainConfig, opts: RouterOptions, eta) -> list[str]:
    """Every check of train_router's arguments; returns the domains that have records."""
    cfg.check()
    refit = opts.refit
    if refit.steps < 0 or not refit.lr > 0 or refit.weight_decay < 0:
        raise ValueError(f"refit: steps and weight_decay must be >= 0 and lr > 0, got {refit}")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > 0):
        raise ValueError(f"eta must be a positive number, got {eta!r}")
    domains = list(moa.config.domains)
    unknown = sorted({r.domain for r in records} - set(domains))
    if unknown:
        raise ValueError(f"records of domain(s) {unknown} that the MoA directory does not have (domains: {domains})")
    present = [d for d in domains if any(r.domain == d for r in records)]
    if len(present) < 2:
        raise ValueError(f"router training needs records of at least 2 domains; got {present}")
    fixed = opts.fixed_domains
    if fixed:
        if opts.joint:
            raise ValueError(
                "fixed_domains applies to the routers' fit with the experts frozen, not to --joint training"
            )
        if not (opts.init_from_existing and moa.router is not None):
            raise ValueError(
                "fixed_domains needs routers to keep: init_from_existing=True and a MoA directory with routers"
            )
        missing = sorted(set(fixed) - set(domains))
        if missing:
            raise ValueError(f"fixed_domains {missing} are not domains of {moa.path} ({domains})")
        if set(fixed) >= set(domains):
            raise ValueError(f"fixed_domains {fixed} leave no router row to fit")
    if not opts.joint:
        if opts.keep_best:
            raise ValueError("keep-best applies to --joint training (with the experts frozen nothing changes them)")
        if cfg.optimizer != "adamw" or cfg.warmup:
            raise ValueError(
                "with the experts frozen the routers are fitted by full-batch AdamW: --optimizer sgd and "
                "--warmup apply to --joint training only"
            )
    return present


def _train_jointly(run: _Run) -> tuple[list[dict], dict | None]:
    """cfg.steps steps tuning the routers (at cfg.lr) and the experts (at expert_lr) together, with
    keep-best if asked; (the step log, keep-best's kept steps or None)."""
    module, cfg, opts = run.module, run.cfg, run.opts
    steps = {d: steps_for(len(run.train[d]), cfg.batch, cfg.steps, cfg.epochs) for d in run.present}
    groups = [Group("routers", list(module.routers), max(steps.values()), cfg.lr)]
    elr = opts.expert_lr if opts.expert_lr is not None else cfg.lr / 10
    groups += [Group(d, module.expert_parameters(d), steps[d], elr) for d in run.present]
    plan = Plan(run.train, steps, run.index, run.fingerprint)
    set_trainable(module, groups)
    expert_of_domain = [module.expert_index(d) for d in run.domains]
    val = {d: run.val[d] for d in run.present}
    keeper = make_keeper(module, val, run.domains, cfg, opts.keep_best, plan.total_steps, opts.keep_best_margin)
    loss_fn = stage2_loss(expert_of_domain, list(range(len(run.domains))), run.eta, True)
    log = train(wrap_ddp(module, cfg), groups, plan, loss_fn, cfg, module, after_step=keeper)
    set_trainable(module, [])
    kept = None
    if keeper is not None:
        kept = keeper.restore()
        append_log(cfg, {"stage": "keep-best", "kept": kept, "history": keeper.history})
    return log, kept


def _fit_settings(run: _Run) -> tuple[int, float, float]:
    """(steps, lr, weight decay) of the routers' full-batch fit: the refit after joint training,
    or, with the experts frozen, cfg's (steps, or epochs rounded up: each step is a full pass)."""
    if run.opts.joint:
        return run.opts.refit.steps, run.opts.refit.lr, run.opts.refit.weight_decay
    cfg = run.cfg
    return (cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs))), cfg.lr, cfg.weight_decay


def _fit(run: _Run, steps: int, lr: float, weight_decay: float) -> dict:
    """Fit the routers on the features of every training prompt (each through a random expert)."""
    examples = [e for d in run.present for e in run.train[d]]
    feats, labels = shared_router_features(run.module, examples, run.index, run.cfg, run.fingerprint)
    result = fit_routers(
        list(run.module.routers),
        feats,
        labels,
        len(run.domains),
        steps,
        lr,
        weight_decay,
        fixed_rows=[run.index[d] for d in run.opts.fixed_domains],
    )
    fit = {
        "steps": steps,
        "lr": lr,
        "loss": result.loss,
        "train_accuracy_last": result.accuracy[-1],
        "train_accuracy_min": min(result.accuracy),
        "records": len(examples),
    }
    append_log(run.cfg, {"stage": "router-fit", **fit})
    return fit


def _write_moa_dir(run: _Run) -> None:
    """The MoA directory with the new routers (and, joint, the tuned experts), from the first process."""
    if world()[0] != 0:
        return
    moa = run.moa
    config = MoAConfig(
        base_model=moa.config.base_model,
        domains=run.domains,
        target_modules=list(moa.config.target_modules),
        router=RouterConfig(moa.config.router.pooling, run.opts.strategy or moa.config.router.strategy),
        eta=float(run.eta),
    )
    with tempfile.TemporaryDirectory() as scratch:
        experts = dict(moa.expert_paths)
        if run.opts.joint:
            for d in run.present:
                adapter_config = json.loads((moa.expert_paths[d] / ADAPTER_CONFIG).read_text())
                experts[d] = run.module.save_expert(d, Path(scratch) / d, moa.config.base_model, adapter_config)
        MoADir.save(run.out, config, experts, router=list(run.module.routers), overwrite=True)
