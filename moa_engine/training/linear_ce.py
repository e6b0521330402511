"""Per-token cross-entropy of a frozen LM head, computed in row chunks without materialising
the [N, vocab] logits, with the hidden states' gradient formed during the forward.

    loss_t = logsumexp(h_t W^T + b) - (h_t W^T + b)[y_t]
    d loss_t / d h_t = (softmax(h_t W^T + b) - onehot(y_t)) W

loss_t depends on row t of h only, so the backward of any per-token weighting g_t is
g_t * (that row): the forward stores the unweighted rows G [N, H] (the size of h) and the
backward scales them. Per chunk of rows the logits are made, reduced and turned into G's rows
while they are still in cache; the whole [N, vocab] tensor (and its log-softmax, its gradient)
never exists. The flops are those of the unfused head (its forward GEMM and the input-gradient
GEMM; W is frozen, so no weight gradient). Memory: O(chunk * vocab) instead of O(N * vocab).
"""

from __future__ import annotations

import torch

# Rows per chunk: 64 rows of a 49k vocabulary are 12.6 MB of float32 logits.
DEFAULT_CHUNK = 64


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, labels, chunk: int):
        N = h.shape[0]
        losses = torch.empty(N, dtype=torch.float64 if h.dtype == torch.float64 else torch.float32, device=h.device)
        grad_rows = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        wt = weight.t()
        for i in range(0, N, chunk):
            rows = slice(i, min(N, i + chunk))
            logits = h[rows] @ wt
            if bias is not None:
                logits += bias
            logits = logits.to(losses.dtype)
            y = labels[rows, None]
            lse = torch.logsumexp(logits, -1, keepdim=True)
            losses[rows] = (lse - logits.gather(1, y))[:, 0]
            if grad_rows is not None:
                p = logits.sub_(lse).exp_()  # softmax, in place
                p.scatter_add_(1, y, torch.full_like(y, -1, dtype=p.dtype))
                torch.mm(p.to(weight.dtype), weight, out=grad_rows[rows])
        ctx.save_for_backward(grad_rows)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_rows,) = ctx.saved_tensors
        grad_h = grad_rows * grad_losses.to(grad_rows.dtype)[:, None] if grad_rows is not None else None
        return grad_h, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Per-token CE [N] of logits h @ weight^T (+ bias) against labels [N] (each in [0, vocab)),
    float32 (float64 for float64 h). weight [vocab, H] and bias get no gradient (a frozen head):
    use F.cross_entropy when they must train. Under autocast the head runs in its dtype, as an
    autocast nn.Linear would, and the softmax in float32."""
    if h.ndim != 2 or labels.shape != h.shape[:1] or weight.ndim != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: h {list(h.shape)}, weight {list(weight.shape)}, labels {list(labels.shape)}"
        )
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_cross_entropy: the head must be frozen (weight / bias with requires_grad=False)")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= weight.shape[0]):
        raise ValueError(f"labels must be in [0, {weight.shape[0]}), got [{int(labels.min())}, {int(labels.max())}]")
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(
            h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), labels, chunk
        )
