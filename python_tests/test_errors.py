"""Bad inputs raise (never crash) with a message naming the argument, what was expected and
what was given (the error-message rule in CONTRIBUTING.md).

Shape, dimension and device problems raise ValueError; dtype problems TypeError; expert ids
outside [-1, E) IndexError.

Base case: T=5, in=576, out=37, r=16, E=8, float32.
"""

import re

import pytest
import torch
from conftest import CUDA_AVAILABLE, make_inputs

import moa_engine  # noqa: F401  (registers torch.ops.moa)

OPS = torch.ops.moa
T, IN, OUT, R, E = 5, 576, 37, 16, 8


def base_args(gen):
    """Valid arguments as a dict, including y for the in-place op."""
    inputs = make_inputs(gen, in_features=IN, out_features=OUT, rank=R, experts=E, pattern="mixed_none", tokens=T)
    y = torch.randn(T, OUT, generator=gen)
    return dict(
        y=y,
        x=inputs.x,
        lora_a=inputs.lora_a,
        lora_b=inputs.lora_b,
        expert_ids=inputs.expert_ids,
        scales=inputs.scales,
    )


def call(op_name, args):
    keys = ["x", "lora_a", "lora_b", "expert_ids", "scales"]
    if op_name == "grouped_lora_add_":
        keys = ["y"] + keys
    return getattr(OPS, op_name)(*(args[k] for k in keys))


def shape(text):
    """A regex matching a shape as it prints, e.g. [8, 16, 512]."""
    return re.escape(text)


def with_id(ids, position, value):
    ids = ids.clone()
    ids[position] = value
    return ids


# (test id, {argument: function of the valid args giving the bad value}, exception, regex)
BAD_INPUTS = [
    ("x_3d", {"x": lambda a: a["x"].reshape(1, T, IN)}, ValueError, r"\bx\b.*\[T, in\].*" + shape("[1, 5, 576]")),
    ("x_1d", {"x": lambda a: a["x"].reshape(-1)}, ValueError, r"\bx\b.*\[T, in\].*" + shape("[2880]")),
    ("lora_a_2d", {"lora_a": lambda a: a["lora_a"][0]}, ValueError, r"lora_a.*\[E, r, in\].*" + shape("[16, 576]")),
    (
        "lora_a_in_mismatch",
        {"lora_a": lambda a: a["lora_a"][:, :, :512]},
        ValueError,
        r"lora_a.*in=576.*" + shape("[8, 16, 512]"),
    ),
    (
        "lora_b_2d",
        {"lora_b": lambda a: a["lora_b"][0]},
        ValueError,
        r"lora_b.*\[E, out, r\].*" + shape("[37, 16]"),
    ),
    (
        "lora_b_E_mismatch",
        {"lora_b": lambda a: torch.cat([a["lora_b"], a["lora_b"][:1]])},
        ValueError,
        r"lora_b.*E=8.*" + shape("[9, 37, 16]"),
    ),
    (
        "lora_b_r_mismatch",
        {"lora_b": lambda a: a["lora_b"][:, :, :15]},
        ValueError,
        r"lora_b.*r=16.*" + shape("[8, 37, 15]"),
    ),
    (
        "expert_ids_too_short",
        {"expert_ids": lambda a: a["expert_ids"][:4]},
        ValueError,
        r"expert_ids.*T=5.*" + shape("[4]"),
    ),
    (
        "expert_ids_2d",
        {"expert_ids": lambda a: a["expert_ids"].reshape(1, T)},
        ValueError,
        r"expert_ids.*\[T\].*" + shape("[1, 5]"),
    ),
    (
        "expert_ids_float",
        {"expert_ids": lambda a: a["expert_ids"].float()},
        TypeError,
        r"expert_ids.*int32 or int64.*float32",
    ),
    ("expert_id_E", {"expert_ids": lambda a: with_id(a["expert_ids"], 3, E)}, IndexError, r"expert_ids.*\b8\b"),
    (
        "expert_id_E_plus_5",
        {"expert_ids": lambda a: with_id(a["expert_ids"], 1, E + 5)},
        IndexError,
        r"expert_ids.*\b13\b",
    ),
    (
        "expert_id_E_int32",
        {"expert_ids": lambda a: with_id(a["expert_ids"], 4, E).int()},
        IndexError,
        r"expert_ids.*\b8\b",
    ),
    ("expert_id_minus_2", {"expert_ids": lambda a: with_id(a["expert_ids"], 2, -2)}, IndexError, r"expert_ids.*-2\b"),
    (
        "expert_id_huge",
        {"expert_ids": lambda a: with_id(a["expert_ids"], 0, 2**40)},
        IndexError,
        r"expert_ids.*1099511627776",
    ),
    ("scales_too_long", {"scales": lambda a: torch.rand(E + 1)}, ValueError, r"scales.*E=8.*" + shape("[9]")),
    ("scales_2d", {"scales": lambda a: a["scales"].reshape(2, 4)}, ValueError, r"scales.*" + shape("[2, 4]")),
    ("scales_float64", {"scales": lambda a: a["scales"].double()}, TypeError, r"scales.*float32.*float64"),
    ("scales_bfloat16", {"scales": lambda a: a["scales"].bfloat16()}, TypeError, r"scales.*float32.*bfloat16"),
    (
        "x_bf16_loras_f32",
        {"x": lambda a: a["x"].bfloat16(), "y": lambda a: a["y"].bfloat16()},
        TypeError,
        r"lora_a.*bfloat16.*float32",
    ),
    ("lora_b_f64", {"lora_b": lambda a: a["lora_b"].double()}, TypeError, r"lora_b.*float32.*float64"),
    (
        "int_dtype",
        {k: (lambda a, k=k: (a[k] * 8).to(torch.int32)) for k in ["x", "lora_a", "lora_b", "y"]},
        TypeError,
        r"\bx\b.*int",
    ),
]

OP_NAMES = ["grouped_lora", "grouped_lora_add_", "_grouped_lora_generic"]


def apply_bad(args, changes):
    bad = dict(args)
    for key, make in changes.items():
        bad[key] = make(args)
    return bad


@pytest.mark.parametrize("op_name", OP_NAMES)
@pytest.mark.parametrize("changes,exc,pattern", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises(changes, exc, pattern, op_name, gen):
    args = apply_bad(base_args(gen), changes)
    with pytest.raises(exc, match=pattern):
        call(op_name, args)


@pytest.mark.parametrize("changes,exc,pattern", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_under_autograd(changes, exc, pattern, gen):
    args = apply_bad(base_args(gen), changes)
    for key in ["x", "lora_a", "lora_b"]:
        if args[key].is_floating_point():
            args[key] = args[key].detach().requires_grad_(True)
    with pytest.raises(exc, match=pattern):
        call("grouped_lora", args)


SHAPE_AND_DTYPE_ERRORS = [c for c in BAD_INPUTS if c[2] is not IndexError]


@pytest.mark.parametrize("op_name", ["grouped_lora", "grouped_lora_add_"])
@pytest.mark.parametrize(
    "changes,exc,pattern", [c[1:] for c in SHAPE_AND_DTYPE_ERRORS], ids=[c[0] for c in SHAPE_AND_DTYPE_ERRORS]
)
def test_bad_input_raises_on_meta(changes, exc, pattern, op_name, gen):
    """The shape-only implementation (fake tensors, torch.compile) checks the same way."""
    args = {k: v.to("meta") for k, v in apply_bad(base_args(gen), changes).items()}
    with pytest.raises(exc, match=pattern):
        call(op_name, args)


@pytest.mark.parametrize(
    "changes,exc,pattern",
    [
        ({"y": lambda a: torch.randn(T, OUT + 1)}, ValueError, r"\by\b.*\[T, out\].*" + shape("[5, 38]")),
        ({"y": lambda a: torch.randn(T + 1, OUT)}, ValueError, r"\by\b.*\[T, out\].*" + shape("[6, 37]")),
        ({"y": lambda a: torch.randn(T * OUT)}, ValueError, r"\by\b.*\[T, out\].*" + shape("[185]")),
        ({"y": lambda a: a["y"].bfloat16()}, TypeError, r"\by\b.*float32.*bfloat16"),
        ({"y": lambda a: a["y"].double()}, TypeError, r"\by\b.*float32.*float64"),
    ],
    ids=["y_wrong_out", "y_wrong_T", "y_1d", "y_bfloat16", "y_float64"],
)
def test_bad_y_raises(changes, exc, pattern, gen):
    args = apply_bad(base_args(gen), changes)
    y_before = args["y"].clone()
    with pytest.raises(exc, match=pattern):
        call("grouped_lora_add_", args)
    assert torch.equal(args["y"], y_before), "a rejected call must leave y alone"


def test_rejected_id_leaves_y_alone(gen):
    """The ids are checked before anything is written."""
    args = base_args(gen)
    args["expert_ids"] = with_id(args["expert_ids"], T - 1, E)
    y_before = args["y"].clone()
    with pytest.raises(IndexError, match=r"expert_ids"):
        call("grouped_lora_add_", args)
    assert torch.equal(args["y"], y_before)


def test_bad_grad_for_weight_grads(gen):
    args = base_args(gen)
    grad = torch.randn(T, OUT + 2)
    with pytest.raises(ValueError, match=r"grad.*\[T, out\].*" + shape("[5, 39]")):
        OPS._grouped_lora_weight_grads(grad, *(args[k] for k in ["x", "lora_a", "lora_b", "expert_ids", "scales"]))


DEVICE_MISMATCHES = [
    (op_name, moved)
    for op_name in ["grouped_lora", "grouped_lora_add_"]
    for moved in ["lora_a", "lora_b", "expert_ids", "scales", "y"]
    if moved != "y" or op_name == "grouped_lora_add_"
]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device")
@pytest.mark.parametrize("op_name,moved", DEVICE_MISMATCHES)
def test_device_mismatch(op_name, moved, gen):
    args = {k: v.cuda() for k, v in base_args(gen).items()}
    args[moved] = args[moved].cpu()
    with pytest.raises(ValueError, match=rf"{moved}.*cuda.*cpu"):
        call(op_name, args)
