"""The training stages of Mixture-of-LoRAs, each producing a MoA directory (this module gathers
their names; each stage has its own module).

  train_experts  stage 1 (experts.py): one LoRA expert per domain; all domains in one run (mixed
                 batches, each sample through its domain's expert) or one after another (sequential).
  train_router   stage 2 (routers.py): per-layer routers from the domain labels,
                 L = L_LM + eta * mean_l CE(router_l(pooled input of layer l), domain);
                 experts frozen (a fit on cached features, router_fit.py), or tuned with the
                 routers (joint).
  add_domain     (new_domain.py) a new expert trained alone, every router widened by one output,
                 the routers retrained; the existing experts' files are not rewritten.

What they share: common.py (loading, data, checkpoint folders), losses.py (the loss functions),
keep_best.py (held-out losses and early stopping per expert), logs.py (the training log), and the
optimisation loop, trainer.py.

The loss of stage 1 is the sum over domains of each domain's mean token loss: expert d's gradient
is that of its own domain's mean loss, exactly as if it were trained alone.
"""

from __future__ import annotations

from .common import DataOptions, as_records, base_of_moa, load_base, prepare
from .common import load_moa_model as _load_moa_model  # noqa: F401  (its name before the split)
from .experts import ExpertOptions, expert_seed, mixed_records, train_experts, train_mixed_lora
from .keep_best import KeepBest, evaluate_lm, example_losses, keep_best_gain
from .losses import lm_loss, stage1_loss, stage2_loss
from .new_domain import add_domain
from .router_fit import FitResult, fit_routers, router_accuracy, router_features, serving_experts
from .routers import RouterFit, RouterOptions, train_router

__all__ = [
    "DataOptions",
    "ExpertOptions",
    "FitResult",
    "KeepBest",
    "RouterFit",
    "RouterOptions",
    "add_domain",
    "as_records",
    "base_of_moa",
    "evaluate_lm",
    "example_losses",
    "expert_seed",
    "fit_routers",
    "keep_best_gain",
    "lm_loss",
    "load_base",
    "mixed_records",
    "prepare",
    "router_accuracy",
    "router_features",
    "serving_experts",
    "stage1_loss",
    "stage2_loss",
    "train_experts",
    "train_mixed_lora",
    "train_router",
]
