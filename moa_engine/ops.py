"""Expert-grouped LoRA operators (Python face of ``torch.ops.moa``).

Dimension legend: T tokens, E experts, r LoRA rank, in / out the base linear's
feature sizes.

Experts of different ranks share one ``[E, r, ...]`` tensor by zero-padding every
expert to the largest rank r: the padded rows of ``lora_a`` and columns of
``lora_b`` are zero, so they add nothing. An expert's LoRA scaling (alpha / rank,
with its own rank) goes in ``scales``.

All of ``x``, ``lora_a``, ``lora_b`` (and ``y``) share one dtype: float32, bfloat16,
float16 or float64. ``expert_ids`` is int32 or int64, ``scales`` float32, all on
``x``'s device.
"""

import torch

from moa_engine import _C  # noqa: F401  (registers torch.ops.moa)

__all__ = ["grouped_lora", "grouped_lora_add_"]


def grouped_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    expert_ids: torch.Tensor,
    scales: torch.Tensor,
) -> torch.Tensor:
    """Each token's LoRA update, by its expert, for a whole mixed batch in one call.

    Semantics: ``out[t] = scales[e] * (x[t] @ lora_a[e].T) @ lora_b[e].T`` with
    ``e = expert_ids[t]``, and ``out[t] = 0`` where ``e == -1``.

    Args:
        x: ``[T, in]`` token activations (any strides).
        lora_a: ``[E, r, in]`` every expert's A (PEFT ``lora_A.weight``).
        lora_b: ``[E, out, r]`` every expert's B (PEFT ``lora_B.weight``).
        expert_ids: ``[T]`` expert of each token, in ``[-1, E)``; -1 means none.
        scales: ``[E]`` float32 scaling of each expert (``alpha / rank`` in PEFT).

    Returns:
        ``[T, out]`` in ``x``'s dtype. Differentiable in ``x``, ``lora_a`` and
        ``lora_b``. The rank-r intermediate is rounded to ``x``'s dtype; each
        output element accumulates in float32 and is rounded once.
    """
    return torch.ops.moa.grouped_lora(x, lora_a, lora_b, expert_ids, scales)


def grouped_lora_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    expert_ids: torch.Tensor,
    scales: torch.Tensor,
) -> torch.Tensor:
    """In-place form of :func:`grouped_lora`, as the engine uses it at inference.

    Semantics: ``y[t] += scales[e] * (x[t] @ lora_a[e].T) @ lora_b[e].T`` with
    ``e = expert_ids[t]``; rows with ``e == -1`` are left untouched.

    Args:
        y: ``[T, out]`` the base linear's output, updated in place.
        x, lora_a, lora_b, expert_ids, scales: as in :func:`grouped_lora`.

    Returns:
        ``y``. Inference only: no gradient flows through this op.
    """
    torch.ops.moa.grouped_lora_add_(y, x, lora_a, lora_b, expert_ids, scales)
    return y
