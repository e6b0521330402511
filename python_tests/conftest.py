"""Shared fixtures and helpers for the grouped LoRA tests.

Dimensions: T tokens, in input features, out output features, E experts, r rank.
Shapes: x [T, in], lora_a [E, r, in], lora_b [E, out, r], expert_ids [T], scales [E], y [T, out].

Helpers are imported by the test modules with `from conftest import ...` (pytest puts this folder
on sys.path).
"""

import itertools
import os
import zlib
from dataclasses import dataclass, replace

import pytest
import torch
from reference import grouped_lora_ref, grouped_lora_torch

CUDA_AVAILABLE = torch.cuda.is_available()

# Devices every device-parametrised test runs on; the CUDA case skips cleanly without a GPU.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device")],
    ),
]


def seeded_generator(node_id: str) -> torch.Generator:
    """A CPU generator seeded from a pytest node id (a test's, or a module- or session-scoped
    fixture's request.node.nodeid), shifted by MOA_TEST_SEED as `gen` is."""
    salt = os.environ.get("MOA_TEST_SEED", "0")
    return torch.Generator().manual_seed(zlib.crc32(f"{salt}:{node_id}".encode()))


@pytest.fixture
def gen(request):
    """A CPU generator seeded from the test id: reproducible, and different for every case.
    MOA_TEST_SEED (default 0) shifts every seed, to rerun the suite on fresh draws."""
    return seeded_generator(request.node.nodeid)


# ---------------------------------------------------------------------------------------------
# Expert-id patterns. Each takes (T, E, gen) and returns int64 ids [T] in [-1, E).
# Together they reach the three CPU paths: runs of >= 16 same-expert tokens (GEMM on views),
# >= 16 scattered tokens of one expert (gather + GEMM), and fewer scattered tokens (decode).
# ---------------------------------------------------------------------------------------------


def _relabel(ids, num_experts, gen):
    """Apply a random permutation of expert labels (keeping -1), so no pattern favours expert 0."""
    perm = torch.randperm(num_experts, generator=gen)
    return torch.where(ids >= 0, perm[ids.clamp(min=0)], ids)


def pattern_same(T, E, gen):
    """Every token goes to one expert: a single run."""
    e = int(torch.randint(E, (), generator=gen))
    return torch.full((T,), e, dtype=torch.int64)


def pattern_distinct(T, E, gen):
    """Every token to a different expert; cycles through a permutation when E < T."""
    return torch.randperm(E, generator=gen)[torch.arange(T) % E]


def pattern_zipf(T, E, gen, exponent=1.1):
    """Zipf-skewed experts in random order: the head expert has many scattered tokens."""
    weights = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** exponent
    ids = torch.multinomial(weights, T, replacement=True, generator=gen) if T else torch.zeros(0, dtype=torch.int64)
    return _relabel(ids, E, gen)


def pattern_blocks(T, E, gen):
    """Contiguous runs of 20-60 tokens, like packed sequences; the last run may be cut short."""
    ids = []
    previous = -1
    while len(ids) < T:
        length = int(torch.randint(20, 61, (), generator=gen))
        e = int(torch.randint(E, (), generator=gen))
        if E > 1 and e == previous:
            e = (e + 1) % E
        ids += [e] * length
        previous = e
    return torch.tensor(ids[:T], dtype=torch.int64)


def pattern_mixed_none(T, E, gen):
    """Uniformly random experts with about 30% of rows set to -1 (no adapter)."""
    ids = torch.randint(E, (T,), generator=gen)
    none = torch.rand(T, generator=gen) < 0.3
    return torch.where(none, torch.full_like(ids, -1), ids)


def pattern_empty(T, E, gen):
    """No tokens at all (T is ignored)."""
    return torch.zeros(0, dtype=torch.int64)


def pattern_all_paths(T, E, gen):
    """Every path in one call: a run of 20 tokens, then a head expert on every other token
    (>= 16 scattered tokens when T >= 52) interleaved with -1 rows and the other experts
    (decode path when E >= 3)."""
    head = min(1, E - 1)
    fillers = [-1] + list(range(2, E))
    tail = [head if i % 2 == 0 else fillers[(i // 2) % len(fillers)] for i in range(T - 20)]
    return _relabel(torch.tensor(([0] * 20 + tail)[:T], dtype=torch.int64), E, gen)


PATTERNS = {
    "same": pattern_same,
    "distinct": pattern_distinct,
    "zipf": pattern_zipf,
    "blocks": pattern_blocks,
    "mixed_none": pattern_mixed_none,
    "empty": pattern_empty,
    "all_paths": pattern_all_paths,
}

# A token count per pattern that makes the pattern do its job (see the pattern docstrings).
TOKENS = {
    "same": 50,
    "distinct": 40,
    "zipf": 240,
    "blocks": 160,
    "mixed_none": 70,
    "empty": 0,
    "all_paths": 64,
}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@dataclass
class LoraInputs:
    x: torch.Tensor  # [T, in]
    lora_a: torch.Tensor  # [E, r, in]
    lora_b: torch.Tensor  # [E, out, r]
    expert_ids: torch.Tensor  # [T]
    scales: torch.Tensor  # [E], float32

    def args(self):
        return (self.x, self.lora_a, self.lora_b, self.expert_ids, self.scales)

    def to(self, device):
        return LoraInputs(*(t.to(device) for t in self.args()))

    def with_ids_dtype(self, dtype):
        return replace(self, expert_ids=self.expert_ids.to(dtype))

    @property
    def out_features(self):
        return self.lora_b.shape[1]


def randn(shape, gen, dtype):
    """Standard normal samples, drawn in float64 for float64 and float32 otherwise."""
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.randn(shape, generator=gen, dtype=draw_dtype).to(dtype)


def make_x(T, in_features, gen, dtype, layout="contiguous"):
    """x [T, in] ~ N(0, 1), laid out as asked: contiguous, a column slice or a transpose."""
    if layout == "contiguous":
        return randn((T, in_features), gen, dtype)
    if layout == "slice":
        return randn((T, in_features + 13), gen, dtype)[:, 5 : 5 + in_features]
    if layout == "transpose":
        return randn((in_features, T), gen, dtype).t()
    raise ValueError(f"unknown x layout {layout!r}")


def make_inputs(
    gen,
    *,
    in_features,
    out_features,
    rank,
    experts,
    pattern="zipf",
    tokens=None,
    dtype=torch.float32,
    ids_dtype=torch.int64,
    x_layout="contiguous",
    device="cpu",
):
    """Well-scaled random inputs: every output element is O(1).

    x ~ N(0, 1); lora_a ~ N(0, 1/in); lora_b ~ N(0, 1/r); scales ~ U[0.5, 2] in float32.
    tokens defaults to the pattern's TOKENS entry.
    """
    T = TOKENS[pattern] if tokens is None else tokens
    ids = PATTERNS[pattern](T, experts, gen)
    T = ids.shape[0]
    x = make_x(T, in_features, gen, dtype, x_layout)
    lora_a = randn((experts, rank, in_features), gen, dtype) * (1.0 / in_features) ** 0.5
    lora_b = randn((experts, out_features, rank), gen, dtype) * (1.0 / rank) ** 0.5
    scales = 0.5 + 1.5 * torch.rand(experts, generator=gen, dtype=torch.float32)
    inputs = LoraInputs(x, lora_a, lora_b, ids.to(ids_dtype), scales)
    return inputs.to(device) if device != "cpu" else inputs


# ---------------------------------------------------------------------------------------------
# Tolerances: one table, one row per dtype (the tolerance rule in CONTRIBUTING.md).
#   bound = factor * (max abs error of the same-dtype torch computation vs the float64 reference)
#         + floor * max(1, max|reference|)
# The op accumulates in another order than torch, so "within 2x the same-dtype error" is fair.
# The floor, about one or two units in the last place of the largest output, covers small cases
# where torch happens to round luckily (a result of 11.3 has a bfloat16 ulp of 0.0625).
# float64 is held to 1e-10 relative.
# ---------------------------------------------------------------------------------------------

TOLERANCES = {
    torch.float64: dict(factor=0.0, floor=1e-10),
    torch.float32: dict(factor=2.0, floor=2.5e-7),  # 2 ulp
    torch.bfloat16: dict(factor=2.0, floor=7.9e-3),  # 1 ulp
    torch.float16: dict(factor=2.0, floor=9.8e-4),  # 1 ulp
}


def max_abs_error(got, ref):
    if got.numel() == 0:
        return 0.0
    return float((got.double() - ref.double()).abs().max())


def error_bound(dtype, same_dtype_error, ref, factor=None):
    tol = TOLERANCES[dtype]
    ref_max = float(ref.abs().max()) if ref.numel() else 0.0
    factor = tol["factor"] if factor is None else factor
    return factor * same_dtype_error + tol["floor"] * max(1.0, ref_max)


def assert_within_bound(what, got, ref, same_dtype, dtype, factor=None):
    """Assert got (any dtype) is as close to the float64 ref as the tolerance table allows,
    judged against same_dtype, the plain torch computation in the same dtype. `factor`
    overrides the table's factor."""
    assert got.shape == ref.shape, f"{what}: shape {list(got.shape)} != reference {list(ref.shape)}"
    err = max_abs_error(got, ref)
    torch_err = max_abs_error(same_dtype, ref)
    bound = error_bound(dtype, torch_err, ref, factor)
    assert err <= bound, (
        f"{what} ({dtype}): max abs error {err:.3e} vs float64 reference exceeds bound {bound:.3e} "
        f"(same-dtype torch error {torch_err:.3e})"
    )


def assert_matches_reference(out, inputs, y_before=None, factor=None):
    """Check grouped_lora's result (or grouped_lora_add_'s y, given y_before) against the
    reference: dtype, shape, device, error bound, and -1 rows untouched (exactly zero, or
    bit-identical to y_before)."""
    x = inputs.x
    T = x.shape[0]
    assert out.dtype == x.dtype, f"result dtype {out.dtype}, expected {x.dtype}"
    assert out.device == x.device, f"result device {out.device}, expected {x.device}"
    assert tuple(out.shape) == (T, inputs.out_features)

    ref = grouped_lora_ref(*inputs.args())
    same_dtype = grouped_lora_torch(*inputs.args())
    if y_before is not None:
        ref = ref + y_before.double()
        same_dtype = same_dtype + y_before
    assert_within_bound("result", out, ref, same_dtype, x.dtype, factor)

    none_rows = inputs.expert_ids == -1
    if y_before is None:
        assert torch.all(out[none_rows] == 0), "rows with expert id -1 must be exactly zero"
    else:
        assert torch.equal(out[none_rows], y_before[none_rows]), "rows with expert id -1 must be left untouched"


# ---------------------------------------------------------------------------------------------
# Pairwise covering of a parameter space (instead of the full cross product).
# ---------------------------------------------------------------------------------------------


def _pair(p, vp, q, vq):
    """The key of the pair (parameter p = value vp, parameter q = value vq), p and q ordered."""
    return (p, vp, q, vq) if p < q else (q, vq, p, vp)


def pairwise(space):
    """A deterministic greedy set of cases (dicts) in which every pair of values of every two
    parameters appears at least once. space: {name: [values]}."""
    names = list(space)
    sizes = [len(space[n]) for n in names]
    uncovered = {
        (i, a, j, b)
        for i, j in itertools.combinations(range(len(names)), 2)
        for a in range(sizes[i])
        for b in range(sizes[j])
    }
    cases = []
    while uncovered:
        i, a, j, b = min(uncovered)
        row = {i: a, j: b}
        for k in range(len(names)):
            if k in row:
                continue

            def gain(v, k=k, row=row):
                return sum(_pair(k, v, m, row[m]) in uncovered for m in row)

            row[k] = max(range(sizes[k]), key=lambda v: (gain(v), -v))
        for p, q in itertools.combinations(range(len(names)), 2):
            uncovered.discard((p, row[p], q, row[q]))
        cases.append({names[k]: space[names[k]][row[k]] for k in range(len(names))})
    return cases


def case_id(case):
    """A short readable test id for a case dict."""
    parts = []
    for key, value in case.items():
        if isinstance(value, torch.dtype):
            value = str(value).replace("torch.", "")
        parts.append(f"{key}={value}")
    return "-".join(parts)
