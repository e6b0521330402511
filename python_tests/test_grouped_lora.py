"""Correctness of torch.ops.moa.grouped_lora and grouped_lora_add_ against the float64 reference.

Dimensions: T tokens, in input features, out output features, E experts, r rank.
Shapes: x [T, in], lora_a [E, r, in], lora_b [E, out, r], expert_ids [T], scales [E], y [T, out].

Sizes and patterns are covered pairwise (conftest.pairwise), not as a full cross product. The
patterns drive the three CPU paths: runs of >= 16 same-expert tokens (blocks, same), >= 16
scattered tokens of one expert (zipf, all_paths) and fewer scattered tokens (distinct, mixed_none).
"""

import pytest
import torch
from conftest import (
    DEVICES,
    TOKENS,
    assert_matches_reference,
    assert_within_bound,
    case_id,
    make_inputs,
    pairwise,
    randn,
)
from reference import grouped_lora_ref, grouped_lora_rounded, grouped_lora_torch

import moa_engine

OPS = torch.ops.moa
SIZES = [1, 111, 576, 2049]
PATTERN_NAMES = ["same", "distinct", "zipf", "blocks", "mixed_none", "empty"]
LOW_PRECISION = [torch.float32, torch.bfloat16]
ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

MAIN_CASES = pairwise(
    dict(
        in_features=SIZES,
        out_features=SIZES,
        rank=[1, 16, 128],
        experts=[1, 7, 64],
        pattern=PATTERN_NAMES + ["all_paths"],
        dtype=LOW_PRECISION,
        x_layout=["contiguous", "slice", "transpose"],
    )
)
# float64 and float16: a smaller covering set.
EXTRA_DTYPE_CASES = pairwise(
    dict(
        dtype=[torch.float64, torch.float16],
        pattern=PATTERN_NAMES + ["all_paths"],
        in_features=[1, 111, 2049],
        out_features=[111, 576],
        rank=[1, 16],
        experts=[7, 64],
        x_layout=["contiguous", "transpose"],
    )
)


def run_add(inputs, y):
    """grouped_lora_add_ on y; checks it returns None."""
    assert OPS.grouped_lora_add_(y, *inputs.args()) is None


def poisoned_y(inputs, gen):
    """A random, NaN-free y [T, out] to add into."""
    return randn((inputs.x.shape[0], inputs.out_features), gen, inputs.x.dtype).to(inputs.x.device)


# ---------------------------------------------------------------------------------------------
# Forward against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", MAIN_CASES + EXTRA_DTYPE_CASES, ids=case_id)
def test_matches_reference(case, gen):
    inputs = make_inputs(gen, **case)
    originals = [t.clone() for t in inputs.args()]
    out = OPS.grouped_lora(*inputs.args())
    assert_matches_reference(out, inputs)
    for before, after in zip(originals, inputs.args()):
        assert torch.equal(before, after), "grouped_lora modified an input"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("pattern", ["zipf", "blocks"])
def test_large(pattern, dtype, gen):
    inputs = make_inputs(
        gen, in_features=2049, out_features=2049, rank=128, experts=64, pattern=pattern, tokens=300, dtype=dtype
    )
    assert_matches_reference(OPS.grouped_lora(*inputs.args()), inputs)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERN_NAMES + ["all_paths"])
def test_add_into_poisoned_y(pattern, dtype, gen):
    inputs = make_inputs(gen, in_features=111, out_features=576, rank=16, experts=7, pattern=pattern, dtype=dtype)
    y = poisoned_y(inputs, gen)
    y_before = y.clone()
    run_add(inputs, y)
    assert_matches_reference(y, inputs, y_before=y_before)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["same", "zipf", "blocks", "mixed_none", "all_paths"])
def test_ops_agree_and_are_deterministic(pattern, dtype, gen):
    """grouped_lora == grouped_lora_add_ into zeros == the Python face, bit for bit, and
    repeated calls give the same bits."""
    inputs = make_inputs(gen, in_features=576, out_features=111, rank=16, experts=7, pattern=pattern, dtype=dtype)
    out = OPS.grouped_lora(*inputs.args())
    y = torch.zeros_like(out)
    run_add(inputs, y)
    assert torch.equal(out, y)
    assert torch.equal(out, moa_engine.ops.grouped_lora(*inputs.args()))
    assert torch.equal(out, OPS.grouped_lora(*inputs.args()))
    y_face = torch.zeros_like(out)
    moa_engine.ops.grouped_lora_add_(y_face, *inputs.args())
    assert torch.equal(out, y_face)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("pattern", ["same", "distinct", "zipf", "blocks", "mixed_none", "all_paths"])
def test_int32_and_int64_ids_agree(pattern, dtype, gen):
    inputs = make_inputs(gen, in_features=111, out_features=576, rank=16, experts=64, pattern=pattern, dtype=dtype)
    inputs32 = inputs.with_ids_dtype(torch.int32)
    assert torch.equal(OPS.grouped_lora(*inputs.args()), OPS.grouped_lora(*inputs32.args()))
    y64 = poisoned_y(inputs, gen)
    y32 = y64.clone()
    run_add(inputs, y64)
    run_add(inputs32, y32)
    assert torch.equal(y64, y32)


# The rounding contract: the rank-r intermediate is rounded to x's dtype, the rest accumulates
# in float32 and is rounded once. Accumulation order can flip a rounding now and then, so ask
# for a share of bit-exact elements: a second rounding, or an unrounded intermediate, drops it
# to about 75% or below.
MIN_EXACT_SHARE = {torch.bfloat16: 0.99, torch.float16: 0.95}


ROUNDING_CASES = [
    (op_name, pattern)
    for op_name in ["grouped_lora", "grouped_lora_add_"]
    for pattern in ["same", "distinct", "zipf", "blocks", "mixed_none", "all_paths"]
] + [("_grouped_lora_generic", "all_paths")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op_name,pattern", ROUNDING_CASES)
def test_rounding_contract(op_name, pattern, dtype, gen):
    inputs = make_inputs(gen, in_features=576, out_features=111, rank=16, experts=7, pattern=pattern, dtype=dtype)
    if op_name == "grouped_lora_add_":
        y = poisoned_y(inputs, gen)
        expected = grouped_lora_rounded(*inputs.args(), y=y)
        run_add(inputs, y)
        out = y
    else:
        expected = grouped_lora_rounded(*inputs.args())
        out = getattr(OPS, op_name)(*inputs.args())
    share = (out == expected).double().mean().item()
    assert share >= MIN_EXACT_SHARE[dtype], (
        f"only {share:.1%} of elements equal the contract's rounding (intermediate rounded to "
        f"{dtype}, result rounded once); expected >= {MIN_EXACT_SHARE[dtype]:.0%}"
    )


# ---------------------------------------------------------------------------------------------
# Layouts, extremes
# ---------------------------------------------------------------------------------------------


def strided_copy(t, layout, gen):
    """The same values as t in a non-contiguous view: last two dims transposed in memory,
    a slice of a wider last dim, or every other expert of a tensor twice as long."""
    if layout == "transpose":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "slice":
        big = randn((*t.shape[:-1], t.shape[-1] + 9), gen, t.dtype)
        big[..., 4 : 4 + t.shape[-1]] = t
        return big[..., 4 : 4 + t.shape[-1]]
    if layout == "expert_stride":
        big = randn((2 * t.shape[0], *t.shape[1:]), gen, t.dtype)
        big[::2] = t
        return big[::2]
    raise ValueError(layout)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layout", ["transpose", "slice", "expert_stride"])
def test_non_contiguous_weights(layout, dtype, gen):
    inputs = make_inputs(gen, in_features=111, out_features=576, rank=16, experts=7, pattern="all_paths", dtype=dtype)
    inputs.lora_a = strided_copy(inputs.lora_a, layout, gen)
    inputs.lora_b = strided_copy(inputs.lora_b, layout, gen)
    assert not inputs.lora_a.is_contiguous() and not inputs.lora_b.is_contiguous()
    assert_matches_reference(OPS.grouped_lora(*inputs.args()), inputs)
    y = poisoned_y(inputs, gen)
    y_before = y.clone()
    run_add(inputs, y)
    assert_matches_reference(y, inputs, y_before=y_before)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=str)
def test_non_contiguous_ids_and_scales(ids_dtype, gen):
    inputs = make_inputs(
        gen, in_features=111, out_features=576, rank=16, experts=7, pattern="all_paths", ids_dtype=ids_dtype
    )
    ids_storage = torch.randint(0, 7, (2 * inputs.x.shape[0],), generator=gen, dtype=ids_dtype)
    ids_storage[::2] = inputs.expert_ids
    scales_storage = torch.rand(14, generator=gen)
    scales_storage[1::2] = inputs.scales
    inputs.expert_ids, inputs.scales = ids_storage[::2], scales_storage[1::2]
    assert_matches_reference(OPS.grouped_lora(*inputs.args()), inputs)
    y = poisoned_y(inputs, gen)
    y_before = y.clone()
    run_add(inputs, y)
    assert_matches_reference(y, inputs, y_before=y_before)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layout", ["expand", "row_step"])
def test_more_x_layouts(layout, dtype, gen):
    """x with a zero row stride (one row broadcast) or every other row of a taller tensor."""
    inputs = make_inputs(gen, in_features=111, out_features=576, rank=16, experts=7, pattern="all_paths", dtype=dtype)
    T, in_features = inputs.x.shape
    if layout == "expand":
        inputs.x = randn((1, in_features), gen, dtype).expand(T, in_features)
    else:
        inputs.x = randn((2 * T, in_features), gen, dtype)[::2]
    assert_matches_reference(OPS.grouped_lora(*inputs.args()), inputs)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layout", ["column_slice", "transpose", "row_step"])
def test_non_contiguous_y(layout, dtype, gen):
    inputs = make_inputs(gen, in_features=111, out_features=576, rank=16, experts=7, pattern="all_paths", dtype=dtype)
    T, out_features = inputs.x.shape[0], inputs.out_features
    if layout == "column_slice":
        big = randn((T, out_features + 9), gen, dtype)
        y = big[:, 4 : 4 + out_features]
    elif layout == "transpose":
        big = randn((out_features, T), gen, dtype)
        y = big.t()
    else:
        big = randn((2 * T, out_features), gen, dtype)
        y = big[::2]
    assert not y.is_contiguous()
    big_before = big.clone()
    y_before = y.clone()
    run_add(inputs, y)
    assert_matches_reference(y, inputs, y_before=y_before)
    # Nothing outside the view was touched.
    outside = torch.ones_like(big, dtype=torch.bool)
    if layout == "column_slice":
        outside[:, 4 : 4 + out_features] = False
    elif layout == "transpose":
        outside[:] = False
    else:
        outside[::2] = False
    assert torch.equal(big[outside], big_before[outside])


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("pattern", ["mixed_none", "zipf"])
def test_many_experts(pattern, dtype, gen):
    inputs = make_inputs(
        gen, in_features=111, out_features=576, rank=16, experts=1024, pattern=pattern, tokens=300, dtype=dtype
    )
    assert_matches_reference(OPS.grouped_lora(*inputs.args()), inputs)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_rank_256(dtype, gen):
    inputs = make_inputs(
        gen, in_features=576, out_features=111, rank=256, experts=5, pattern="all_paths", tokens=90, dtype=dtype
    )
    assert_matches_reference(OPS.grouped_lora(*inputs.args()), inputs)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_empty_batch(dtype, ids_dtype, gen):
    inputs = make_inputs(
        gen, in_features=111, out_features=37, rank=16, experts=7, pattern="empty", dtype=dtype, ids_dtype=ids_dtype
    )
    out = OPS.grouped_lora(*inputs.args())
    assert out.shape == (0, 37) and out.dtype == dtype
    y = torch.empty(0, 37, dtype=dtype)
    run_add(inputs, y)
    assert OPS._grouped_lora_generic(*inputs.args()).shape == (0, 37)
    # Backward through an empty batch: zero weight gradients of the right shapes.
    for t in (inputs.x, inputs.lora_a, inputs.lora_b):
        t.requires_grad_(True)
    out = OPS.grouped_lora(*inputs.args())
    assert out.requires_grad
    out.sum().backward()
    assert inputs.x.grad.shape == inputs.x.shape
    assert torch.equal(inputs.lora_a.grad, torch.zeros_like(inputs.lora_a))
    assert torch.equal(inputs.lora_b.grad, torch.zeros_like(inputs.lora_b))


def test_all_rows_without_expert(gen):
    inputs = make_inputs(gen, in_features=111, out_features=37, rank=16, experts=7, pattern="same", dtype=torch.float32)
    inputs.expert_ids = torch.full_like(inputs.expert_ids, -1)
    assert torch.equal(OPS.grouped_lora(*inputs.args()), torch.zeros(inputs.x.shape[0], 37))
    y = poisoned_y(inputs, gen)
    y_before = y.clone()
    run_add(inputs, y)
    assert torch.equal(y, y_before)


@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float64], ids=str)
@pytest.mark.parametrize("pattern", ["zipf", "all_paths"])
def test_heterogeneous_ranks_zero_padded(pattern, dtype, gen):
    """Experts of ranks [16, 1, 7, 16, 3] zero-padded to r=16 give what each expert gives
    alone at its true rank."""
    ranks = [16, 1, 7, 16, 3]
    E, r = len(ranks), max(ranks)
    inputs = make_inputs(gen, in_features=111, out_features=576, rank=r, experts=E, pattern=pattern, dtype=dtype)
    true_a = [inputs.lora_a[e, : ranks[e]].clone() for e in range(E)]  # [r_e, in]
    true_b = [inputs.lora_b[e, :, : ranks[e]].clone() for e in range(E)]  # [out, r_e]
    for e in range(E):
        inputs.lora_a[e, ranks[e] :] = 0
        inputs.lora_b[e, :, ranks[e] :] = 0
    padded = OPS.grouped_lora(*inputs.args())

    at_true_rank = torch.zeros_like(padded)
    for e in range(E):
        rows = (inputs.expert_ids == e).nonzero().squeeze(1)
        at_true_rank[rows] = OPS.grouped_lora(
            inputs.x[rows], true_a[e][None], true_b[e][None], torch.zeros_like(rows), inputs.scales[e : e + 1]
        )
    ref = grouped_lora_ref(*inputs.args())  # exact: the zero padding adds exact zeros
    same_dtype = grouped_lora_torch(*inputs.args())
    assert_within_bound("zero-padded", padded, ref, same_dtype, dtype)
    assert_within_bound("true rank", at_true_rank, ref, same_dtype, dtype)
    assert_within_bound("padded vs true rank", padded, at_true_rank.double(), same_dtype, dtype)


# ---------------------------------------------------------------------------------------------
# The device-generic implementation (what CUDA uses), on CPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", MAIN_CASES[::2] + EXTRA_DTYPE_CASES[::3], ids=case_id)
def test_generic_matches_reference(case, gen):
    inputs = make_inputs(gen, **case)
    # Small calls take the generic op's gather + bmm path, whose CPU bmm sums each token's
    # dot product sequentially: ordinary float32 summation error, but up to ~5x that of a
    # blocked mm. Hold float32 to 8x the same-dtype error there; other dtypes keep the table.
    factor = 8.0 if case["dtype"] == torch.float32 else None
    assert_matches_reference(OPS._grouped_lora_generic(*inputs.args()), inputs, factor=factor)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_generic_large_sorted_path(dtype, gen):
    """Big enough (T * r * (in + out) > 2**24) for the generic op's per-expert path."""
    inputs = make_inputs(
        gen, in_features=2049, out_features=576, rank=128, experts=7, pattern="zipf", tokens=200, dtype=dtype
    )
    assert_matches_reference(OPS._grouped_lora_generic(*inputs.args()), inputs)


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


def grads_of(fn, inputs, grad_out, dtype):
    """Gradients of sum(fn(x, a, b, ids, scales) * grad_out) in x, lora_a, lora_b, computed on
    leaf copies in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (inputs.x, inputs.lora_a, inputs.lora_b)]
    out = fn(*leaves, inputs.expert_ids, inputs.scales)
    if out.numel() == 0 and not out.requires_grad:
        # An empty batch through a reference builds no graph: the gradients are zero.
        return [torch.zeros_like(leaf) for leaf in leaves]
    (out * grad_out.to(out.dtype)).sum().backward()
    return [leaf.grad for leaf in leaves]


def assert_grads_match_reference(grads, inputs, grad_out, dtype):
    ref = grads_of(grouped_lora_ref, inputs, grad_out.double(), torch.float64)
    same_dtype = grads_of(grouped_lora_torch, inputs, grad_out, dtype)
    for name, got, r, s in zip(["grad x", "grad lora_a", "grad lora_b"], grads, ref, same_dtype):
        assert got is not None, f"{name} missing"
        assert got.dtype == dtype, f"{name} dtype {got.dtype}, expected {dtype}"
        assert_within_bound(name, got, r, s, dtype)


GRADCHECK_CASES = [
    # in, out, r, E, pattern, T, x_layout
    (5, 3, 2, 4, "all_paths", 56, "contiguous"),
    (1, 1, 1, 3, "all_paths", 52, "transpose"),
    (7, 2, 3, 6, "mixed_none", 30, "slice"),
    (3, 4, 2, 2, "blocks", 45, "contiguous"),
]


@pytest.mark.parametrize("in_features,out_features,rank,experts,pattern,tokens,x_layout", GRADCHECK_CASES)
def test_gradcheck(in_features, out_features, rank, experts, pattern, tokens, x_layout, gen):
    inputs = make_inputs(
        gen,
        in_features=in_features,
        out_features=out_features,
        rank=rank,
        experts=experts,
        pattern=pattern,
        tokens=tokens,
        dtype=torch.float64,
        x_layout=x_layout,
    )
    x, a, b = (t.requires_grad_(True) for t in (inputs.x, inputs.lora_a, inputs.lora_b))
    assert torch.autograd.gradcheck(
        lambda x, a, b: OPS.grouped_lora(x, a, b, inputs.expert_ids, inputs.scales), (x, a, b)
    )


@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float64], ids=str)
@pytest.mark.parametrize("pattern", ["same", "zipf", "blocks", "mixed_none", "all_paths"])
def test_grads_match_reference(pattern, dtype, gen):
    inputs = make_inputs(gen, in_features=576, out_features=111, rank=16, experts=7, pattern=pattern, dtype=dtype)
    grad_out = randn((inputs.x.shape[0], 111), gen, dtype)
    grads = grads_of(OPS.grouped_lora, inputs, grad_out, dtype)
    assert_grads_match_reference(grads, inputs, grad_out, dtype)
    none_rows = inputs.expert_ids == -1
    assert torch.all(grads[0][none_rows] == 0), "grad x must be zero on rows with expert id -1"


def test_no_grad_for_ids_and_scales(gen):
    inputs = make_inputs(gen, in_features=111, out_features=37, rank=16, experts=7, pattern="all_paths")
    inputs.x.requires_grad_(True)
    inputs.scales.requires_grad_(True)
    OPS.grouped_lora(*inputs.args()).sum().backward()
    assert inputs.x.grad is not None
    assert inputs.scales.grad is None


@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float64], ids=str)
@pytest.mark.parametrize("pattern", ["zipf", "blocks", "mixed_none", "all_paths", "empty"])
def test_weight_grads_op(pattern, dtype, gen):
    inputs = make_inputs(gen, in_features=111, out_features=576, rank=16, experts=7, pattern=pattern, dtype=dtype)
    grad_out = randn((inputs.x.shape[0], 576), gen, dtype)
    grad_a, grad_b = OPS._grouped_lora_weight_grads(grad_out, *inputs.args())
    assert grad_a.shape == inputs.lora_a.shape and grad_b.shape == inputs.lora_b.shape
    ref = grads_of(grouped_lora_ref, inputs, grad_out.double(), torch.float64)
    same_dtype = grads_of(grouped_lora_torch, inputs, grad_out, dtype)
    assert_within_bound("grad lora_a", grad_a, ref[1], same_dtype[1], dtype)
    assert_within_bound("grad lora_b", grad_b, ref[2], same_dtype[2], dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float64], ids=str)
@pytest.mark.parametrize("pattern", ["zipf", "blocks", "mixed_none", "all_paths", "distinct"])
def test_training_ops_keep_v_and_equal_the_unfused_ops(pattern, dtype, gen):
    """_grouped_lora_add_v_ adds what grouped_lora_add_ adds and keeps v = x A^T;
    _grouped_lora_backward_ gives grad_x += the transposed update and the weight gradients of
    _grouped_lora_weight_grads, bit for bit (the same kernels on the same plan), and the
    float64 reference's within its bound."""
    inputs = make_inputs(
        gen, in_features=111, out_features=203, rank=16, experts=7, pattern=pattern, dtype=dtype, x_layout="slice"
    )
    T = inputs.x.shape[0]
    y = poisoned_y(inputs, gen)
    y_ref = y.clone()
    v = torch.full((T, 16), float("nan"), dtype=dtype)
    assert OPS._grouped_lora_add_v_(y, v, *inputs.args()) is None
    OPS.grouped_lora_add_(y_ref, *inputs.args())
    assert torch.equal(y, y_ref)
    ids = inputs.expert_ids.long()
    rows = ids >= 0
    a_of_row = inputs.lora_a[ids.clamp_min(0)]  # [T, r, in]
    v_ref = torch.einsum("ti,tri->tr", inputs.x.double(), a_of_row.double())
    torch.testing.assert_close(v[rows].double(), v_ref[rows], rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-2)
    grad = randn((T, 203), gen, dtype)
    grad_x = randn((T, 111), gen, dtype)
    gx_ref = grad_x.clone()
    ga, gb = OPS._grouped_lora_backward_(
        grad_x, grad, inputs.x, v, inputs.lora_a, inputs.lora_b, inputs.expert_ids, inputs.scales
    )
    OPS.grouped_lora_add_(
        gx_ref, grad, inputs.lora_b.transpose(1, 2), inputs.lora_a.transpose(1, 2), inputs.expert_ids, inputs.scales
    )
    ra, rb = OPS._grouped_lora_weight_grads(grad, *inputs.args())
    assert torch.equal(grad_x, gx_ref) and torch.equal(ga, ra) and torch.equal(gb, rb)
    ref = grads_of(grouped_lora_ref, inputs, grad.double(), torch.float64)
    same_dtype = grads_of(grouped_lora_torch, inputs, grad, dtype)
    assert_within_bound("grad lora_a", ga, ref[1], same_dtype[1], dtype)
    assert_within_bound("grad lora_b", gb, ref[2], same_dtype[2], dtype)


def test_training_ops_reject_bad_v_and_grad_x(gen):
    inputs = make_inputs(gen, in_features=11, out_features=7, rank=4, experts=3, pattern="all_paths")
    T = inputs.x.shape[0]
    y = torch.zeros(T, 7)
    with pytest.raises(ValueError, match=r"expected v \[T, r\] with T=.*r=4"):
        OPS._grouped_lora_add_v_(y, torch.empty(T, 5), *inputs.args())
    with pytest.raises(TypeError, match="expected v to have the dtype of x"):
        OPS._grouped_lora_add_v_(y, torch.empty(T, 4, dtype=torch.float64), *inputs.args())
    with pytest.raises(ValueError, match="expected v contiguous"):
        OPS._grouped_lora_add_v_(y, torch.empty(4, T).t(), *inputs.args())
    with pytest.raises(ValueError, match="expected grad_x of x's shape"):
        OPS._grouped_lora_backward_(
            torch.empty(T, 12),
            y,
            inputs.x,
            torch.empty(T, 4),
            inputs.lora_a,
            inputs.lora_b,
            inputs.expert_ids,
            inputs.scales,
        )


def test_add_is_inference_only(gen):
    inputs = make_inputs(gen, in_features=111, out_features=37, rank=16, experts=7, pattern="all_paths")
    inputs.x.requires_grad_(True)
    inputs.lora_a.requires_grad_(True)
    y = torch.zeros(inputs.x.shape[0], 37)
    with pytest.raises(RuntimeError):
        OPS.grouped_lora_add_(y, *inputs.args())
        y.sum().backward()


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck and torch.compile
# ---------------------------------------------------------------------------------------------

OPCHECK_SHAPES = [
    # in, out, r, E, pattern, T
    (9, 6, 2, 5, "all_paths", 60),
    (13, 4, 3, 3, "mixed_none", 11),
]


OPCHECK_FIELDS = ("in_features", "out_features", "rank", "experts", "pattern", "tokens")


def opcheck_inputs(gen, shape, **kwargs):
    """make_inputs for one OPCHECK_SHAPES row."""
    return make_inputs(gen, **dict(zip(OPCHECK_FIELDS, shape)), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", OPCHECK_SHAPES, ids=str)
def test_opcheck_grouped_lora(shape, dtype, gen):
    inputs = opcheck_inputs(gen, shape, dtype=dtype)
    for t in (inputs.x, inputs.lora_a, inputs.lora_b):
        t.requires_grad_(True)
    torch.library.opcheck(OPS.grouped_lora.default, inputs.args())


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("shape", OPCHECK_SHAPES, ids=str)
def test_opcheck_grouped_lora_add_(shape, ids_dtype, gen):
    inputs = opcheck_inputs(gen, shape, ids_dtype=ids_dtype)
    y = poisoned_y(inputs, gen)
    torch.library.opcheck(OPS.grouped_lora_add_.default, (y, *inputs.args()))


@pytest.mark.parametrize("shape", OPCHECK_SHAPES[:1], ids=str)
def test_opcheck_private_ops(shape, gen):
    inputs = opcheck_inputs(gen, shape)
    torch.library.opcheck(OPS._grouped_lora_generic.default, inputs.args())
    grad_out = randn((inputs.x.shape[0], inputs.out_features), gen, torch.float32)
    torch.library.opcheck(OPS._grouped_lora_weight_grads.default, (grad_out, *inputs.args()))
    # opcheck runs each op on copies of its arguments, so add_v_ does not fill this v: backward_
    # reads it as given, and uninitialised memory (NaN bits at times) made the check flaky
    v = randn((inputs.x.shape[0], inputs.lora_a.shape[1]), gen, torch.float32)
    torch.library.opcheck(OPS._grouped_lora_add_v_.default, (poisoned_y(inputs, gen), v, *inputs.args()))
    grad_x = randn(tuple(inputs.x.shape), gen, torch.float32)
    torch.library.opcheck(
        OPS._grouped_lora_backward_.default,
        (grad_x, grad_out, inputs.x, v, inputs.lora_a, inputs.lora_b, inputs.expert_ids, inputs.scales),
    )


def test_torch_compile_fullgraph(gen):
    def lora_linear(x, lora_a, lora_b, expert_ids, scales):
        return torch.tanh(x[:, :37]) + moa_engine.ops.grouped_lora(x, lora_a, lora_b, expert_ids, scales)

    compiled = torch.compile(lora_linear, fullgraph=True)
    for tokens in (TOKENS["all_paths"], 80):
        other = make_inputs(
            gen, in_features=111, out_features=37, rank=16, experts=7, pattern="all_paths", tokens=tokens
        )
        torch.testing.assert_close(compiled(*other.args()), lora_linear(*other.args()))


# ---------------------------------------------------------------------------------------------
# Per device (CUDA cases skip without a GPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("pattern", PATTERN_NAMES + ["all_paths"])
def test_on_device(pattern, dtype, device, gen):
    inputs = make_inputs(
        gen, in_features=576, out_features=111, rank=16, experts=7, pattern=pattern, dtype=dtype, device=device
    )
    assert_matches_reference(OPS.grouped_lora(*inputs.args()), inputs)
    y = poisoned_y(inputs, gen)
    y_before = y.clone()
    run_add(inputs, y)
    assert_matches_reference(y, inputs, y_before=y_before)
    inputs32 = inputs.with_ids_dtype(torch.int32)
    assert torch.equal(OPS.grouped_lora(*inputs.args()), OPS.grouped_lora(*inputs32.args()))
    grad_out = randn((inputs.x.shape[0], 111), gen, dtype).to(device)
    grads = grads_of(OPS.grouped_lora, inputs, grad_out, dtype)
    assert_grads_match_reference(grads, inputs, grad_out, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_on_device(device, gen):
    inputs = make_inputs(
        gen, in_features=5, out_features=3, rank=2, experts=4, pattern="all_paths", dtype=torch.float64, device=device
    )
    x, a, b = (t.requires_grad_(True) for t in (inputs.x, inputs.lora_a, inputs.lora_b))
    assert torch.autograd.gradcheck(
        lambda x, a, b: OPS.grouped_lora(x, a, b, inputs.expert_ids, inputs.scales), (x, a, b)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_on_device(device, gen):
    inputs = make_inputs(
        gen, in_features=9, out_features=6, rank=2, experts=5, pattern="all_paths", tokens=60, device=device
    )
    y = poisoned_y(inputs, gen)
    torch.library.opcheck(OPS.grouped_lora_add_.default, (y, *inputs.args()))
    for t in (inputs.x, inputs.lora_a, inputs.lora_b):
        t.requires_grad_(True)
    torch.library.opcheck(OPS.grouped_lora.default, inputs.args())
