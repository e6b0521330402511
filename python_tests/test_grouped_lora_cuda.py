"""The CUDA kernels of torch.ops.moa.grouped_lora / grouped_lora_add_ / _grouped_lora_weight_grads
(csrc/kernels/cuda, csrc/ops/grouped_lora_cuda.cpp) against the float64 reference.

Dimensions: T tokens, in input features, out output features, E experts, r rank.
Shapes: x [T, in], lora_a [E, r, in], lora_b [E, out, r], expert_ids [T], scales [E], y [T, out].

Skipped without a CUDA device, or on a build without the CUDA kernels. Every case runs through
both kernels, forced with MOA_ENGINE_CUDA_PATH=gather|segment, and through the automatic choice:
the same parametrisation as the CPU tests (test_grouped_lora.py), plus the sizes and ranks the
CUDA tiling makes awkward (1, 7, 333, 4097; ranks 1, 3, 16, 64, 256). Then autograd, opcheck,
and CUDA-graph capture and replay. The tiling itself is also checked without a GPU, by
test_cuda_emulation.py.
"""

import pytest
import torch
from conftest import PATTERNS, assert_matches_reference, assert_within_bound, case_id, make_inputs, pairwise, randn
from reference import grouped_lora_ref, grouped_lora_rounded, grouped_lora_torch
from test_grouped_lora import (
    EXTRA_DTYPE_CASES,
    GRADCHECK_CASES,
    MAIN_CASES,
    MIN_EXACT_SHARE,
    OPCHECK_SHAPES,
    assert_grads_match_reference,
    grads_of,
    opcheck_inputs,
    poisoned_y,
)

import moa_engine

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not moa_engine.built_with_cuda(),
        reason="moa_engine was built without its CUDA kernels (MOA_ENGINE_CUDA=1 to build them)",
    ),
]

OPS = torch.ops.moa
DEVICE = "cuda"
PATHS = ["auto", "gather", "segment"]
LOW_PRECISION = [torch.float16, torch.bfloat16, torch.float32]

CUDA_CASES = pairwise(
    dict(
        in_features=[1, 7, 333, 4097],
        out_features=[1, 7, 333, 4097],
        rank=[1, 3, 16, 64, 256],
        experts=[1, 7, 64],
        pattern=list(PATTERNS),
        dtype=LOW_PRECISION,
        x_layout=["contiguous", "slice", "transpose"],
    )
)


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """The kernel every call of the test takes (auto: the dispatch heuristic)."""
    monkeypatch.setenv("MOA_ENGINE_CUDA_PATH", request.param)
    return request.param


def relayout(t, layout, gen):
    """The same values as t (on the device) in a non-contiguous view: last two dims transposed
    in memory, a slice of a wider last dim, or every other entry of the first dim."""
    if layout == "contiguous":
        return t
    if layout == "transpose":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "slice":
        big = randn((*t.shape[:-1], t.shape[-1] + 13), gen, t.dtype).to(t.device)
        big[..., 5 : 5 + t.shape[-1]] = t
        return big[..., 5 : 5 + t.shape[-1]]
    if layout == "expert_stride":
        big = randn((2 * t.shape[0], *t.shape[1:]), gen, t.dtype).to(t.device)
        big[::2] = t
        return big[::2]
    raise ValueError(layout)


def cuda_inputs(gen, x_layout="contiguous", **kwargs):
    """make_inputs on the device, with x laid out there (moving a strided CPU view would make
    it contiguous)."""
    inputs = make_inputs(gen, **kwargs).to(DEVICE)
    inputs.x = relayout(inputs.x, x_layout, gen)
    return inputs


def test_cuda_kernels_registered():
    for op in ("grouped_lora", "grouped_lora_add_", "_grouped_lora_weight_grads"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moa::{op}", "CUDA"), op


# ---------------------------------------------------------------------------------------------
# Forward against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", MAIN_CASES + EXTRA_DTYPE_CASES + CUDA_CASES, ids=case_id)
def test_matches_reference(case, path, gen):
    inputs = cuda_inputs(gen, **case)
    originals = [t.clone() for t in inputs.args()]
    assert_matches_reference(OPS.grouped_lora(*inputs.args()), inputs)
    y = poisoned_y(inputs, gen)
    y_before = y.clone()
    assert OPS.grouped_lora_add_(y, *inputs.args()) is None
    assert_matches_reference(y, inputs, y_before=y_before)
    for before, after in zip(originals, inputs.args()):
        assert torch.equal(before, after), "an input was modified"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("pattern", ["same", "zipf", "blocks", "mixed_none", "all_paths"])
def test_ops_agree_and_are_deterministic(pattern, dtype, path, gen):
    """grouped_lora == grouped_lora_add_ into zeros, bit for bit, and repeated calls give the
    same bits (no atomics: fixed summation orders)."""
    inputs = cuda_inputs(gen, in_features=576, out_features=111, rank=16, experts=7, pattern=pattern, dtype=dtype)
    out = OPS.grouped_lora(*inputs.args())
    y = torch.zeros_like(out)
    OPS.grouped_lora_add_(y, *inputs.args())
    assert torch.equal(out, y)
    assert torch.equal(out, OPS.grouped_lora(*inputs.args()))
    assert torch.equal(out, OPS.grouped_lora(*inputs.with_ids_dtype(torch.int32).args()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("pattern", ["same", "distinct", "zipf", "blocks", "mixed_none", "all_paths"])
def test_rounding_contract(pattern, dtype, path, gen):
    inputs = cuda_inputs(gen, in_features=576, out_features=111, rank=16, experts=7, pattern=pattern, dtype=dtype)
    for add in (False, True):
        if add:
            y = poisoned_y(inputs, gen)
            expected = grouped_lora_rounded(*inputs.args(), y=y)
            OPS.grouped_lora_add_(y, *inputs.args())
            out = y
        else:
            expected = grouped_lora_rounded(*inputs.args())
            out = OPS.grouped_lora(*inputs.args())
        share = (out == expected).double().mean().item()
        assert share >= MIN_EXACT_SHARE[dtype], f"only {share:.1%} of elements follow the rounding contract"


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("in_features,out_features,rank", [(4096, 4096, 16), (8193, 333, 64), (333, 4097, 256)])
def test_decode_and_prefill_shapes(in_features, out_features, rank, dtype, path, gen):
    """Model-sized linears: decode (one token per expert, split-K over `in`) and prefill."""
    for pattern, tokens, experts in (("distinct", 32, 32), ("blocks", 600, 4), ("mixed_none", 100, 8)):
        inputs = cuda_inputs(
            gen,
            in_features=in_features,
            out_features=out_features,
            rank=rank,
            experts=experts,
            pattern=pattern,
            tokens=tokens,
            dtype=dtype,
        )
        assert_matches_reference(OPS.grouped_lora(*inputs.args()), inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("pattern", ["zipf", "all_paths"])
def test_heterogeneous_ranks_zero_padded(pattern, dtype, path, gen):
    """Experts of ranks [16, 1, 7, 16, 3] zero-padded to r=16 give the exact reference."""
    ranks = [16, 1, 7, 16, 3]
    inputs = cuda_inputs(gen, in_features=111, out_features=576, rank=16, experts=5, pattern=pattern, dtype=dtype)
    for e, rank in enumerate(ranks):
        inputs.lora_a[e, rank:] = 0
        inputs.lora_b[e, :, rank:] = 0
    assert_matches_reference(OPS.grouped_lora(*inputs.args()), inputs)


def test_all_rows_without_expert(path, gen):
    inputs = cuda_inputs(gen, in_features=111, out_features=37, rank=16, experts=7, pattern="same")
    inputs.expert_ids = torch.full_like(inputs.expert_ids, -1)
    assert torch.equal(OPS.grouped_lora(*inputs.args()), torch.zeros(inputs.x.shape[0], 37, device=DEVICE))
    y = poisoned_y(inputs, gen)
    y_before = y.clone()
    OPS.grouped_lora_add_(y, *inputs.args())
    assert torch.equal(y, y_before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_empty_and_degenerate(dtype, path, gen):
    for kwargs in (dict(pattern="empty"), dict(pattern="same", experts=1)):
        inputs = cuda_inputs(gen, in_features=111, out_features=37, rank=16, dtype=dtype, **{"experts": 7, **kwargs})
        out = OPS.grouped_lora(*inputs.args())
        assert out.shape == (inputs.x.shape[0], 37) and out.is_cuda
        assert_matches_reference(out, inputs)
    # in = 0 or r = 0: a zero update; E = 0 with every row -1.
    for T, in_features, rank, experts in ((20, 0, 4, 3), (20, 5, 0, 3), (6, 5, 4, 0)):
        x = torch.randn(T, in_features, device=DEVICE).to(dtype)
        a = torch.randn(experts, rank, in_features, device=DEVICE).to(dtype)
        b = torch.randn(experts, 9, rank, device=DEVICE).to(dtype)
        ids = torch.randint(0, max(experts, 1), (T,), device=DEVICE) if experts else torch.full((T,), -1, device=DEVICE)
        scales = torch.ones(experts, device=DEVICE)
        assert torch.equal(OPS.grouped_lora(x, a, b, ids, scales), torch.zeros(T, 9, dtype=dtype, device=DEVICE))
        y = torch.randn(T, 9, device=DEVICE).to(dtype)
        y_before = y.clone()
        OPS.grouped_lora_add_(y, x, a, b, ids, scales)
        assert torch.equal(y, y_before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("pattern", ["mixed_none", "zipf", "distinct"])
def test_many_experts(pattern, dtype, path, gen):
    inputs = cuda_inputs(
        gen, in_features=111, out_features=576, rank=16, experts=1024, pattern=pattern, tokens=300, dtype=dtype
    )
    assert_matches_reference(OPS.grouped_lora(*inputs.args()), inputs)


def test_matches_cpu_op(path, gen):
    """The CUDA kernels and the CPU kernels agree within the tolerance table."""
    inputs = make_inputs(
        gen, in_features=576, out_features=333, rank=16, experts=7, pattern="all_paths", dtype=torch.bfloat16
    )
    cpu = OPS.grouped_lora(*inputs.args())
    cuda = OPS.grouped_lora(*inputs.to(DEVICE).args()).cpu()
    ref = grouped_lora_ref(*inputs.args())
    assert_within_bound("cuda vs reference", cuda, ref, grouped_lora_torch(*inputs.args()), torch.bfloat16)
    assert_within_bound("cpu vs reference", cpu, ref, grouped_lora_torch(*inputs.args()), torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["transpose", "slice", "expert_stride"])
def test_non_contiguous_weights(layout, dtype, path, gen):
    inputs = cuda_inputs(gen, in_features=111, out_features=576, rank=16, experts=7, pattern="all_paths", dtype=dtype)
    inputs.lora_a = relayout(inputs.lora_a, layout, gen)
    inputs.lora_b = relayout(inputs.lora_b, layout, gen)
    assert not inputs.lora_a.is_contiguous() and not inputs.lora_b.is_contiguous()
    assert_matches_reference(OPS.grouped_lora(*inputs.args()), inputs)
    grad_out = randn((inputs.x.shape[0], 576), gen, dtype).to(DEVICE)
    assert_grads_match_reference(grads_of(OPS.grouped_lora, inputs, grad_out, dtype), inputs, grad_out, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["offset_by_one", "expand", "row_step"])
def test_more_x_layouts(layout, dtype, path, gen):
    """x starting one element past an aligned address (no 16-byte loads), a zero row stride,
    and every other row of a taller tensor."""
    inputs = cuda_inputs(gen, in_features=576, out_features=111, rank=16, experts=7, pattern="all_paths", dtype=dtype)
    T = inputs.x.shape[0]
    if layout == "offset_by_one":
        storage = randn((T * 576 + 1,), gen, dtype).to(DEVICE)
        x = storage[1:].view(T, 576)
        x.copy_(inputs.x)
    elif layout == "expand":
        x = inputs.x[:1].expand(T, 576)
    else:
        big = randn((2 * T, 576), gen, dtype).to(DEVICE)
        big[::2] = inputs.x
        x = big[::2]
    inputs.x = x
    assert_matches_reference(OPS.grouped_lora(*inputs.args()), inputs)


@pytest.mark.parametrize("layout", ["column_slice", "transpose", "row_step"])
def test_add_into_non_contiguous_y(layout, path, gen):
    inputs = cuda_inputs(
        gen, in_features=111, out_features=576, rank=16, experts=7, pattern="all_paths", dtype=torch.bfloat16
    )
    T, out_features = inputs.x.shape[0], inputs.out_features
    if layout == "column_slice":
        big = randn((T, out_features + 9), gen, torch.bfloat16).to(DEVICE)
        y = big[:, 4 : 4 + out_features]
    elif layout == "transpose":
        big = randn((out_features, T), gen, torch.bfloat16).to(DEVICE)
        y = big.t()
    else:
        big = randn((2 * T, out_features), gen, torch.bfloat16).to(DEVICE)
        y = big[::2]
    big_before = big.clone()
    y_before = y.clone()
    OPS.grouped_lora_add_(y, *inputs.args())
    assert_matches_reference(y, inputs, y_before=y_before)
    outside = torch.ones_like(big, dtype=torch.bool)
    if layout == "column_slice":
        outside[:, 4 : 4 + out_features] = False
    elif layout == "transpose":
        outside[:] = False
    else:
        outside[::2] = False
    assert torch.equal(big[outside], big_before[outside])


# ---------------------------------------------------------------------------------------------
# Autograd (the backward: the forward kernels on transposed weights, and the segment kernel's
# weight gradients)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("pattern", ["same", "zipf", "blocks", "mixed_none", "all_paths"])
def test_grads_match_reference(pattern, dtype, path, gen):
    inputs = cuda_inputs(gen, in_features=576, out_features=111, rank=16, experts=7, pattern=pattern, dtype=dtype)
    grad_out = randn((inputs.x.shape[0], 111), gen, dtype).to(DEVICE)
    grads = grads_of(OPS.grouped_lora, inputs, grad_out, dtype)
    assert_grads_match_reference(grads, inputs, grad_out, dtype)
    assert torch.all(grads[0][inputs.expert_ids == -1] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("tokens,experts", [(4096, 2), (3000, 3), (64, 64)])
def test_weight_grads_split_over_tokens(tokens, experts, dtype, gen):
    """Many tokens per expert: the weight gradients split each expert's tokens and reduce the
    partial sums in a second kernel (tiling.h kGradTokensPerSplit); deterministic."""
    inputs = cuda_inputs(
        gen, in_features=333, out_features=129, rank=16, experts=experts, pattern="zipf", tokens=tokens, dtype=dtype
    )
    grad_out = randn((tokens, 129), gen, dtype).to(DEVICE)
    grad_a, grad_b = OPS._grouped_lora_weight_grads(grad_out, *inputs.args())
    ref = grads_of(grouped_lora_ref, inputs, grad_out.double(), torch.float64)
    same_dtype = grads_of(grouped_lora_torch, inputs, grad_out, dtype)
    assert_within_bound("grad lora_a", grad_a, ref[1], same_dtype[1], dtype)
    assert_within_bound("grad lora_b", grad_b, ref[2], same_dtype[2], dtype)
    again = OPS._grouped_lora_weight_grads(grad_out, *inputs.args())
    assert torch.equal(again[0], grad_a) and torch.equal(again[1], grad_b)


@pytest.mark.parametrize("in_features,out_features,rank,experts,pattern,tokens,x_layout", GRADCHECK_CASES)
def test_gradcheck(in_features, out_features, rank, experts, pattern, tokens, x_layout, path, gen):
    inputs = cuda_inputs(
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


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", OPCHECK_SHAPES, ids=str)
def test_opcheck(shape, dtype, path, gen):
    inputs = opcheck_inputs(gen, shape, dtype=dtype, device=DEVICE)
    y = poisoned_y(inputs, gen)
    torch.library.opcheck(OPS.grouped_lora_add_.default, (y, *inputs.args()))
    grad_out = randn((inputs.x.shape[0], inputs.out_features), gen, dtype).to(DEVICE)
    torch.library.opcheck(OPS._grouped_lora_weight_grads.default, (grad_out, *inputs.args()))
    for t in (inputs.x, inputs.lora_a, inputs.lora_b):
        t.requires_grad_(True)
    torch.library.opcheck(OPS.grouped_lora.default, inputs.args())


# ---------------------------------------------------------------------------------------------
# CUDA graphs: the plan is built on the device, so a captured call replays with new expert_ids
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "tokens,experts,rank", [(32, 32, 16), (8, 3, 64), (512, 4, 16)], ids=["decode", "few", "prefill"]
)
def test_cuda_graph_capture_and_replay(tokens, experts, rank, dtype, path, gen):
    in_features, out_features = 1024, 333
    static = cuda_inputs(
        gen,
        in_features=in_features,
        out_features=out_features,
        rank=rank,
        experts=experts,
        pattern="mixed_none",
        tokens=tokens,
        dtype=dtype,
    )
    static_y = randn((tokens, out_features), gen, dtype).to(DEVICE)
    y_start = torch.empty_like(static_y)

    def step():
        static_y.copy_(y_start)
        OPS.grouped_lora_add_(static_y, *static.args())
        return OPS.grouped_lora(*static.args())

    side = torch.cuda.Stream()  # warm up off the default stream, as torch.cuda.graphs advises
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    for replay in range(3):
        fresh = cuda_inputs(
            gen,
            in_features=in_features,
            out_features=out_features,
            rank=rank,
            experts=experts,
            pattern=["mixed_none", "zipf", "distinct"][replay],
            tokens=tokens,
            dtype=dtype,
        )
        static.x.copy_(fresh.x)
        static.expert_ids.copy_(fresh.expert_ids)  # new routing, same graph
        y_start.copy_(randn((tokens, out_features), gen, dtype))
        graph.replay()
        torch.cuda.synchronize()
        expected_inputs = fresh
        expected_inputs.lora_a, expected_inputs.lora_b, expected_inputs.scales = (
            static.lora_a,
            static.lora_b,
            static.scales,
        )
        assert_matches_reference(static_out.clone(), expected_inputs)
        assert_matches_reference(static_y.clone(), expected_inputs, y_before=y_start.clone())
        assert torch.equal(static_out, OPS.grouped_lora(*static.args())), "replay and eager differ"


def test_cuda_graph_bad_ids_are_rows_without_expert(path, gen):
    """Inside a graph the host-side range check cannot run; ids outside [0, E) then act as -1
    instead of reading out of bounds. Outside a graph they raise."""
    inputs = cuda_inputs(gen, in_features=256, out_features=64, rank=16, experts=4, pattern="distinct", tokens=16)
    bad = inputs.expert_ids.clone()
    bad[::3] = 9
    with pytest.raises(IndexError):
        OPS.grouped_lora(inputs.x, inputs.lora_a, inputs.lora_b, bad, inputs.scales)
    ids = inputs.expert_ids.clone()
    OPS.grouped_lora(inputs.x, inputs.lora_a, inputs.lora_b, ids, inputs.scales)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OPS.grouped_lora(inputs.x, inputs.lora_a, inputs.lora_b, ids, inputs.scales)
    ids.copy_(bad)
    graph.replay()
    torch.cuda.synchronize()
    as_none = torch.where((bad >= 0) & (bad < 4), bad, torch.full_like(bad, -1))
    expected = inputs
    expected.expert_ids = as_none
    assert_matches_reference(out.clone(), expected)
