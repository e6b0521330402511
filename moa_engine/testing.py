"""Helpers for tests and benchmarks: random PEFT adapters made by real PEFT.

Not used by the engine or training; needs peft (a test and benchmark dependency).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from moa_engine._io import staged_folder
from moa_engine.moa_format import TARGET_MODULES


def make_random_peft_adapter(
    base_model,
    out_dir,
    r: int = 8,
    alpha: float = 16,
    target_modules=TARGET_MODULES,
    seed: int = 0,
    init_scale: float | None = None,
    **lora_kwargs,
) -> Path:
    """Save a random LoRA made by real PEFT (get_peft_model + save_pretrained) at out_dir.

    base_model: an HF model folder, or a loaded causal LM (left as it was: the LoRA layers are
    unloaded after saving). lora_kwargs go to peft.LoraConfig (rank_pattern, use_rslora, ...).
    Weights: init_scale None keeps PEFT's init_lora_weights=False (nn.Linear's uniform init for
    A and B); otherwise A ~ N(0, 1/in) and B ~ N(0, init_scale^2 / r), so that B A x has
    elements of about init_scale * rms(x). The global RNG is left untouched. Written atomically.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is a test/benchmark dependency
        raise ImportError(f"make_random_peft_adapter needs peft (pip install peft): {exc}") from exc
    model = base_model
    if isinstance(base_model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)  # a str is a regex
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **lora_kwargs)
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora)
        try:
            if init_scale is not None:
                _draw_lora_weights(peft_model, init_scale)
            with staged_folder(out_dir, overwrite=True) as stage:
                peft_model.save_pretrained(str(stage))
        finally:
            peft_model.unload()
    return out_dir


@torch.no_grad()
def _draw_lora_weights(peft_model, init_scale: float) -> None:
    for name, param in peft_model.named_parameters():
        if ".lora_A." in name:
            param.normal_(0.0, 1.0 / math.sqrt(param.shape[1]))
        elif ".lora_B." in name:
            param.normal_(0.0, init_scale / math.sqrt(param.shape[1]))
