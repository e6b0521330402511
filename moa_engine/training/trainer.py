"""The optimisation loop shared by every training stage.

Parameters are trained in groups (one per expert, one for the routers), each with its own step
count, learning-rate schedule (linear warmup, cosine decay to min_lr_ratio * lr) and gradient
clipping. A group only moves at the steps its domain takes part in, so training several experts
in one run is the same as training each alone.

One step: every active domain's samples for that step (dataset.domain_samples), split over the
processes (DDP) and then into micro-batches; the loss function is called per micro-batch with
the step's global normalisers, so gradients do not depend on the split. Checkpoints (trainable
weights, optimizer state, step) are written atomically every `checkpoint_every` steps; `resume`
continues from the last one and checks it belongs to the same run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .._io import atomic_write_with
from .dataset import Example, collate, domain_samples

DTYPES = ("float32", "bfloat16", "float64")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    batch: int = 8  # samples per domain per step (the global batch, over all processes)
    steps: int | None = None  # steps per domain; None: from epochs
    epochs: float | None = None
    lr: float = 2e-4
    warmup: int = 0  # steps of linear warmup
    min_lr_ratio: float = 0.1  # the cosine decays to min_lr_ratio * lr
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # per group; None: no clipping
    optimizer: str = "adamw"  # adamw | sgd
    micro_batch: int | None = None  # sequences per forward on one process; None: by forward_tokens
    forward_tokens: int = 2048  # without micro_batch: forwards of length-sorted sequences, each at most
    #                             this many padded tokens (one longer sequence goes alone)
    seed: int = 0
    dtype: str = "float32"  # float32 | bfloat16 (autocast; float32 weights) | float64
    device: str = "cpu"
    grad_checkpointing: bool = False
    checkpoint_every: int = 0  # 0: no checkpoints
    checkpoint_dir: str | None = None
    resume: bool = False
    log_path: str | None = None
    progress: bool = True

    def check(self) -> None:
        def positive(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")

        positive("batch", self.batch)
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps and epochs")
        positive("steps", self.steps, allow_none=True)
        positive("epochs", self.epochs, allow_none=True)
        positive("lr", self.lr)
        positive("micro_batch", self.micro_batch, allow_none=True)
        positive("forward_tokens", self.forward_tokens)
        positive("max_grad_norm", self.max_grad_norm, allow_none=True)
        if self.warmup < 0 or self.checkpoint_every < 0 or self.weight_decay < 0:
            raise ValueError("warmup, checkpoint_every and weight_decay must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume needs a checkpoint folder")


@dataclass
class Group:
    """Parameters trained together: an expert (domain set) or the routers (all domains)."""

    name: str
    params: list[torch.nn.Parameter]
    steps: int  # the group moves at steps 0 .. steps - 1
    lr: float


@dataclass
class Plan:
    """What each step trains on: domain -> (its examples, its step count)."""

    examples: dict[str, list[Example]]
    steps: dict[str, int]
    domain_index: dict[str, int]  # domain -> index the loss function uses
    fingerprint: dict = field(default_factory=dict)  # what a resumed run must match

    @property
    def total_steps(self) -> int:
        return max(self.steps.values())


def lr_at(step: int, total: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr down to min_ratio * lr at the last step."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


def world() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when initialised, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> str:
    """Join the process group torchrun describes (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA.
    Returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return f"cuda:{local}"
    dist.init_process_group("gloo")
    return device


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def _barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

# loss_fn(model, batch, norms) -> (loss to backpropagate, {metric: tensor of per-domain sums}).
# norms["tokens"][d] / norms["samples"][d]: the step's global count of scored tokens / samples
# of domain d; the loss must be a sum of per-token (or per-sample) terms divided by those.
LossFn = Callable


def train(
    model,
    groups: list[Group],
    plan: Plan,
    loss_fn: LossFn,
    cfg: TrainConfig,
    module=None,
    after_step: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Run the plan; returns the per-step log records. `model` is what loss_fn is called with
    (a DDP wrapper when distributed); `module` the bare MoAModel (defaults to model).
    after_step(steps_done, record), when given, runs after every optimizer step, before that
    step's checkpoint is written (so a resumed run never skips it); it may add to the record."""
    cfg.check()
    run = TrainRun.start(model, groups, plan, loss_fn, cfg, module)
    start = run.resume()
    log_file = _open_log(cfg, start)
    from tqdm.auto import tqdm

    total = plan.total_steps
    bar = tqdm(total=total, initial=start, disable=not cfg.progress or run.rank != 0, unit="step", dynamic_ncols=True)
    records = []
    try:
        for step in range(start, total):
            record = train_step(run, step)
            if after_step is not None:
                after_step(step + 1, record)
            records.append(record)
            if log_file:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if (
                run.ckpt_path is not None
                and cfg.checkpoint_every
                and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == total)
            ):
                # the last one marks the run finished (a resume then has nothing left to do);
                # the stage removes it once its output is written
                _save_checkpoint(run.ckpt_path, step + 1, run.module, run.opt, plan, run.names, run.trainable)
    finally:
        bar.close()
        if log_file:
            log_file.close()
    return records


@dataclass
class TrainRun:
    """What every step of a `train` call uses: the model, the plan, the optimizer and where the
    process stands (rank, world size)."""

    model: object  # what loss_fn is called with (a DDP wrapper when distributed)
    module: object  # the bare MoAModel
    groups: list[Group]
    plan: Plan
    loss_fn: LossFn
    cfg: TrainConfig
    opt: torch.optim.Optimizer
    trainable: list  # the groups' parameters
    names: dict  # id(parameter) -> its name in module
    device: torch.device
    pad_id: int
    autocast: object  # the context each forward runs in (bfloat16 autocast, or none)
    rank: int
    world_size: int

    @property
    def ckpt_path(self) -> Path | None:
        return Path(self.cfg.checkpoint_dir) / "checkpoint.pt" if self.cfg.checkpoint_dir else None

    @classmethod
    def start(cls, model, groups: list[Group], plan: Plan, loss_fn: LossFn, cfg: TrainConfig, module=None) -> TrainRun:
        module = module if module is not None else model
        rank, world_size = world()
        device = torch.device(cfg.device)
        pad_id = _pad_id(module)
        trainable = set_trainable(module, groups)
        opt = _optimizer(groups, cfg)
        names = {id(p): n for n, p in module.named_parameters()}
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()
        return cls(
            model, module, groups, plan, loss_fn, cfg, opt, trainable, names, device, pad_id, autocast, rank, world_size
        )

    def resume(self) -> int:
        """The step to start from: 0, or with cfg.resume the step of the last checkpoint (loaded)."""
        if self.cfg.resume and self.ckpt_path is not None and self.ckpt_path.exists():
            return _load_checkpoint(self.ckpt_path, self.module, self.opt, self.plan, self.names, self.trainable)
        if self.cfg.resume:
            raise FileNotFoundError(f"--resume: no checkpoint at {self.ckpt_path}")
        return 0


def _open_log(cfg: TrainConfig, start: int):
    """The JSONL log, on the first process (appended to when resuming), or None."""
    if world()[0] != 0 or not cfg.log_path:
        return None
    Path(cfg.log_path).parent.mkdir(parents=True, exist_ok=True)
    return open(cfg.log_path, "a" if start else "w", encoding="utf-8")


def train_step(run: TrainRun, step: int) -> dict:
    """One optimizer step: the step's samples of every active domain, this process's share in
    micro-batches (gradients accumulated), the groups' learning rates and clipping, the update.
    Returns the step's log record."""
    t0 = time.perf_counter()
    plan, cfg = run.plan, run.cfg
    chosen = [
        (d, i)
        for d in plan.examples
        if step < plan.steps[d]
        for i in domain_samples(len(plan.examples[d]), cfg.batch, step, cfg.seed, d)
    ]
    norms = _norms(chosen, plan, len(plan.domain_index))
    sums, tokens = _accumulate_gradients(run, chosen, norms)
    stats = _reduce_metrics(sums, len(plan.domain_index), tokens)
    _check_finite(stats, step, run.ckpt_path)
    lrs = _update(run, step)
    return _record(step, stats, norms, plan, time.perf_counter() - t0, lrs)


def _micro_batches(run: TrainRun, mine: list) -> list[list]:
    """This process's samples of the step, cut into forwards: cfg.micro_batch sequences each, or
    by length under cfg.forward_tokens (length_buckets). [[]] for none."""
    cfg, plan = run.cfg, run.plan
    if cfg.micro_batch:
        return [mine[i : i + cfg.micro_batch] for i in range(0, len(mine), cfg.micro_batch)] or [[]]
    return length_buckets(mine, [len(plan.examples[d][i].input_ids) for d, i in mine], cfg.forward_tokens)


def _accumulate_gradients(run: TrainRun, chosen: list, norms: dict) -> tuple[dict[str, torch.Tensor], int]:
    """Forward and backward of every micro-batch of this process's share of `chosen` (DDP syncs
    the gradients at the last one); (the metrics' per-domain sums, the tokens run)."""
    plan, n_domains = run.plan, len(run.plan.domain_index)
    chunks = _micro_batches(run, chosen[run.rank :: run.world_size])
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    for c, chunk in enumerate(chunks):
        last = c == len(chunks) - 1
        sync = nullcontext() if last or not hasattr(run.model, "no_sync") else run.model.no_sync()
        with sync:
            if chunk:
                batch = collate([plan.examples[d][i] for d, i in chunk], plan.domain_index, run.pad_id)
                batch = _to(batch, run.device)
                tokens += batch.tokens
                with run.autocast:
                    loss, metrics = run.loss_fn(run.model, batch, norms)
                loss = loss * run.world_size  # DDP averages gradients over processes
            else:  # no sample for this process this step: a forward of zero weight, so
                # that DDP's gradient reduction still sees every process
                d, i = chosen[0]
                batch = _to(collate([plan.examples[d][i]], plan.domain_index, run.pad_id), run.device)
                with run.autocast:
                    loss, metrics = run.loss_fn(run.model, batch, norms)
                loss, metrics = loss * 0.0, {}
            loss.backward()
        for key, value in metrics.items():
            sums[key] = sums.get(key, torch.zeros(n_domains, dtype=torch.float64)) + value.detach().double().cpu()
    return sums, tokens


def _update(run: TrainRun, step: int) -> dict[str, float]:
    """Each group active at `step` gets its scheduled learning rate and its gradient clipped (the
    others' gradients are dropped); the optimizer steps. Returns {group: lr}."""
    cfg, lrs = run.cfg, {}
    for group, pg in zip(run.groups, run.opt.param_groups):
        if step >= group.steps:
            for p in group.params:
                p.grad = None
            continue
        pg["lr"] = lr_at(step, group.steps, group.lr, cfg.warmup, cfg.min_lr_ratio)
        lrs[group.name] = pg["lr"]
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in group.params if p.grad is not None], cfg.max_grad_norm)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return lrs


def length_buckets(items: list, lengths: list[int], budget: int) -> list[list]:
    """items sorted by length (stable), cut into forwards of at most `budget` padded tokens
    (count x longest); a sequence longer than the budget goes alone. Right padding to the
    longest of the whole step wastes up to half the compute on mixed lengths; this keeps each
    forward's padding to the spread of neighbouring lengths. [[]] for no items."""
    order = sorted(range(len(items)), key=lambda k: lengths[k])
    chunks: list[list] = []
    current: list = []
    for k in order:
        if current and (len(current) + 1) * lengths[k] > budget:
            chunks.append(current)
            current = []
        current.append(items[k])
    if current:
        chunks.append(current)
    return chunks or [[]]


def set_trainable(module, groups: list[Group]) -> list:
    """requires_grad on the groups' parameters only (call it before wrapping in DDP, which
    records the trainable parameters when it is built). Returns them."""
    trainable = [p for g in groups for p in g.params]
    if len({id(p) for p in trainable}) != len(trainable):
        raise ValueError("a parameter is in two groups")
    for p in module.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def _pad_id(module) -> int:
    config = module.hf.config
    for key in ("pad_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and value >= 0:
            return value
    return 0


def _optimizer(groups: list[Group], cfg: TrainConfig):
    param_groups = [{"params": g.params, "lr": g.lr} for g in groups]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr)
    # the fused kernel: one pass over all of a step's tensors (E experts hold E times PEFT's
    # parameters; the per-tensor loop of the default AdamW costs more than the update itself)
    params = [p for g in groups for p in g.params]
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params
    )
    return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def _norms(chosen, plan: Plan, n_domains: int) -> dict[str, torch.Tensor]:
    """The step's global counts per domain: scored tokens and samples."""
    tokens = torch.zeros(n_domains, dtype=torch.float64)
    samples = torch.zeros(n_domains, dtype=torch.float64)
    for d, i in chosen:
        k = plan.domain_index[d]
        e = plan.examples[d][i]
        tokens[k] += sum(e.loss_mask[1:])
        samples[k] += 1
    return {"tokens": tokens, "samples": samples}


def _to(batch, device):
    for name in ("input_ids", "attention_mask", "labels", "route_mask"):
        setattr(batch, name, getattr(batch, name).to(device))
    return batch


def _reduce_metrics(sums: dict, n_domains: int, tokens: int) -> dict[str, torch.Tensor]:
    keys = sorted(sums)
    flat = torch.cat([sums[k] for k in keys] + [torch.tensor([float(tokens)], dtype=torch.float64)])
    flat = _all_reduce(flat)
    out = {k: flat[i * n_domains : (i + 1) * n_domains] for i, k in enumerate(keys)}
    out["_tokens"] = flat[-1:]
    return out


def _check_finite(stats: dict, step: int, ckpt_path: Path | None) -> None:
    for key, value in stats.items():
        if not torch.isfinite(value).all():
            kept = (
                f"the last good checkpoint is kept at {ckpt_path}"
                if ckpt_path is not None and ckpt_path.exists()
                else "no checkpoint was written before it"
            )
            raise TrainingDiverged(
                f"step {step + 1}: the {key.replace('_sum', '')} loss is {value.tolist()} (not finite); "
                f"training stopped, {kept}. Lower the learning rate or check the data."
            )


def _record(step, stats, norms, plan: Plan, elapsed, lrs) -> dict:
    names = list(plan.domain_index)
    record = {"step": step + 1, "time_s": round(elapsed, 4), "lr": lrs}
    total = 0.0
    for key, value in stats.items():
        if key == "_tokens" or not key.endswith("_sum"):
            continue
        base = key[: -len("_sum")]
        denom = norms["tokens"] if base == "lm" else norms["samples"]
        per = {d: float(value[i] / denom[i]) for i, d in enumerate(names) if denom[i] > 0}
        record[base] = per
        if base == "lm":
            total += sum(per.values()) / max(1, len(per))
    for key, value in stats.items():
        if key.endswith("_correct"):
            base = key[: -len("_correct")]
            record[f"{base}_accuracy"] = {
                d: float(value[i] / norms["samples"][i]) for i, d in enumerate(names) if norms["samples"][i] > 0
            }
    if "router" in record:
        total += sum(record["router"].values()) / max(1, len(record["router"]))
    record["loss"] = total
    record["tokens"] = int(stats["_tokens"][0])
    record["tokens_per_s"] = record["tokens"] / max(elapsed, 1e-9)
    return record


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _save_checkpoint(path: Path, step: int, module, opt, plan: Plan, names, trainable) -> None:
    rank, _ = world()
    bad = [names.get(id(p), "?") for p in trainable if not torch.isfinite(p).all()]
    if bad:
        raise TrainingDiverged(f"step {step}: parameters {bad[:3]} are not finite; the checkpoint was not written")
    if rank == 0:
        state = {
            "step": step,
            "fingerprint": plan.fingerprint,
            "params": {names[id(p)]: p.detach().cpu() for p in trainable},
            "optimizer": opt.state_dict(),
            "rng": torch.get_rng_state(),  # dropout, if the model has any
        }
        atomic_torch_save(state, path)
    _barrier()


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to `path` atomically (a temporary file beside it, fsync, rename)."""
    atomic_write_with(path, lambda f: torch.save(obj, f))


def _load_checkpoint(path: Path, module, opt, plan: Plan, names, trainable) -> int:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if state.get("fingerprint") != plan.fingerprint:
        diff = sorted(
            k
            for k in set(plan.fingerprint) | set(state.get("fingerprint", {}))
            if plan.fingerprint.get(k) != state.get("fingerprint", {}).get(k)
        )
        raise ValueError(
            f"{path}: the checkpoint belongs to a different run (differs in {diff}); "
            "resume with the same data and options, or remove the checkpoint folder"
        )
    saved = state["params"]
    for p in trainable:
        name = names[id(p)]
        if name not in saved or saved[name].shape != p.shape:
            raise ValueError(f"{path}: no matching tensor for {name}")
        with torch.no_grad():
            p.copy_(saved[name].to(p.device, p.dtype))
    opt.load_state_dict(state["optimizer"])
    if "rng" in state:
        torch.set_rng_state(state["rng"])
    return int(state["step"])


def config_fingerprint(cfg: TrainConfig, **extra) -> dict:
    """The options a resumed run must share with the run it continues."""
    keep = (
        "batch",
        "steps",
        "epochs",
        "lr",
        "warmup",
        "min_lr_ratio",
        "weight_decay",
        "max_grad_norm",
        "optimizer",
        "seed",
        "dtype",
    )
    out = {k: v for k, v in asdict(cfg).items() if k in keep}
    out.update(extra)
    return out
