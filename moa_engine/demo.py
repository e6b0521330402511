"""``moa demo``: the grouped LoRA op on a mixed-domain batch, checked and timed.

Dimension legend: T tokens, E experts, r rank, in / out feature sizes.
"""

import functools
import statistics
import time

import torch

import moa_engine
from moa_engine.ops import grouped_lora_add_

# SmolLM2-135M projections: (name, in, out).
PROJECTIONS = [("q_proj", 576, 576), ("gate_proj", 576, 1536), ("down_proj", 1536, 576)]


def _median_seconds(fn, repeats=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _per_expert_loop(y, x, lora_a, lora_b, expert_ids, scales):
    """How PEFT runs a mixed batch: mask the tokens of each expert, two matmuls."""
    for e in expert_ids.unique().tolist():
        if e < 0:
            continue
        mask = expert_ids == e
        y[mask] += scales[e] * (x[mask] @ lora_a[e].T) @ lora_b[e].T
    return y


def _batches(experts, generator):
    """A decode step (one token per sequence) and a prefill of packed sequences."""
    decode = torch.randint(-1, experts, (16,), generator=generator)  # -1: base model only
    lengths = torch.randint(64, 384, (8,), generator=generator)
    domains = torch.randint(0, experts, (8,), generator=generator)
    prefill = torch.repeat_interleave(domains, lengths)
    return [("decode", decode), ("prefill", prefill)]


def run_demo(experts=8, rank=16, dtype="float32", seed=0):
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    print(
        f"moa_engine {moa_engine.__version__} | torch {torch.__version__} | "
        f"{torch.get_num_threads()} threads | {experts} experts, rank {rank}, {dtype}"
    )
    header = f"{'batch':8} {'proj':10} {'T':>5} {'max err':>9} {'op ms':>8} {'loop ms':>8} {'speed-up':>8}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for batch, expert_ids in _batches(experts, gen):
        T = expert_ids.numel()
        for name, d_in, d_out in PROJECTIONS:
            x = torch.randn(T, d_in, generator=gen).to(torch_dtype)
            lora_a = (torch.randn(experts, rank, d_in, generator=gen) / d_in**0.5).to(torch_dtype)
            lora_b = (torch.randn(experts, d_out, rank, generator=gen) / rank**0.5).to(torch_dtype)
            scales = torch.full((experts,), 2.0)
            y0 = torch.randn(T, d_out, generator=gen).to(torch_dtype)
            got = grouped_lora_add_(y0.clone(), x, lora_a, lora_b, expert_ids, scales)
            want = _per_expert_loop(y0.clone(), x, lora_a, lora_b, expert_ids, scales)
            err = (got.float() - want.float()).abs().max().item()
            worst = max(worst, err)
            y = y0.clone()
            operands = (y, x, lora_a, lora_b, expert_ids, scales)
            t_op = _median_seconds(functools.partial(grouped_lora_add_, *operands))
            t_loop = _median_seconds(functools.partial(_per_expert_loop, *operands))
            print(
                f"{batch:8} {name:10} {T:>5} {err:>9.2e} {t_op * 1e3:>8.3f} {t_loop * 1e3:>8.3f} {t_loop / t_op:>7.1f}x"
            )
    tolerance = 1e-3 if torch_dtype == torch.float32 else 1e-1
    status = "OK" if worst <= tolerance else "MISMATCH"
    print(f"{status}: grouped op matches the per-expert loop (max abs diff {worst:.2e}, tolerance {tolerance:g})")
    return 0 if status == "OK" else 1
