"""The CUDA kernels' tiling and indexing, replayed on CPU (cuda_emulation.py), against the
float64 references. Runs without a GPU; the GPU itself is tested in test_grouped_lora_cuda.py.

Dimensions: T tokens, in input features, out output features, E experts, r rank.

Each case checks, for the op's result: the values (to the dtype's rounding), that every output
element is written exactly once (rows without expert: zeroed by grouped_lora, untouched by
grouped_lora_add_), no NaN from a read of unwritten memory, every global access in bounds and
every 16-byte access aligned (asserted inside the emulation).
"""

import re
from pathlib import Path

import cuda_emulation as emu
import pytest
import torch
from conftest import PATTERNS, randn
from reference import grouped_lora_ref, grouped_lora_rounded

KERNELS = Path(__file__).resolve().parent.parent / "csrc" / "kernels" / "cuda"
TILING = emu.read_tiling()

# Low precision: share of elements bit-equal to the contract's rounding (the emulation sums in
# float64 and rounds like the kernels; only a value at a rounding boundary may differ by 1 ulp).
MIN_EXACT_SHARE = 0.97
# float32 / float64: max |emulated - contract| <= this many eps of max(1, max |reference|).
EPS_BOUND = 16


@pytest.fixture(autouse=True)
def one_thread():
    """The emulation runs many tiny tensor ops: one intra-op thread is several times faster
    than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiling_constants_parse_and_meet_the_kernels_asserts():
    emu.check_tiling(TILING)


def test_every_constant_is_used_by_the_kernels():
    """The emulation's constants are the kernels' constants: each one named in tiling.h is read
    by the CUDA sources (or the CUDA ops layer), not only by the emulation."""
    files = [*KERNELS.glob("*.cu"), *KERNELS.glob("*.cuh"), KERNELS.parent.parent / "ops" / "grouped_lora_cuda.cpp"]
    sources = "".join(p.read_text() for p in files)
    names = list(vars(TILING))
    unused = [n for n in names if not re.search(rf"tiling::{n}\b", sources)]
    assert not unused, f"tiling.h constants no CUDA source reads: {unused}"


def test_plan_sorts_stably_and_bounds_segments(gen):
    E = 9
    ids = torch.randint(-1, E, (500,), generator=gen)
    ids[::37] = E + 3  # out of range: treated as -1 by the kernels
    plan = emu.make_plan(ids, E)
    keys = torch.where((ids >= 0) & (ids < E), ids + 1, 0)
    assert torch.equal(plan.sorted_keys, keys[plan.perm])
    assert bool((plan.sorted_keys[1:] >= plan.sorted_keys[:-1]).all())
    for k in range(E + 1):  # stable: ascending token order within a key
        tokens = plan.perm[plan.seg_begin[k] : plan.seg_begin[k + 1]]
        assert torch.equal(tokens, (keys == k).nonzero().squeeze(1))
    assert int(plan.seg_begin[0]) == 0 and int(plan.seg_begin[E + 1]) == 500


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

FORWARD_CASES = [
    # dtype, path, T, in, out, r, E, pattern, x layout (ld extra, base), add
    (torch.bfloat16, "segment", 150, 333, 257, 16, 5, "blocks", (0, 0), False),
    (torch.float16, "segment", 90, 4097, 70, 64, 3, "zipf", (0, 0), True),
    (torch.bfloat16, "segment", 70, 64, 96, 256, 4, "mixed_none", (13, 5), False),
    (torch.float16, "segment", 64, 1, 7, 3, 2, "mixed_none", (0, 0), True),
    (torch.bfloat16, "segment", 33, 7, 1, 1, 1, "same", (0, 0), False),
    (torch.float32, "segment", 150, 333, 257, 16, 5, "blocks", (0, 0), True),
    (torch.float32, "segment", 70, 129, 65, 67, 4, "mixed_none", (3, 1), False),
    (torch.float64, "segment", 80, 33, 130, 7, 6, "zipf", (0, 0), False),
    (torch.float64, "segment", 40, 2, 3, 1, 3, "mixed_none", (1, 1), True),
    # Row strides padded to 16 bytes: 16-byte loads with a partial last vector (the tails).
    (torch.bfloat16, "segment", 100, 333, 65, 16, 3, "zipf", (3, 0), False),
    (torch.float16, "segment", 64, 7, 33, 3, 2, "mixed_none", (1, 0), True),
    (torch.float32, "segment", 70, 129, 65, 67, 4, "mixed_none", (3, 0), True),
    (torch.float64, "segment", 50, 33, 20, 5, 2, "blocks", (1, 0), False),
    (torch.bfloat16, "gather", 37, 333, 257, 16, 8, "distinct", (0, 0), False),
    (torch.float16, "gather", 30, 4097, 130, 16, 6, "mixed_none", (0, 0), True),
    (torch.bfloat16, "gather", 9, 64, 300, 256, 3, "zipf", (0, 0), False),
    (torch.float16, "gather", 12, 1, 7, 3, 4, "mixed_none", (0, 0), False),
    (torch.bfloat16, "gather", 11, 7, 1, 1, 2, "same", (13, 5), True),
    (torch.bfloat16, "gather", 1, 512, 129, 24, 1, "same", (0, 0), False),
    (torch.float32, "gather", 37, 1030, 257, 16, 8, "distinct", (0, 0), True),
    (torch.float32, "gather", 20, 129, 65, 67, 5, "mixed_none", (0, 0), False),
    (torch.float32, "gather", 50, 96, 40, 16, 3, "blocks", (0, 0), True),
    (torch.float64, "gather", 21, 555, 33, 6, 7, "zipf", (2, 1), False),
    (torch.float64, "gather", 8, 3, 260, 2, 3, "mixed_none", (0, 0), True),
    (torch.bfloat16, "auto", 6, 96, 40, 16, 1024, "distinct", (0, 0), False),
    (torch.bfloat16, "auto", 200, 96, 40, 16, 2, "blocks", (0, 0), True),
]


def _case_id(case):
    dtype, path, T, n_in, n_out, r, E, pattern, layout, add = case
    return f"{str(dtype)[6:]}-{path}-T{T}-in{n_in}-out{n_out}-r{r}-E{E}-{pattern}-ld{layout[0]}b{layout[1]}-{'add' if add else 'out'}"


def make_case(gen, dtype, T, n_in, n_out, r, E, pattern):
    ids = PATTERNS[pattern](T, E, gen)
    x = randn((T, n_in), gen, dtype)
    a = randn((E, r, n_in), gen, dtype) * (1.0 / n_in) ** 0.5
    b = randn((E, n_out, r), gen, dtype) * (1.0 / r) ** 0.5
    scales = 0.5 + 1.5 * torch.rand(E, generator=gen)
    return x, a, b, ids, scales


def assert_close_to_contract(got, expected, ref, dtype):
    assert not bool(got.isnan().any()), "NaN in the result: a read of memory nothing wrote"
    if dtype in (torch.float16, torch.bfloat16):
        share = (got == expected).double().mean().item() if got.numel() else 1.0
        assert share >= MIN_EXACT_SHARE, f"only {share:.1%} of elements equal the contract's rounding"
        ulp = torch.finfo(dtype).eps * max(1.0, float(ref.abs().max()) if ref.numel() else 0.0)
        worst = float((got.double() - expected.double()).abs().max()) if got.numel() else 0.0
        assert worst <= 2 * ulp, f"max |emulated - contract| {worst:.3e} > 2 ulp ({ulp:.3e})"
    else:
        bound = EPS_BOUND * torch.finfo(dtype).eps * max(1.0, float(ref.abs().max()) if ref.numel() else 0.0)
        worst = float((got.double() - expected.double()).abs().max()) if got.numel() else 0.0
        assert worst <= bound, f"max |emulated - contract| {worst:.3e} > {bound:.3e}"


@pytest.mark.parametrize("case", FORWARD_CASES, ids=_case_id)
def test_forward_matches_reference(case, gen):
    dtype, path, T, n_in, n_out, r, E, pattern, (ld_extra, base), add = case
    x, a, b, ids, scales = make_case(gen, dtype, T, n_in, n_out, r, E, pattern)
    T = ids.numel()
    y = randn((T, n_out), gen, dtype) if add else None
    result = emu.grouped_lora(x, a, b, ids, scales, y, path=path, x_ld=n_in + ld_extra, x_base=base, t=TILING)
    if path != "auto":
        assert result.path == path
    none = ids == -1
    expected = grouped_lora_rounded(x, a, b, ids, scales, y=y)
    ref = grouped_lora_ref(x, a, b, ids, scales) + (y.double() if add else 0)
    assert_close_to_contract(result.result, expected, ref, dtype)
    if add:
        assert bool((result.writes[~none] == 1).all()), "an output element written other than once"
        assert bool((result.writes[none] == 0).all()), "a row without expert was written"
        assert torch.equal(result.result[none], y[none])
    else:
        assert bool((result.writes == 1).all()), "an output element written other than once"
        assert bool((result.result[none] == 0).all())


@pytest.mark.parametrize("path", ["gather", "segment"])
@pytest.mark.parametrize("add", [False, True], ids=["out", "add"])
def test_all_rows_without_expert(path, add, gen):
    x, a, b, _, scales = make_case(gen, torch.bfloat16, 20, 33, 70, 16, 3, "same")
    ids = torch.full((20,), -1)
    y = randn((20, 70), gen, torch.bfloat16) if add else None
    result = emu.grouped_lora(x, a, b, ids, scales, y, path=path, t=TILING)
    if add:
        assert torch.equal(result.result, y) and int(result.writes.sum()) == 0
    else:
        assert bool((result.result == 0).all()) and bool((result.writes == 1).all())


@pytest.mark.parametrize("path", ["gather", "segment"])
def test_ids_out_of_range_are_rows_without_expert(path, gen):
    """Inside a CUDA graph the host range check is skipped; the kernels must treat such ids as
    -1 rather than index out of bounds."""
    x, a, b, ids, scales = make_case(gen, torch.float32, 30, 40, 50, 8, 4, "distinct")
    bad = ids.clone()
    bad[::3] = 7
    bad[1::5] = -5
    result = emu.grouped_lora(x, a, b, bad, scales, path=path, t=TILING)
    as_none = torch.where((bad >= 0) & (bad < 4), bad, -1)
    expected = grouped_lora_rounded(x, a, b, as_none, scales)
    assert_close_to_contract(result.result, expected, grouped_lora_ref(x, a, b, as_none, scales), torch.float32)


def test_vector_load_eligibility():
    """16-byte loads need aligned rows: a row stride that is a multiple of the vector width and
    an aligned start. The forward cases above take both load paths (row strides 333 and 336)."""
    t, bf16 = TILING, torch.bfloat16
    assert emu.vec_elems(t, bf16) == 8 and emu.vec_elems(t, torch.float64) == 2
    aligned = emu.Ptr(emu.Buffer(torch.zeros(64, dtype=bf16)))
    assert aligned.aligned(4096, bf16, t) and aligned.aligned(336, bf16, t)
    assert not aligned.aligned(333, bf16, t)
    assert not emu.Ptr(aligned.buf, 5).aligned(4096, bf16, t)


def test_dispatch_heuristic():
    t = TILING
    assert not emu.use_segment_path(t, 32, 32, 16)  # decode: one token per expert
    assert emu.use_segment_path(t, 4096, 8, 16)  # prefill
    assert emu.use_segment_path(t, 4, 4, t.kGatherMaxRank + 1)  # beyond the gather kernel's ranks
    assert not emu.use_segment_path(t, 4, 1, 16, path="gather")


# ---------------------------------------------------------------------------------------------
# Weight gradients
# ---------------------------------------------------------------------------------------------

GRAD_CASES = [
    # dtype, T, in, out, r, E, pattern, forced splits (dA, dB) or None, x row-stride padding
    (torch.bfloat16, 150, 70, 33, 16, 3, "blocks", None, 0),
    (torch.bfloat16, 100, 333, 40, 8, 2, "zipf", (2, 1), 3),
    (torch.float16, 90, 33, 130, 3, 4, "mixed_none", (3, 2), 0),
    (torch.float32, 120, 65, 7, 5, 3, "zipf", None, 3),
    (torch.float32, 100, 9, 70, 67, 2, "mixed_none", (4, 3), 0),
    (torch.float64, 60, 5, 3, 2, 5, "mixed_none", (2, 1), 1),
    (torch.float64, 40, 1, 1, 1, 3, "distinct", None, 0),
]


@pytest.mark.parametrize(
    "case",
    GRAD_CASES,
    ids=lambda c: f"{str(c[0])[6:]}-T{c[1]}-in{c[2]}-out{c[3]}-r{c[4]}-E{c[5]}-{c[6]}-{c[7]}-ld{c[8]}",
)
def test_weight_grads_match_reference(case, gen):
    dtype, T, n_in, n_out, r, E, pattern, splits, ld_extra = case
    x, a, b, ids, scales = make_case(gen, dtype, T, n_in, n_out, r, E, pattern)
    grad = randn((ids.numel(), n_out), gen, dtype)
    result = emu.weight_grads(grad, x, a, b, ids, scales, t=TILING, splits=splits, x_ld=n_in + ld_extra)
    assert bool((result.writes_a == 1).all()) and bool((result.writes_b == 1).all()), (
        "a gradient element written other than once"
    )
    # float64 reference gradients, and the kernels' own rounding of U = g B and V = x A^T.
    leaves = [t.double().requires_grad_(True) for t in (x, a, b)]
    (grouped_lora_ref(*leaves, ids, scales) * grad.double()).sum().backward()
    for name, got, ref_grad in (("dA", result.grad_a, leaves[1].grad), ("dB", result.grad_b, leaves[2].grad)):
        assert not bool(got.isnan().any()), f"{name}: NaN"
        # Low precision: U / V are rounded to the dtype before the reduction, so allow the
        # same-dtype error scale: a few ulps of the largest entry times sqrt(tokens).
        eps = torch.finfo(dtype).eps
        scale = max(1.0, float(ref_grad.abs().max()))
        bound = (EPS_BOUND if dtype in (torch.float32, torch.float64) else 4 * ids.numel() ** 0.5) * eps * scale
        worst = float((got.double() - ref_grad).abs().max())
        assert worst <= bound, f"{name} ({dtype}): max error {worst:.3e} > {bound:.3e}"


@pytest.mark.parametrize("splits", [(2, 3), (3, 2), (5, 1)], ids=str)
def test_weight_grad_split_boundaries(splits, gen):
    """Segments of 65 and 97 tokens: the split slices (rounded up to whole BK tiles) must still
    cover every token, however the division falls."""
    ids = torch.tensor([0] * 65 + [1] * 97 + [-1] * 5)[torch.randperm(167, generator=gen)]
    x = randn((167, 40), gen, torch.float64)
    a = randn((3, 4, 40), gen, torch.float64)
    b = randn((3, 24, 4), gen, torch.float64)
    scales = 0.5 + torch.rand(3, generator=gen)
    grad = randn((167, 24), gen, torch.float64)
    result = emu.weight_grads(grad, x, a, b, ids, scales, t=TILING, splits=splits)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
    (grouped_lora_ref(*leaves, ids, scales) * grad).sum().backward()
    torch.testing.assert_close(result.grad_a, leaves[1].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.grad_b, leaves[2].grad, rtol=1e-12, atol=1e-12)


def test_weight_grad_splits_bounded():
    t = TILING
    assert emu.weight_grad_splits(t, torch.float32, 100, 4, 16, 64) == 1
    many = emu.weight_grad_splits(t, torch.bfloat16, 65536, 2, 16, 64)
    assert 1 < many <= t.kGradMaxSplits
    # The workspace stays under its cap.
    s = emu.weight_grad_splits(t, torch.float32, 1 << 20, 2, 256, 8192)
    assert s * 2 * 256 * 8192 * 4 <= max(t.kGradMaxWorkspaceBytes, 2 * 256 * 8192 * 4)
