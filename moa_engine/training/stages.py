"""The training stages of Mixture-of-LoRAs, each producing a MoA directory.

  train_experts  stage 1: one LoRA expert per domain; all domains in one run (mixed batches,
                 each sample through its domain's expert) or one after another (sequential).
  train_router   stage 2: per-layer routers from the domain labels,
                 L = L_LM + eta * mean_l CE(router_l(pooled input of layer l), domain);
                 experts frozen, or tuned with the routers (joint).
  add_domain     a new expert trained alone, every router widened by one output, the routers
                 retrained; the existing experts' files are not rewritten.

The loss of stage 1 is the sum over domains of each domain's mean token loss: expert d's gradient
is that of its own domain's mean loss, exactly as if it were trained alone.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from moa_engine.data.records import Record, domains_of, read_records, split_records
from moa_engine.moa_format import (
    ADAPTER_CONFIG,
    TARGET_MODULES,
    MoAConfig,
    MoADir,
    RouterConfig,
    load_peft_adapter,
)

from .dataset import EncodeReport, Example, encode_records, examples_digest, steps_for
from .modules import MoAModel, enable_checkpointing
from .trainer import Group, Plan, TrainConfig, _barrier, atomic_torch_save, config_fingerprint, init_distributed, set_trainable, train, world

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


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def lm_loss(module, hidden, batch, norms, expert_of_row=None):
    """Sum over domains of (domain's summed token CE / its global token count), and the per-domain
    sums. The LM head runs on the scored positions only."""
    sel = batch.labels != -100
    D = len(norms["tokens"])
    if not bool(sel.any()):
        return hidden.sum() * 0.0, torch.zeros(D)
    token_loss = module.token_losses(hidden[sel], batch.labels[sel])
    rows = torch.tensor(batch.domains, device=hidden.device)
    token_domain = rows[:, None].expand_as(batch.labels)[sel]
    sums = torch.zeros(D, dtype=token_loss.dtype, device=hidden.device).index_add(0, token_domain, token_loss)
    counts = norms["tokens"].to(sums.device, sums.dtype)
    loss = (sums / counts.clamp_min(1)).sum()
    return loss, sums.detach()


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def stage1_loss(expert_of_domain: list[int]):
    def loss_fn(model, batch, norms):
        experts = [expert_of_domain[d] for d in batch.domains]
        hidden, _ = model(batch.input_ids, batch.attention_mask, experts)
        loss, sums = lm_loss(_unwrap(model), hidden, batch, norms)
        return loss, {"lm_sum": sums}

    return loss_fn


def stage2_loss(expert_of_domain: list[int], router_label: list[int], eta: float, joint: bool):
    """L = L_LM + eta * mean over layers of the routers' CE; L_LM is the mean over domains of the
    per-domain mean token loss (only computed when the experts train: it has no gradient for the
    routers, which do not change the label-routed forward)."""

    def loss_fn(model, batch, norms):
        module = _unwrap(model)
        experts = [expert_of_domain[d] for d in batch.domains]
        hidden, router_logits = model(batch.input_ids, batch.attention_mask, experts, batch.route_mask)
        labels = torch.tensor([router_label[d] for d in batch.domains], device=hidden.device)
        D = len(norms["samples"])
        per_sample = torch.stack([F.cross_entropy(lg, labels, reduction="none") for lg in router_logits]).mean(0)
        rows = torch.tensor(batch.domains, device=hidden.device)
        router_sums = torch.zeros(D, dtype=per_sample.dtype, device=hidden.device).index_add(0, rows, per_sample)
        n_samples = norms["samples"].sum().to(per_sample.dtype)
        loss = eta * per_sample.sum() / n_samples
        correct = (router_logits[-1].argmax(-1) == labels).to(per_sample.dtype)
        metrics = {
            "router_sum": router_sums.detach(),
            "router_correct": torch.zeros(D, dtype=per_sample.dtype).index_add(0, rows.cpu(), correct.detach().cpu()),
        }
        if joint:
            active = int((norms["tokens"] > 0).sum())
            lm, sums = lm_loss(module, hidden, batch, norms)
            loss = loss + lm / max(1, active)
            metrics["lm_sum"] = sums
        return loss, metrics

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Stage 1
# ---------------------------------------------------------------------------------------------


@dataclass
class ExpertOptions:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGET_MODULES
    use_rslora: bool = False


def expert_seed(seed: int, domain: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"expert:{seed}:{domain}".encode()).digest()[:8], "big") >> 1


def _wrap_ddp(module, cfg: TrainConfig):
    if world()[1] <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.device(cfg.device).index] if cfg.device.startswith("cuda") else None
    return DistributedDataParallel(module, device_ids=device_ids)


def _ckpt_cfg(cfg: TrainConfig, folder) -> TrainConfig:
    """cfg with its checkpoint folder (default: `folder`) and log (default: <that folder>/log.jsonl)."""
    folder = cfg.checkpoint_dir or str(folder)
    return replace(cfg, checkpoint_dir=folder, log_path=cfg.log_path or str(Path(folder) / "log.jsonl"))


def _finish_checkpoints(cfg: TrainConfig) -> None:
    """A finished run's checkpoint is of no further use; its log stays."""
    if world()[0] == 0 and cfg.checkpoint_dir:
        for name in ("checkpoint.pt", "features.pt", "keep_best.pt"):
            (Path(cfg.checkpoint_dir) / name).unlink(missing_ok=True)


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
    _check_margin(keep_best_margin)
    cfg = cfg or TrainConfig(steps=100)
    expert = expert or ExpertOptions()
    data_opts = data_opts or DataOptions()
    out = Path(out)
    if out.exists() and not overwrite and not cfg.resume:
        raise FileExistsError(f"{out}: already exists (pass overwrite to replace it)")
    cfg.device = init_distributed(cfg.device)
    cfg = _ckpt_cfg(cfg, Path(f"{out}.train") / "experts")
    cfg.check()
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
        cfg, stage="experts", data=examples_digest([e for d in names for e in train_ex[d]]),
        rank=expert.rank, alpha=expert.alpha, targets=list(expert.targets), sequential=sequential, keep_best=keep_best,
        **({"keep_best_margin": keep_best_margin} if keep_best_margin else {}),
        **({"val_data": examples_digest([e for d in names for e in val_ex[d]])} if held_out is not None else {}),
    )  # fmt: skip
    groups = [Group(d, module.expert_parameters(d), steps[d], cfg.lr) for d in names]
    records_log, kept, history = [], {}, []
    if sequential:
        # One domain at a time: the same steps, each expert alone (one checkpoint folder each).

        subs = []
        for i, d in enumerate(names):
            folder = Path(cfg.checkpoint_dir) / d
            # resuming: a finished domain reloads its final checkpoint; one not begun starts fresh
            sub = replace(cfg, checkpoint_dir=str(folder), log_path=str(folder / "log.jsonl"),
                          resume=cfg.resume and (folder / "checkpoint.pt").exists())  # fmt: skip
            plan = Plan({d: train_ex[d]}, {d: steps[d]}, {x: k for k, x in enumerate(names)}, {**fingerprint, "domain": d})
            set_trainable(module, [groups[i]])
            keeper = _keeper(module, {d: val_ex[d]}, names, sub, keep_best, plan.total_steps, keep_best_margin)
            records_log += train(_wrap_ddp(module, sub), [groups[i]], plan, stage1_loss(list(range(len(names)))), sub, module,
                                 after_step=keeper)  # fmt: skip
            if keeper is not None:
                kept.update(keeper.restore())
                history += [{"domain": d, **h} for h in keeper.history]
            subs.append(sub)
    else:
        subs = [cfg]
        plan = Plan(train_ex, steps, {d: k for k, d in enumerate(names)}, fingerprint)
        set_trainable(module, groups)
        keeper = _keeper(module, val_ex, names, cfg, keep_best, plan.total_steps, keep_best_margin)
        records_log = train(_wrap_ddp(module, cfg), groups, plan, stage1_loss(list(range(len(names)))), cfg, module,
                            after_step=keeper)  # fmt: skip
        if keeper is not None:
            kept, history = keeper.restore(), keeper.history
    if kept:
        _append_log(cfg, {"stage": "keep-best", "kept": kept, "history": history})
    val_loss = evaluate_lm(module, val_ex, names, cfg) if any(val_ex.values()) else {}
    if world()[0] == 0:
        config = MoAConfig(base_model=base_name, domains=names, target_modules=list(module.target_modules))
        with tempfile.TemporaryDirectory() as scratch:
            folders = {d: module.save_expert(d, Path(scratch) / d, base_name) for d in names}
            MoADir.save(out, config, folders, overwrite=True)
    _barrier()
    for sub in subs:
        _finish_checkpoints(sub)
    return {"out": str(out), "domains": names, "steps": steps, "data": report.summary(), "val_loss": val_loss, "kept": kept or None,
            "log": cfg.log_path, "final": records_log[-1] if records_log else None}  # fmt: skip


@torch.no_grad()
def example_losses(module: MoAModel, val: dict[str, list[Example]], names: list[str], cfg: TrainConfig,
                   batch: int = 8) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """{domain: (each held-out example's summed token loss, its token count)}, float64, in the
    examples' order, each example through its own domain's expert."""
    from .dataset import collate

    out = {}
    index = {d: k for k, d in enumerate(names)}
    for d, examples in val.items():
        if not examples:
            continue
        sums, counts = [], []
        for i in range(0, len(examples), batch):
            b = collate(examples[i : i + batch], index, 0)
            hidden, _ = module(b.input_ids.to(cfg.device), b.attention_mask.to(cfg.device), [module.expert_index(d)] * len(b.domains))
            sel = b.labels.to(cfg.device) != -100
            per_row = sel.sum(1)
            losses = module.token_losses(hidden[sel], b.labels.to(cfg.device)[sel]).double().cpu()
            sums += [x.sum() for x in losses.split(per_row.tolist())]
            counts += per_row.tolist()
        out[d] = (torch.stack(sums), torch.tensor(counts, dtype=torch.float64))
    return out


def _mean_loss(sums: torch.Tensor, counts: torch.Tensor) -> float:
    return float(sums.sum() / counts.sum().clamp_min(1.0))


def evaluate_lm(module: MoAModel, val: dict[str, list[Example]], names: list[str], cfg: TrainConfig, batch: int = 8) -> dict:
    """Mean token loss per domain on held-out examples, each through its own domain's expert."""
    return {d: _mean_loss(s, c) for d, (s, c) in example_losses(module, val, names, cfg, batch).items()}


def _keeper(module, val, names, cfg: TrainConfig, every: int, total: int, margin: float = 0.0):
    """A KeepBest over `val` when every > 0 (kept in the checkpoint folder when checkpointing)."""
    if not every:
        return None
    path = Path(cfg.checkpoint_dir) / "keep_best.pt" if cfg.checkpoint_dir and cfg.checkpoint_every else None
    return KeepBest(module, val, names, cfg, every, total, path, margin)


def _check_margin(margin: float) -> None:
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"keep-best margin must be a finite number >= 0 (standard errors), got {margin!r}")


def keep_best_gain(kept: torch.Tensor, new: torch.Tensor, counts: torch.Tensor) -> tuple[float, float]:
    """How much lower the new state's mean token loss is than the kept one's, over the same
    examples (per-example loss sums `kept` and `new`, token counts `counts`), and that gain's
    standard error from the paired per-example differences: sqrt(n) * sd(kept_i - new_i) / tokens
    (0 with a single example)."""
    diff = kept - new
    tokens = float(counts.sum().clamp_min(1.0))
    se = math.sqrt(len(diff)) * float(diff.std()) / tokens if len(diff) > 1 else 0.0
    return float(diff.sum()) / tokens, se


class KeepBest:
    """Early stopping per expert: every `every` steps (and after the last one) each expert's mean
    token loss on its domain's held-out examples is measured, and the expert's weights with the
    lowest loss so far are kept; step 0, the weights before this training, takes part. restore()
    puts each expert back to its best. The record (and, with checkpointing, the kept weights,
    written atomically) survives a resume: a re-run step re-measures the same loss.

    margin > 0: a measured state replaces the kept one only if its loss is lower by more than
    `margin` standard errors of the paired per-example difference (keep_best_gain), as the
    one-standard-error rule prefers the least-trained model the data cannot tell from the best.
    A few held-out examples then cannot move an expert off its start by noise; margin 0 keeps the
    plain minimum."""

    def __init__(self, module: MoAModel, val: dict[str, list[Example]], names: list[str], cfg: TrainConfig,
                 every: int, total: int, path: Path | None, margin: float = 0.0):  # fmt: skip
        if every <= 0:
            raise ValueError(f"keep-best: the evaluation interval must be > 0 steps, got {every}")
        _check_margin(margin)
        missing = [d for d in val if not val[d]]
        if missing or not val:
            raise ValueError(f"keep-best needs held-out examples of every trained domain (--val-fraction > 0 or --val-data); "
                             f"none for {missing or list(val)}")  # fmt: skip
        self.module, self.val, self.names, self.cfg = module, val, names, cfg
        self.every, self.total, self.path, self.margin = every, total, path, float(margin)
        self.best: dict[str, dict] = {}  # domain -> {"step", "loss", "sums", "state": [tensors]}
        self.history: list[dict] = []
        if cfg.resume and path is not None and path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            self.best, self.history = saved["best"], saved["history"]
        if not any(h["step"] == 0 for h in self.history):
            self.measure(0)

    def _replaces(self, best: dict, sums: torch.Tensor, counts: torch.Tensor, loss: float) -> bool:
        if not self.margin:
            return loss < best["loss"]
        gain, se = keep_best_gain(best["sums"], sums, counts)
        return gain > 0 and gain > self.margin * se

    def measure(self, step: int) -> dict[str, float]:
        losses = {}
        for d, (sums, counts) in example_losses(self.module, self.val, self.names, self.cfg).items():
            loss = losses[d] = _mean_loss(sums, counts)
            if d not in self.best or self._replaces(self.best[d], sums, counts, loss):
                state = [p.detach().to("cpu", copy=True) for p in self.module.expert_parameters(d)]
                self.best[d] = {"step": step, "loss": loss, "sums": sums, "state": state}
        self.history = [h for h in self.history if h["step"] != step] + [{"step": step, "val_loss": losses}]
        if self.path is not None and world()[0] == 0:
            atomic_torch_save({"best": self.best, "history": self.history}, self.path)
        return losses

    def __call__(self, steps_done: int, record: dict) -> None:
        if steps_done % self.every == 0 or steps_done == self.total:
            record["val_loss"] = self.measure(steps_done)

    def restore(self) -> dict:
        """Each expert back to its best weights; returns {domain: {"step", "val_loss"}}."""
        with torch.no_grad():
            for d, b in self.best.items():
                for p, v in zip(self.module.expert_parameters(d), b["state"]):
                    p.copy_(v.to(p.device, p.dtype))
        return {d: {"step": b["step"], "val_loss": b["loss"]} for d, b in self.best.items()}


# ---------------------------------------------------------------------------------------------
# Stage 2
# ---------------------------------------------------------------------------------------------


def _load_moa_model(moa: MoADir, cfg: TrainConfig):
    hf, tokenizer, folder, _ = load_base(base_of_moa(moa), cfg)
    with open(Path(folder) / "config.json", encoding="utf-8") as f:
        base_config = json.load(f)
    module = MoAModel(hf, moa.config.target_modules)
    for e in moa.load_experts(base_config):
        module.load_expert(e)
    module.to(cfg.device)
    return module, tokenizer


@dataclass
class RouterFit:
    """The routers' fit on cached features (see fit_routers): full-batch AdamW steps."""

    steps: int = 300
    lr: float = 3e-2
    weight_decay: float = 0.0


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
    _check_margin(keep_best_margin)
    cfg = cfg or TrainConfig(steps=RouterFit.steps, lr=RouterFit.lr)
    refit = refit or RouterFit()
    data_opts = data_opts or DataOptions()
    moa = MoADir.load(moa_dir)
    out = Path(out) if out is not None else moa.path
    cfg.device = init_distributed(cfg.device)
    cfg = _ckpt_cfg(cfg, Path(f"{out}.train") / "router")
    cfg.check()
    if refit.steps < 0 or not refit.lr > 0 or refit.weight_decay < 0:
        raise ValueError(f"refit: steps and weight_decay must be >= 0 and lr > 0, got {refit}")
    torch.manual_seed(cfg.seed)
    eta = moa.config.eta if eta is None else eta
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > 0):
        raise ValueError(f"eta must be a positive number, got {eta!r}")
    module, tokenizer = _load_moa_model(moa, cfg)
    domains = list(moa.config.domains)
    records = [r for r in as_records(data)]
    unknown = sorted({r.domain for r in records} - set(domains))
    if unknown:
        raise ValueError(f"records of domain(s) {unknown} that the MoA directory does not have (domains: {domains})")
    present = [d for d in domains if any(r.domain == d for r in records)]
    if len(present) < 2:
        raise ValueError(f"router training needs records of at least 2 domains; got {present}")
    train_ex, val_ex, report = prepare(records, tokenizer, data_opts, cfg.seed, present)
    fixed_domains = list(fixed_domains)
    if fixed_domains:
        if joint:
            raise ValueError("fixed_domains applies to the routers' fit with the experts frozen, not to --joint training")
        if not (init_from_existing and moa.router is not None):
            raise ValueError("fixed_domains needs routers to keep: init_from_existing=True and a MoA directory with routers")
        missing = sorted(set(fixed_domains) - set(domains))
        if missing:
            raise ValueError(f"fixed_domains {missing} are not domains of {moa.path} ({domains})")
        if set(fixed_domains) >= set(domains):
            raise ValueError(f"fixed_domains {fixed_domains} leave no router row to fit")
    if init_from_existing and moa.router is not None:
        module.set_routers(domains, moa.router)  # e.g. widened routers: old rows kept
    else:
        module.set_routers(domains)
    index = {d: k for k, d in enumerate(domains)}
    fingerprint = config_fingerprint(
        cfg, stage="router", data=examples_digest([e for d in present for e in train_ex[d]]), eta=eta,
        joint=joint, expert_lr=expert_lr, domains=domains, keep_best=keep_best, router_inputs="random-expert",
        **({"keep_best_margin": keep_best_margin} if keep_best_margin else {}),
        **({"fixed_domains": sorted(fixed_domains)} if fixed_domains else {}),
    )  # fmt: skip
    log, fit_steps, fit_lr, fit_wd, kept = [], refit.steps, refit.lr, refit.weight_decay, None
    if joint:
        groups = [Group("routers", list(module.routers), 0, cfg.lr)]
        steps = {d: steps_for(len(train_ex[d]), cfg.batch, cfg.steps, cfg.epochs) for d in present}
        groups[0].steps = max(steps.values())
        elr = expert_lr if expert_lr is not None else cfg.lr / 10
        groups += [Group(d, module.expert_parameters(d), steps[d], elr) for d in present]
        plan = Plan(train_ex, steps, index, fingerprint)
        set_trainable(module, groups)
        expert_of_domain = [module.expert_index(d) for d in domains]
        keeper = _keeper(module, {d: val_ex[d] for d in present}, domains, cfg, keep_best, plan.total_steps, keep_best_margin)
        log = train(_wrap_ddp(module, cfg), groups, plan, stage2_loss(expert_of_domain, list(range(len(domains))), eta, joint),
                    cfg, module, after_step=keeper)  # fmt: skip
        set_trainable(module, [])
        if keeper is not None:
            kept = keeper.restore()
            _append_log(cfg, {"stage": "keep-best", "kept": kept, "history": keeper.history})
    else:
        if keep_best:
            raise ValueError("keep-best applies to --joint training (with the experts frozen nothing changes them)")
        if cfg.optimizer != "adamw" or cfg.warmup:
            raise ValueError("with the experts frozen the routers are fitted by full-batch AdamW: --optimizer sgd and "
                             "--warmup apply to --joint training only")  # fmt: skip
        fit_steps = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs))
        fit_lr, fit_wd = cfg.lr, cfg.weight_decay
    fit = None
    if fit_steps:
        examples = [e for d in present for e in train_ex[d]]
        feats, labels = _shared_router_features(module, examples, index, cfg, fingerprint)
        result = fit_routers(list(module.routers), feats, labels, len(domains), fit_steps, fit_lr, fit_wd,
                             fixed_rows=[index[d] for d in fixed_domains])  # fmt: skip
        fit = {"steps": fit_steps, "lr": fit_lr, "loss": result.loss, "train_accuracy_last": result.accuracy[-1],
               "train_accuracy_min": min(result.accuracy), "records": len(examples)}  # fmt: skip
        _append_log(cfg, {"stage": "router-fit", **fit})
    accuracy = router_accuracy(module, val_ex, domains, cfg) if any(val_ex.values()) else {}
    if world()[0] == 0:
        config = MoAConfig(
            base_model=moa.config.base_model, domains=domains, target_modules=list(moa.config.target_modules),
            router=RouterConfig(moa.config.router.pooling, strategy or moa.config.router.strategy), eta=float(eta),
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as scratch:
            experts = dict(moa.expert_paths)
            if joint:
                for d in present:
                    adapter_config = json.loads((moa.expert_paths[d] / ADAPTER_CONFIG).read_text())
                    experts[d] = module.save_expert(d, Path(scratch) / d, moa.config.base_model, adapter_config)
            MoADir.save(out, config, experts, router=list(module.routers), overwrite=True)
    _barrier()
    _finish_checkpoints(cfg)
    return {"out": str(out), "domains": domains, "steps": max(len(log), fit_steps), "joint_steps": len(log), "fit": fit, "kept": kept,
            "data": report.summary(), "val_router_accuracy": accuracy, "log": cfg.log_path,
            "final": log[-1] if log else fit}  # fmt: skip


def serving_experts(module: MoAModel, domains: list[str], n: int, seed: int) -> list[int]:
    """The expert each of n prompts runs through when the routers' inputs are encoded: one of the
    routed domains' experts, drawn uniformly and independently of the prompt's own domain
    (deterministic in seed). See the note above router_features."""
    g = torch.Generator().manual_seed(seed)
    pool = [module.expert_index(d) for d in domains]
    return [pool[k] for k in torch.randint(0, len(pool), (n,), generator=g).tolist()]


def _shared_router_features(module: MoAModel, examples: list[Example], index: dict[str, int], cfg: TrainConfig, fingerprint: dict):
    """router_features of `examples`, each prompt through an expert drawn by serving_experts,
    each process encoding its share (examples[rank::world]),
    all of them gathered on every process. With checkpointing on, the features are kept in the
    checkpoint folder, and a resumed run with the same fingerprint reuses them."""
    rank, world_size = world()
    path = Path(cfg.checkpoint_dir) / "features.pt" if cfg.checkpoint_dir else None
    if cfg.resume and path is not None and path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("fingerprint") == json.dumps(fingerprint, sort_keys=True):
            return saved["features"], saved["labels"]
    ran = serving_experts(module, list(index), len(examples), cfg.seed)
    mine = list(range(rank, len(examples), world_size))
    batch = cfg.micro_batch or cfg.batch * len(index)
    feats, labels = router_features(module, [examples[i] for i in mine], index, cfg.device, batch,
                                    progress=cfg.progress and rank == 0, experts=[ran[i] for i in mine])  # fmt: skip
    if world_size > 1:
        import torch.distributed as dist

        parts = [None] * world_size
        dist.all_gather_object(parts, (mine, feats, labels))
        feats = torch.empty(len(examples), *feats.shape[1:], dtype=feats.dtype)
        labels = torch.empty(len(examples), dtype=torch.int64)
        for idx, f, y in parts:
            feats[idx], labels[idx] = f, y
    if rank == 0 and path is not None and cfg.checkpoint_every:
        atomic_torch_save({"fingerprint": json.dumps(fingerprint, sort_keys=True), "features": feats, "labels": labels}, path)
    return feats, labels


def _append_log(cfg: TrainConfig, record: dict) -> None:
    if world()[0] == 0 and cfg.log_path:
        Path(cfg.log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(cfg.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


@torch.no_grad()
def router_accuracy(module: MoAModel, val: dict[str, list[Example]], domains: list[str], cfg: TrainConfig, batch: int = 8) -> dict:
    """Share of held-out examples whose last layer's router picks their own domain, each prompt
    run through an expert drawn as for training (serving_experts): the router must tell the
    prompt's domain whatever expert ran the layers below it."""
    index = {d: k for k, d in enumerate(domains)}
    examples = [e for d in val for e in val[d]]
    if not examples:
        return {}
    ran = serving_experts(module, domains, len(examples), cfg.seed + 1)
    feats, labels = router_features(module, examples, index, cfg.device, batch, experts=ran)
    w = module.routers[-1].detach().to("cpu", torch.float32)
    hit = (feats[:, -1] @ w.t()).argmax(-1) == labels
    return {d: float(hit[labels == index[d]].float().mean()) for d in val if val[d]}


# ---------------------------------------------------------------------------------------------
# Router fitting on cached features
# ---------------------------------------------------------------------------------------------
#
# Which expert runs the prompt while the routers' inputs are encoded matters. At serving, the
# routing pass runs layer l's expert as router l chose, so a router sees hidden states shaped by
# whatever experts ran below it. Under teacher forcing (the label's expert everywhere) the
# features carry the label's expert's own imprint: a router fitted on them learns to recognise
# that imprint rather than the prompt's domain (on the packaged corpora, teacher-forced routers
# at the last layer were right 100% of the time under the label's expert and 35-47% under
# another), so one wrong early choice carries through every layer. Each prompt is therefore
# encoded through an expert drawn at random (serving_experts), and labelled with its own
# domain: the routers learn the domain whatever expert ran below them.
#
# With the experts fixed, a router changes nothing the model computes: its input at layer l
# (the pooled output of layer l's input RMSNorm over the prompt) depends on the experts only.
# The routers' loss is then a convex, per-layer multinomial logistic regression on features
# that one no-grad forward over each prompt gives, and the LM loss is a constant. So the routers are fitted on those cached features, full batch, instead of
# paying a forward and backward of the whole model per router step.


@torch.no_grad()
def router_features(module: MoAModel, examples: list[Example], domain_index: dict[str, int], device: str,
                    batch: int = 16, progress: bool = False, experts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, L, H] float32 on the CPU, labels [N] int64): each example's pooled input of
    every router, in the order of `examples`, its prompt run through experts[i] (an expert index
    of `module`; default: its own domain's expert, teacher forcing); the label is always its
    domain. Only the routing tokens (input_ids[:route_len]) are run: causal attention makes them
    independent of what follows."""
    from .dataset import collate

    if not len(module.routers):
        raise ValueError("router_features: the model has no routers (set_routers first)")
    N = len(examples)
    if experts is not None and (len(experts) != N or any(not 0 <= e < len(module.experts) for e in experts)):
        raise ValueError(f"router_features: experts must give one index in [0, {len(module.experts)}) per example ({N})")
    feats = torch.empty(N, module.num_layers, module.hidden_size, dtype=torch.float32)
    labels = torch.tensor([domain_index[e.domain] for e in examples], dtype=torch.int64)
    order = sorted(range(N), key=lambda i: examples[i].route_len)  # little padding per batch
    chunks = [order[i : i + batch] for i in range(0, N, batch)]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(chunks), desc="router features", unit="batch", disable=not progress, dynamic_ncols=True)
    for chunk in chunks:
        prompts = [replace(examples[i], input_ids=examples[i].input_ids[: examples[i].route_len],
                           loss_mask=examples[i].loss_mask[: examples[i].route_len]) for i in chunk]  # fmt: skip
        b = collate(prompts, domain_index, 0)
        ran = [module.expert_index(examples[i].domain) if experts is None else experts[i] for i in chunk]
        module(b.input_ids.to(device), b.attention_mask.to(device), ran, b.route_mask.to(device))
        pooled = torch.stack([module._batch.pooled[l] for l in range(module.num_layers)], 1)
        feats[torch.tensor(chunk)] = pooled.float().cpu()
        bar.update(1)
    bar.close()
    module._batch.pooled = {}
    return feats, labels


@dataclass
class FitResult:
    loss: float  # the final balanced CE, mean over layers
    accuracy: list[float]  # per layer, on the fitted features (balanced over domains)


def fit_routers(routers: list[torch.Tensor], feats: torch.Tensor, labels: torch.Tensor, n_domains: int, steps: int,
                lr: float, weight_decay: float = 0.0, fixed_rows=()) -> FitResult:
    """Fit every layer's router [D, H] in place to the cached features: `steps` full-batch AdamW
    steps on the domain-balanced CE (each domain weighs the same, whatever its count), cosine
    decay to lr / 10. Layers are independent; they are fitted together. Deterministic.
    fixed_rows: domain indices whose rows keep their values (the loss still sees their logits):
    only the other rows are fitted."""
    if feats.ndim != 3 or feats.shape[0] != labels.shape[0] or feats.shape[1] != len(routers):
        raise ValueError(f"fit_routers: features {list(feats.shape)} do not match {len(routers)} routers and {labels.shape[0]} labels")
    if any(tuple(r.shape) != (n_domains, feats.shape[2]) for r in routers):
        raise ValueError(f"fit_routers: routers must be [{n_domains}, {feats.shape[2]}], got {[list(r.shape) for r in routers][:2]}...")
    if not bool(torch.isfinite(feats).all()):
        from .trainer import TrainingDiverged

        raise TrainingDiverged("router features are not finite (NaN or inf in the model's hidden states)")
    fixed = sorted(set(int(k) for k in fixed_rows))
    if any(not 0 <= k < n_domains for k in fixed) or len(fixed) == n_domains:
        raise ValueError(f"fit_routers: fixed_rows must be some of the {n_domains} rows and leave one to fit, got {list(fixed_rows)}")
    counts = torch.bincount(labels, minlength=n_domains).to(torch.float32)
    present = int((counts > 0).sum())
    sample_w = 1.0 / (counts[labels] * present)  # sums to 1: each present domain 1 / present
    W = torch.stack([r.detach().to("cpu", torch.float32) for r in routers]).clone().requires_grad_(True)  # [L, D, H]
    kept = W.detach()[:, fixed].clone()
    X = feats.transpose(0, 1).contiguous()  # [L, N, H]
    opt = torch.optim.AdamW([W], lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    L = len(routers)
    y = labels.expand(L, -1)
    loss = torch.zeros(())
    for _ in range(steps):
        logits = torch.bmm(X, W.transpose(1, 2))  # [L, N, D]
        ce = F.cross_entropy(logits.reshape(-1, n_domains), y.reshape(-1), reduction="none").view(L, -1)
        loss = (ce * sample_w).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if fixed:
            with torch.no_grad():
                W[:, fixed] = kept  # undo the step (and the weight decay) on the fixed rows
    with torch.no_grad():
        W.grad = None
        for r, w in zip(routers, W):
            r.data.copy_(w.to(r.device, r.dtype))
        pred = torch.bmm(X, W.transpose(1, 2)).argmax(-1)  # [L, N]
        hit = (pred == labels).to(torch.float32)
        acc = [float((h * sample_w).sum()) for h in hit]
    return FitResult(float(loss.detach()), acc)


# ---------------------------------------------------------------------------------------------
# Adding a domain
# ---------------------------------------------------------------------------------------------


def add_domain(
    moa_dir,
    domain: str,
    data,
    router_data=None,
    cfg: TrainConfig | None = None,
    router_cfg: TrainConfig | None = None,
    expert: ExpertOptions | None = None,
    data_opts: DataOptions | None = None,
    router_rows: str = "new",
) -> dict:
    """Train an expert for `domain` alone on `data`, add it to `moa_dir`, widen the routers by one
    output and retrain the routers only (on `router_data`, a sample of the old domains, plus the
    new domain's records). The old experts' files are copied, never rewritten.

    router_rows: "new" (default) fits the new domain's row only and keeps the old rows as they
    are, so among the old domains a prompt is routed as before, and an old domain's prompt can
    only be lost to the new one; "all" refits every row of the widened routers from their old
    values, on router_data, which is usually a small sample of the old domains."""
    if router_rows not in ("all", "new"):
        raise ValueError(f"router_rows must be 'all' or 'new', got {router_rows!r}")
    moa = MoADir.load(moa_dir)
    if domain in moa.config.domains:
        raise ValueError(f"{moa.path}: already has a domain {domain!r}")
    MoAConfig(base_model="x", domains=list(moa.config.domains) + [domain])  # checks the name
    cfg = cfg or TrainConfig(steps=100)
    data_opts = data_opts or DataOptions()
    records = as_records(data)
    other = sorted({r.domain for r in records} - {domain})
    if other:
        raise ValueError(f"--data must hold only records of the new domain {domain!r}; it also has {other}")
    if not records:
        raise ValueError(f"no records for the new domain {domain!r}")
    old_records = as_records(router_data) if router_data is not None else None
    if moa.router is not None and old_records is None:
        raise ValueError(
            f"{moa.path} has routers: retraining them needs --router-data, a sample of the old "
            f"domains' records {moa.config.domains}"
        )
    if expert is None:
        expert = _expert_options_like(moa)
    cfg.device = init_distributed(cfg.device)
    # Scratch beside the MoA dir (every process sees it under torchrun); removed at the end.
    work = Path(f"{moa.path}.train") / f"add-{domain}"
    scratch = work / "scratch"
    if world()[0] == 0 and scratch.exists():
        import shutil

        shutil.rmtree(scratch)
    _barrier()
    try:
        # Stage 1 for the new domain alone, into a scratch MoA dir.
        staged = Path(scratch) / "new"
        base_arg = base_of_moa(moa)
        summary = train_experts(
            records, staged, model=base_arg, cfg=replace(cfg, checkpoint_dir=str(work / "expert"), log_path=None), expert=expert,
            data_opts=data_opts, domains=[domain],
        )  # fmt: skip
        new_folder = Path(scratch) / "expert"
        if world()[0] == 0:
            import shutil

            shutil.copytree(staged / "experts" / domain, new_folder)
        _barrier()
        domains = list(moa.config.domains) + [domain]
        config = MoAConfig(
            base_model=moa.config.base_model, domains=domains, target_modules=list(moa.config.target_modules),
            router=moa.config.router, eta=moa.config.eta,
        )  # fmt: skip
        experts = {**moa.expert_paths, domain: new_folder}
        if moa.router is None:
            if world()[0] == 0:
                MoADir.save(moa.path, config, experts, overwrite=True)
            return {"out": str(moa.path), "expert": summary, "router": None}
        # The routers: widened by one zero row, retrained on old + new records (experts frozen).
        router_cfg = router_cfg or TrainConfig(steps=RouterFit.steps, lr=RouterFit.lr, batch=cfg.batch, seed=cfg.seed,
                                               dtype=cfg.dtype, device=cfg.device, progress=cfg.progress)  # fmt: skip
        widened = Path(scratch) / "widened"
        widened_router = [torch.cat([w, torch.zeros(1, w.shape[1])]) for w in moa.router]
        if world()[0] == 0:
            MoADir.save(widened, config, experts, router=widened_router)
        _barrier()
        result = train_router(widened, list(old_records) + list(records), cfg=replace(router_cfg, checkpoint_dir=str(work / "router"), log_path=None),
                              data_opts=data_opts, out=widened, init_from_existing=True,
                              fixed_domains=list(moa.config.domains) if router_rows == "new" else ())  # fmt: skip
        if world()[0] == 0:
            final = MoADir.load(widened)
            experts = {d: (moa.expert_paths[d] if d in moa.expert_paths else final.expert_paths[d]) for d in domains}
            MoADir.save(moa.path, final.config, experts, router=final.router, overwrite=True)
        _barrier()
    finally:
        if world()[0] == 0:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    return {"out": str(moa.path), "expert": summary, "router": result}


def _expert_options_like(moa: MoADir) -> ExpertOptions:
    """Rank, alpha and targets of the directory's first expert (a new expert matches them)."""
    first = moa.config.domains[0]
    config = json.loads((moa.expert_paths[first] / ADAPTER_CONFIG).read_text())
    return ExpertOptions(
        rank=int(config["r"]), alpha=float(config["lora_alpha"]), targets=tuple(moa.config.target_modules),
        use_rslora=bool(config.get("use_rslora", False)),
    )  # fmt: skip
