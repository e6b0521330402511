"""Mixture-of-LoRAs training: LoRA experts per domain (stage 1), label-supervised routers
(stage 2) and adding a domain, on a frozen HF causal LM. See stages.py for the method and where
each stage lives."""

from .dataset import Example, encode_records
from .experts import mixed_records, train_mixed_lora
from .logs import summary_from_log
from .modules import MoALinear, MoAModel
from .stages import (
    DataOptions,
    ExpertOptions,
    RouterFit,
    add_domain,
    fit_routers,
    router_features,
    serving_experts,
    train_experts,
    train_router,
)
from .trainer import TrainConfig, TrainingDiverged

__all__ = [
    "DataOptions",
    "Example",
    "ExpertOptions",
    "MoALinear",
    "MoAModel",
    "RouterFit",
    "TrainConfig",
    "TrainingDiverged",
    "add_domain",
    "encode_records",
    "fit_routers",
    "mixed_records",
    "router_features",
    "serving_experts",
    "summary_from_log",
    "train_experts",
    "train_mixed_lora",
    "train_router",
]
