"""The stages' loss functions, in the form trainer.train calls them:
loss_fn(model, batch, norms) -> (loss to backpropagate, {metric: per-domain sums}).

The loss of stage 1 is the sum over domains of each domain's mean token loss: expert d's gradient
is that of its own domain's mean loss, exactly as if it were trained alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """Stage 1: each sample through its domain's expert, the LM loss of lm_loss."""

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
