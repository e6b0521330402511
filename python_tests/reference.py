"""Plain-torch references for the grouped LoRA op (every kernel has one: CONTRIBUTING.md).

Dimensions: T tokens, in input features, out output features, E experts, r rank.
Shapes: x [T, in], lora_a [E, r, in], lora_b [E, out, r], expert_ids [T], scales [E].

Semantics: y[t] = scales[e] * (x[t] @ lora_a[e].T) @ lora_b[e].T with e = expert_ids[t];
y[t] = 0 where e = -1.

`grouped_lora_ref` is the exact float64 answer the op is judged against.
`grouped_lora_torch` is what PEFT would compute in the input dtype; its error against the
reference is the yardstick for the op's error in low-precision dtypes.
"""

import torch


def grouped_lora_ref(x, lora_a, lora_b, expert_ids, scales):
    """Token-by-token float64 reference. Differentiable in x, lora_a and lora_b.

    Returns a float64 [T, out] tensor on x's device.
    """
    # unbind once (rather than indexing per token) keeps the backward pass cheap.
    x_rows = x.double().unbind(0)  # T x [in]
    a = lora_a.double().unbind(0)  # E x [r, in]
    b = lora_b.double().unbind(0)  # E x [out, r]
    s = scales.double().tolist()
    zero_row = torch.zeros(lora_b.shape[1], dtype=torch.float64, device=x.device)
    rows = []
    for t, e in enumerate(expert_ids.tolist()):
        if e == -1:
            rows.append(zero_row)
            continue
        h = a[e] @ x_rows[t]  # [r]
        rows.append(s[e] * (b[e] @ h))  # [out]
    if not rows:
        return torch.zeros(0, lora_b.shape[1], dtype=torch.float64, device=x.device)
    return torch.stack(rows)


def grouped_lora_torch(x, lora_a, lora_b, expert_ids, scales):
    """PEFT-style same-dtype computation: per expert, a row mask and two matmuls in x's dtype.

    The intermediate x @ lora_a[e].T is rounded to x's dtype, then lora_b is applied and the
    result scaled, as `lora_B(lora_A(x)) * scaling` does in PEFT. Differentiable in x, lora_a
    and lora_b. Returns x's dtype.
    """
    ids = expert_ids.long()
    row_groups, updates = [], []
    for e in torch.unique(ids).tolist():
        if e == -1:
            continue
        rows = (ids == e).nonzero().squeeze(1)
        h = x[rows] @ lora_a[e].T  # [n_e, r], rounded to x's dtype
        row_groups.append(rows)
        updates.append((h @ lora_b[e].T) * float(scales[e]))  # [n_e, out]
    y = x.new_zeros(x.shape[0], lora_b.shape[1])
    if not updates:
        return y
    return y.index_copy(0, torch.cat(row_groups), torch.cat(updates))


def grouped_lora_rounded(x, lora_a, lora_b, expert_ids, scales, y=None):
    """The op's numerics contract, emulated in float64: the rank-r intermediate is rounded to
    x's dtype, the rest is computed exactly and rounded to x's dtype once (after adding y, if
    given). Returns x's dtype; rows with id -1 are y's (or zero)."""
    h = torch.einsum("ti,tri->tr", x.double(), lora_a.double()[expert_ids.long().clamp(min=0)])
    h = h.to(x.dtype).double()  # [T, r], rounded like PEFT's lora_A(x)
    update = torch.einsum("tr,tor->to", h, lora_b.double()[expert_ids.long().clamp(min=0)])
    update = update * scales.double()[expert_ids.long().clamp(min=0)][:, None]
    base = torch.zeros_like(update) if y is None else y.double()
    result = (base + update).to(x.dtype)
    none = expert_ids == -1
    result[none] = base[none].to(x.dtype)
    return result
