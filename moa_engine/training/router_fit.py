"""The routers' fit with the experts fixed: their inputs encoded once (router_features), then a
full-batch, per-layer multinomial logistic regression on them (fit_routers).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .dataset import Example
from .modules import MoAModel
from .trainer import TrainConfig, TrainingDiverged, atomic_torch_save, world

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
# that one no-grad forward over each prompt gives, and the LM loss is a constant. So the routers
# are fitted on those cached features, full batch, instead of paying a forward and backward of
# the whole model per router step.


@torch.no_grad()
def router_features(
    module: MoAModel,
    examples: list[Example],
    domain_index: dict[str, int],
    device: str,
    batch: int = 16,
    progress: bool = False,
    experts: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
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
        raise ValueError(
            f"router_features: experts must give one index in [0, {len(module.experts)}) per example ({N})"
        )
    feats = torch.empty(N, module.num_layers, module.hidden_size, dtype=torch.float32)
    labels = torch.tensor([domain_index[e.domain] for e in examples], dtype=torch.int64)
    order = sorted(range(N), key=lambda i: examples[i].route_len)  # little padding per batch
    chunks = [order[i : i + batch] for i in range(0, N, batch)]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(chunks), desc="router features", unit="batch", disable=not progress, dynamic_ncols=True)
    for chunk in chunks:
        prompts = [
            replace(
                examples[i],
                input_ids=examples[i].input_ids[: examples[i].route_len],
                loss_mask=examples[i].loss_mask[: examples[i].route_len],
            )
            for i in chunk
        ]
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


def fit_routers(
    routers: list[torch.Tensor],
    feats: torch.Tensor,
    labels: torch.Tensor,
    n_domains: int,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    fixed_rows=(),
) -> FitResult:
    """Fit every layer's router [D, H] in place to the cached features: `steps` full-batch AdamW
    steps on the domain-balanced CE (each domain weighs the same, whatever its count), cosine
    decay to lr / 10. Layers are independent; they are fitted together. Deterministic.
    fixed_rows: domain indices whose rows keep their values (the loss still sees their logits):
    only the other rows are fitted."""
    if feats.ndim != 3 or feats.shape[0] != labels.shape[0] or feats.shape[1] != len(routers):
        raise ValueError(
            f"fit_routers: features {list(feats.shape)} do not match {len(routers)} routers and {labels.shape[0]} labels"
        )
    if any(tuple(r.shape) != (n_domains, feats.shape[2]) for r in routers):
        raise ValueError(
            f"fit_routers: routers must be [{n_domains}, {feats.shape[2]}], got {[list(r.shape) for r in routers][:2]}..."
        )
    if not bool(torch.isfinite(feats).all()):
        raise TrainingDiverged("router features are not finite (NaN or inf in the model's hidden states)")
    fixed = sorted(set(int(k) for k in fixed_rows))
    if any(not 0 <= k < n_domains for k in fixed) or len(fixed) == n_domains:
        raise ValueError(
            f"fit_routers: fixed_rows must be some of the {n_domains} rows and leave one to fit, got {list(fixed_rows)}"
        )
    counts = torch.bincount(labels, minlength=n_domains).to(torch.float32)
    present = int((counts > 0).sum())
    sample_w = 1.0 / (counts[labels] * present)  # sums to 1: each present domain 1 / present
    W = torch.stack([r.detach().to("cpu", torch.float32) for r in routers]).clone().requires_grad_(True)  # [L, D, H]
    kept = W.detach()[:, fixed].clone()
    X = feats.transpose(0, 1).contiguous()  # [L, N, H]
    opt = torch.optim.AdamW([W], lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))
    )
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


def serving_experts(module: MoAModel, domains: list[str], n: int, seed: int) -> list[int]:
    """The expert each of n prompts runs through when the routers' inputs are encoded: one of the
    routed domains' experts, drawn uniformly and independently of the prompt's own domain
    (deterministic in seed). See the note at the top of this module."""
    g = torch.Generator().manual_seed(seed)
    pool = [module.expert_index(d) for d in domains]
    return [pool[k] for k in torch.randint(0, len(pool), (n,), generator=g).tolist()]


def shared_router_features(
    module: MoAModel, examples: list[Example], index: dict[str, int], cfg: TrainConfig, fingerprint: dict
):
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
    feats, labels = router_features(
        module,
        [examples[i] for i in mine],
        index,
        cfg.device,
        batch,
        progress=cfg.progress and rank == 0,
        experts=[ran[i] for i in mine],
    )
    if world_size > 1:
        import torch.distributed as dist

        parts = [None] * world_size
        dist.all_gather_object(parts, (mine, feats, labels))
        feats = torch.empty(len(examples), *feats.shape[1:], dtype=feats.dtype)
        labels = torch.empty(len(examples), dtype=torch.int64)
        for idx, f, y in parts:
            feats[idx], labels[idx] = f, y
    if rank == 0 and path is not None and cfg.checkpoint_every:
        atomic_torch_save(
            {"fingerprint": json.dumps(fingerprint, sort_keys=True), "features": feats, "labels": labels}, path
        )
    return feats, labels


@torch.no_grad()
def router_accuracy(
    module: MoAModel, val: dict[str, list[Example]], domains: list[str], cfg: TrainConfig, batch: int = 8
) -> dict:
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
