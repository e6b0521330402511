"""Held-out losses of the experts, and early stopping per expert (KeepBest)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .common import check_margin
from .dataset import Example
from .modules import MoAModel
from .trainer import TrainConfig, atomic_torch_save, world


@torch.no_grad()
def example_losses(
    module: MoAModel, val: dict[str, list[Example]], names: list[str], cfg: TrainConfig, batch: int = 8
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
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
            hidden, _ = module(
                b.input_ids.to(cfg.device), b.attention_mask.to(cfg.device), [module.expert_index(d)] * len(b.domains)
            )
            sel = b.labels.to(cfg.device) != -100
            per_row = sel.sum(1)
            losses = module.token_losses(hidden[sel], b.labels.to(cfg.device)[sel]).double().cpu()
            sums += [x.sum() for x in losses.split(per_row.tolist())]
            counts += per_row.tolist()
        out[d] = (torch.stack(sums), torch.tensor(counts, dtype=torch.float64))
    return out


def _mean_loss(sums: torch.Tensor, counts: torch.Tensor) -> float:
    return float(sums.sum() / counts.sum().clamp_min(1.0))


def evaluate_lm(
    module: MoAModel, val: dict[str, list[Example]], names: list[str], cfg: TrainConfig, batch: int = 8
) -> dict:
    """Mean token loss per domain on held-out examples, each through its own domain's expert."""
    return {d: _mean_loss(s, c) for d, (s, c) in example_losses(module, val, names, cfg, batch).items()}


def make_keeper(module, val, names, cfg: TrainConfig, every: int, total: int, margin: float = 0.0):
    """A KeepBest over `val` when every > 0 (kept in the checkpoint folder when checkpointing)."""
    if not every:
        return None
    path = Path(cfg.checkpoint_dir) / "keep_best.pt" if cfg.checkpoint_dir and cfg.checkpoint_every else None
    return KeepBest(module, val, names, cfg, every, total, path, margin)


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

    def __init__(
        self,
        module: MoAModel,
        val: dict[str, list[Example]],
        names: list[str],
        cfg: TrainConfig,
        every: int,
        total: int,
        path: Path | None,
        margin: float = 0.0,
    ):
        if every <= 0:
            raise ValueError(f"keep-best: the evaluation interval must be > 0 steps, got {every}")
        check_margin(margin)
        missing = [d for d in val if not val[d]]
        if missing or not val:
            raise ValueError(
                f"keep-best needs held-out examples of every trained domain (--val-fraction > 0 or --val-data); "
                f"none for {missing or list(val)}"
            )
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
