"""Benchmark of the grouped LoRA op against the torch ways of doing the same thing.

Dimensions: T tokens, E experts, r rank, in / out feature sizes.
Shapes: x [T, in], lora_a [E, r, in], lora_b [E, out, r], expert_ids [T], scales [E], y [T, out].
Semantics: y[t] += scales[e] * (x[t] @ lora_a[e].T) @ lora_b[e].T with e = expert_ids[t].

Variants, timed interleaved in one process (every figure gets a same-run ratio):
- op:     torch.ops.moa.grouped_lora_add_(y, x, lora_a, lora_b, expert_ids, scales), as the engine
          calls it at inference (y preallocated);
- loop:   PEFT's mixed-batch way: per expert present, a row mask and two matmuls;
- bmm:    gather every token's A and B, two torch.bmm;
- bound:  prefill problems only: the same two GEMMs with every token on one expert, i.e. the
          grouping costs nothing.
- graph:  CUDA only: the op captured once in a CUDA graph and replayed, as the engine's decode
          step is to run it.
Achieved GB/s and GFLOP/s of the op are quoted against a measured large-copy bandwidth.
By default the last-level cache is flushed (untimed) before every call, as in the engine, where
a layer's adapters are evicted by the rest of the model between two decode steps.

On CUDA (--device cuda) every call is timed by CUDA events around it on the stream, so the host's
launch and sync costs outside the GPU's work are left out; the copy bandwidth is measured the same
way, in the same run. TFLOP/s are printed for the prefill problems.

    python benchmarks/ops.py                 # full run, CPU, float32 and bfloat16
    python benchmarks/ops.py --quick         # smoke run
    python benchmarks/ops.py --problems 'decode,smollm2-*' --dtypes float32
    python benchmarks/ops.py --device cuda --dtypes bfloat16,float16,float32
"""

import argparse
import fnmatch
import os
import sys
import time
from dataclasses import dataclass

import torch

if __package__:
    from . import _timing as timing
else:
    import _timing as timing

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Op vs loop agreement before timing: |op - loop| <= atol + rtol * |loop| (allclose).
# bfloat16: the op may round once where the loop rounds three times, i.e. a few ulps of |y| ~ 4.
TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=3e-2, atol=5e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}
SEED = 0
BUDGET_S = {"full": 4.0, "quick": 0.5}  # wall time per (problem, dtype) once min_repeats are in
NOISY_LOAD_CORES = 0.2  # a row taken while other processes kept more cores busy is flagged


# ---------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProblemSpec:
    name: str
    T: int
    E: int
    in_features: int
    out_features: int
    rank: int
    layout: str  # "permutation" | "balanced" | "blocks" | "scattered": how expert_ids are laid out
    quick: bool = False  # part of the --quick set
    devices: tuple = ("cpu", "cuda")  # where the problem is run

    @property
    def is_prefill(self):
        return self.layout in ("blocks", "scattered")


def _smollm2_specs():
    """SmolLM2-135M: hidden 576, intermediate 1536; q/o (576->576), up/gate (576->1536), down."""
    pairs = [(576, 576), (576, 1536), (1536, 576)]
    # decode: 16 tokens, 2 per expert in random order; prefill: 4 contiguous blocks of 512
    decode = [ProblemSpec(f"smollm2-decode-{i}x{o}", 16, 8, i, o, 16, "balanced", quick=True) for i, o in pairs]
    prefill = [ProblemSpec(f"smollm2-prefill-{i}x{o}", 2048, 4, i, o, 16, "blocks") for i, o in pairs]
    return decode + prefill


PROBLEMS = [
    ProblemSpec("decode", 32, 32, 4096, 4096, 16, "permutation", quick=True),
    ProblemSpec("prefill", 4096, 8, 4096, 4096, 16, "blocks", quick=True),
    ProblemSpec("prefill-scattered", 4096, 8, 4096, 4096, 16, "scattered"),
    *_smollm2_specs(),
    # GPU-sized: enough weight bytes to fill the chip and to exceed its L2 cache.
    ProblemSpec("decode-128", 128, 128, 4096, 4096, 16, "permutation", devices=("cuda",)),
    ProblemSpec("decode-64-r64", 64, 64, 4096, 4096, 64, "permutation", devices=("cuda",)),
    ProblemSpec("decode-shared", 64, 8, 4096, 4096, 16, "balanced", devices=("cuda",)),
    ProblemSpec("prefill-16k", 16384, 8, 4096, 4096, 16, "blocks", devices=("cuda",)),
    ProblemSpec("prefill-8k-r64", 8192, 8, 4096, 4096, 64, "scattered", devices=("cuda",)),
]

GOALS = [
    # (problem, dtype or None for any, device, metric, comparison, target, label)
    ("decode", torch.float32, "cpu", "copy_fraction", ">=", 0.80, "op GB/s >= 80% of copy"),
    ("decode", torch.float32, "cpu", "loop_over_op", ">=", 3.0, "op >= 3x faster than loop"),
    ("prefill", None, None, "op_over_bound", "<=", 1.3, "op within 1.3x of bound"),
    ("decode", torch.bfloat16, "cuda", "copy_fraction", ">=", 0.75, "op GB/s >= 75% of copy"),
    ("decode", torch.bfloat16, "cuda", "graph_copy_fraction", ">=", 0.75, "graph GB/s >= 75% of copy"),
    ("decode-128", torch.bfloat16, "cuda", "graph_copy_fraction", ">=", 0.75, "graph GB/s >= 75% of copy"),
    ("decode", torch.bfloat16, "cuda", "bmm_over_op", ">=", 1.0, "op faster than gather+bmm"),
]


@dataclass
class Problem:
    spec: ProblemSpec
    x: torch.Tensor  # [T, in]
    lora_a: torch.Tensor  # [E, r, in]
    lora_b: torch.Tensor  # [E, out, r]
    expert_ids: torch.Tensor  # [T], int64, all >= 0 here
    scales: torch.Tensor  # [E], float32
    y: torch.Tensor  # [T, out], accumulated into by every timed call

    def args(self):
        return (self.x, self.lora_a, self.lora_b, self.expert_ids, self.scales)


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def make_expert_ids(spec, gen):
    """expert_ids [T] laid out as spec.layout says."""
    T, E = spec.T, spec.E
    if spec.layout == "permutation":  # one token per expert
        assert T == E, f"{spec.name}: a permutation needs T == E, got T={T}, E={E}"
        return torch.randperm(E, generator=gen)
    balanced = torch.arange(T) * E // T  # E contiguous blocks of T/E tokens: 0..0 1..1 ...
    if spec.layout == "blocks":
        return balanced
    if spec.layout in ("scattered", "balanced"):  # same counts in random order
        return balanced[torch.randperm(T, generator=gen)]
    raise ValueError(f"{spec.name}: unknown layout {spec.layout!r}")


def make_problem(spec, dtype, device, seed=SEED):
    """Random, well-scaled inputs (every update element O(1)) and a random y to add into.

    x, y ~ N(0, 1); lora_a ~ N(0, 1/in); lora_b ~ N(0, 1/r); scales ~ U[0.5, 2].
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(shape, generator=gen) * std).to(device=device, dtype=dtype)

    T, E, r, n_in, n_out = spec.T, spec.E, spec.rank, spec.in_features, spec.out_features
    return Problem(
        spec=spec,
        x=randn(T, n_in),
        lora_a=randn(E, r, n_in, std=n_in**-0.5),
        lora_b=randn(E, n_out, r, std=r**-0.5),
        expert_ids=make_expert_ids(spec, gen).to(device),
        scales=(0.5 + 1.5 * torch.rand(E, generator=gen)).to(device),
        y=randn(T, n_out),
    )


# ---------------------------------------------------------------------------------------------
# Variants: each returns a zero-argument callable that adds the update into y
# ---------------------------------------------------------------------------------------------


def op_fn(p, y=None):
    """The op under test, as the engine calls it."""
    y = p.y if y is None else y
    op = torch.ops.moa.grouped_lora_add_.default
    return lambda: op(y, p.x, p.lora_a, p.lora_b, p.expert_ids, p.scales)


def loop_fn(p, y=None):
    """PEFT's mixed-batch forward: per expert present, mask the rows, two matmuls, add.
    The scales are Python floats, as PEFT holds them."""
    y = p.y if y is None else y
    x, A, B, ids = p.x, p.lora_a, p.lora_b, p.expert_ids
    scale_list = p.scales.tolist()

    def run():
        for e in ids.unique().tolist():
            mask = ids == e
            y[mask] += scale_list[e] * (x[mask] @ A[e].T) @ B[e].T  # [n_e, r] -> [n_e, out]
        return y

    return run


def gather_bmm_fn(p, y=None):
    """Every token gathers its own A and B, then two batched matmuls (ids >= 0 assumed)."""
    y = p.y if y is None else y
    x, A, B, ids, scales = p.args()

    def run():
        a_t = A[ids]  # [T, r, in]
        b_t = B[ids]  # [T, out, r]
        h = torch.bmm(x.unsqueeze(1), a_t.transpose(1, 2))  # [T, 1, r]
        h = h * scales[ids].to(h.dtype)[:, None, None]
        y.add_(torch.bmm(h, b_t.transpose(1, 2)).squeeze(1))  # [T, out]
        return y

    return run


def bound_fn(p, y=None):
    """The same two GEMMs with every token on expert 0: the op's cost without grouping."""
    y = p.y if y is None else y
    x, a0, b0, s0 = p.x, p.lora_a[0], p.lora_b[0], float(p.scales[0])
    return lambda: y.addmm_(x @ a0.T, b0.T, alpha=s0)  # [T, r] @ [r, out]


def graph_fn(p, y=None):
    """CUDA: the op captured once in a CUDA graph (static inputs and y), replayed per call.
    The capture runs the op once first, on a side stream, as torch.cuda.graphs advises."""
    y = p.y if y is None else y
    run = op_fn(p, y)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def variants(p):
    fns = {"op": op_fn(p), "loop": loop_fn(p), "bmm": gather_bmm_fn(p)}
    if p.x.is_cuda:
        fns["graph"] = graph_fn(p)
    if p.spec.is_prefill:
        fns["bound"] = bound_fn(p)
    return fns


# ---------------------------------------------------------------------------------------------
# Check and measure
# ---------------------------------------------------------------------------------------------


def check_op(p, make_fn=None):
    """Run the op (or the callable make_fn(p, y) builds) and the loop once from the same y and
    compare (allclose, dtype tolerance)."""
    y_op, y_loop = p.y.clone(), p.y.clone()
    try:
        run = (make_fn or op_fn)(p, y_op)
        y_op.copy_(y_loop)  # building a graph runs the op once
        run()
    except RuntimeError as error:  # e.g. a dtype the op does not support: report, go on
        return {"ok": False, "error": str(error).splitlines()[0]}
    loop_fn(p, y_loop)()
    tol = TOLERANCES[p.x.dtype]
    diff = (y_op.double() - y_loop.double()).abs()
    allowed = tol["atol"] + tol["rtol"] * y_loop.double().abs()
    worst = int((diff - allowed).argmax())
    return {
        "ok": bool((diff <= allowed).all()),
        "max_abs_diff": float(diff.max()),
        "worst_index": list(divmod(worst, y_op.shape[1])),
        **tol,
    }


def op_bytes(p):
    """Bytes the op must move: the used experts' A and B, x read, y read and written."""
    used = int(p.expert_ids[p.expert_ids >= 0].unique().numel())
    size = p.x.element_size()
    spec = p.spec
    weights = used * spec.rank * (spec.in_features + spec.out_features) * size
    return weights + p.x.numel() * size + 2 * p.y.numel() * size


def op_flops(spec):
    return 2 * spec.T * spec.rank * (spec.in_features + spec.out_features)


def run_problem(spec, dtype, args, flush):
    """Check the op, time all variants, return one JSON-ready row."""
    p = make_problem(spec, dtype, args.device)
    row = {
        "problem": spec.name,
        "dtype": dtype_name(dtype),
        "T": spec.T,
        "E": spec.E,
        "experts_used": int(p.expert_ids.unique().numel()),
        "in": spec.in_features,
        "out": spec.out_features,
        "r": spec.rank,
        "layout": spec.layout,
        "check": check_op(p),
    }
    if p.x.is_cuda:
        row["graph_check"] = check_op(p, graph_fn) if row["check"]["ok"] else row["check"]
    fns = variants(p)
    if not row["check"]["ok"]:
        del fns["op"]  # a wrong op gets no figure
        fns.pop("graph", None)
    elif not row.get("graph_check", {"ok": True})["ok"]:
        del fns["graph"]
    clock = timing.CudaEventClock() if p.x.is_cuda else timing.WallClock(args.device)
    with timing.OtherLoad() as other_load:
        timings = timing.time_fns(
            fns,
            clock=clock,
            warmup=args.warmup,
            repeats=args.repeats,
            max_seconds=BUDGET_S["quick" if args.quick else "full"],
            flush=flush,
        )
    row["other_load_cores"] = other_load.cores
    row["times"] = {name: t.to_json() for name, t in timings.items()}
    row.update(derived_figures(p, timings))
    return row


def derived_figures(p, timings):
    """Ratios against the same-run baselines, achieved GB/s and GFLOP/s of the op (and of its
    CUDA-graph replay)."""
    if "op" not in timings:
        return {}
    t_op = timings["op"].median
    gbps = op_bytes(p) / t_op / 1e9
    figures = {
        "op_bytes": op_bytes(p),
        "op_gb_per_s": gbps,
        "op_gflop_per_s": op_flops(p.spec) / t_op / 1e9,
        "loop_over_op": timings["loop"].median / t_op,
        "bmm_over_op": timings["bmm"].median / t_op,
    }
    if "bound" in timings:
        figures["op_over_bound"] = t_op / timings["bound"].median
    if "graph" in timings:
        t_graph = timings["graph"].median
        figures["graph_gb_per_s"] = op_bytes(p) / t_graph / 1e9
        figures["graph_gflop_per_s"] = op_flops(p.spec) / t_graph / 1e9
        figures["bmm_over_graph"] = timings["bmm"].median / t_graph
    return figures


def add_copy_fractions(rows, copy_gbps):
    """The op's achieved GB/s as a fraction of the copy-bandwidth ceiling."""
    for row in rows:
        if row.get("op_gb_per_s") is not None:
            row["copy_fraction"] = row["op_gb_per_s"] / copy_gbps
        if row.get("graph_gb_per_s") is not None:
            row["graph_copy_fraction"] = row["graph_gb_per_s"] / copy_gbps


# ---------------------------------------------------------------------------------------------
# CUDA ceiling
# ---------------------------------------------------------------------------------------------


def cuda_copy_ceiling(*, nbytes=1 << 30, repeats=10):
    """The device's copy bandwidth, timed like the op (CUDA events): dst.copy_(src) of float32
    tensors of `nbytes` each; gb_per_s counts read + write bytes, as _timing defines it."""
    numel = nbytes // 4
    src = torch.randn(numel, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    t = timing.time_fn(lambda: dst.copy_(src), clock=timing.CudaEventClock(), warmup=3, repeats=repeats)
    return {
        "gb_per_s": 2 * numel * 4 / t.median / 1e9,
        "bytes_per_tensor": numel * 4,
        "definition": timing.COPY_BANDWIDTH_DEFINITION + "; timed with CUDA events",
        **t.to_json(),
    }


def evaluate_goals(rows, device):
    """The issue's targets, reported next to the figures (never asserted)."""
    results = []
    for problem, dtype, goal_device, metric, comparison, target, label in GOALS:
        if goal_device not in (None, device):
            continue
        for row in rows:
            if row["problem"] != problem or (dtype is not None and row["dtype"] != dtype_name(dtype)):
                continue
            value = row.get(metric)
            met = None if value is None else (value >= target if comparison == ">=" else value <= target)
            results.append(
                {
                    "problem": problem,
                    "dtype": row["dtype"],
                    "goal": label,
                    "metric": metric,
                    "target": target,
                    "value": value,
                    "met": met,
                }
            )
    return results


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def describe_check(check):
    if check["ok"]:
        return "ok"
    return "ERROR" if "error" in check else f"WRONG ({check['max_abs_diff']:.2g})"


def is_noisy(row):
    return (row.get("other_load_cores") or 0.0) > NOISY_LOAD_CORES


def _ms(row, name):
    t = row.get("times", {}).get(name)
    return f"{t['median_ms']:.3f}" if t else "-"


def _num(row, key, fmt, suffix=""):
    return format(row[key], fmt) + suffix if row.get(key) is not None else "-"


def print_table(rows, copy, goals):
    cuda = any("graph" in row.get("times", {}) for row in rows)
    print(timing.format_table(table_headers(cuda), [table_cells(row, cuda) for row in rows]))
    print_notes(copy, cuda)
    if goals:
        print("\ngoals (reported, not asserted):")
        for g in goals:
            status = {True: "MET", False: "NOT MET", None: "no figure"}[g["met"]]
            value = "-" if g["value"] is None else f"{g['value']:.2f}"
            print(f"  {g['problem']:<10} {g['dtype']:<9} {g['goal']:<28} {g['metric']} = {value} -> {status}")


def table_headers(cuda):
    headers = [
        "problem",
        "dtype",
        "T",
        "E",
        "in",
        "out",
        "op ms",
        "loop ms",
        "bmm ms",
        "bound ms",
        "loop/op",
        "bmm/op",
        "op/bound",
        "op GB/s",
        "% copy",
    ]
    if cuda:
        headers += ["graph ms", "graph GB/s", "graph % copy", "TFLOP/s"]
    else:
        headers += ["GFLOP/s"]
    return headers + ["check", "others"]


def table_cells(row, cuda):
    check = describe_check(row["check"])
    if cuda and row.get("graph_check") and not row["graph_check"]["ok"]:
        check += ", graph " + describe_check(row["graph_check"])
    cells = [
        row["problem"],
        row["dtype"],
        row["T"],
        row["experts_used"],
        row["in"],
        row["out"],
        _ms(row, "op"),
        _ms(row, "loop"),
        _ms(row, "bmm"),
        _ms(row, "bound"),
        _num(row, "loop_over_op", ".2f", "x"),
        _num(row, "bmm_over_op", ".2f", "x"),
        _num(row, "op_over_bound", ".2f", "x"),
        _num(row, "op_gb_per_s", ".1f"),
        _num(row, "copy_fraction", ".0%"),
    ]
    if cuda:
        best = max(row.get("op_gflop_per_s") or 0.0, row.get("graph_gflop_per_s") or 0.0)
        prefill = any(s.name == row["problem"] and s.is_prefill for s in PROBLEMS)
        cells += [
            _ms(row, "graph"),
            _num(row, "graph_gb_per_s", ".1f"),
            _num(row, "graph_copy_fraction", ".0%"),
            format(best / 1e3, ".2f") if prefill and best else "-",
        ]
    else:
        cells += [_num(row, "op_gflop_per_s", ".1f")]
    return cells + [check, _num(row, "other_load_cores", ".2f", " NOISY" if is_noisy(row) else "")]


def print_notes(copy, cuda):
    timer = "CUDA-event time per call" if cuda else "wall time per call"
    print(
        f"\nmedian {timer}; E = experts used. ratios loop/op and bmm/op > 1: the op is "
        f"faster; op/bound: op time over the ungrouped two-GEMM bound.\n"
        f"op GB/s = (used experts' A and B + x + 2 * y bytes) / op time; "
        f"% copy = op GB/s / copy bandwidth {copy['gb_per_s']:.1f} GB/s ({copy['definition']}).\n"
        + (
            "graph: the op captured in a CUDA graph and replayed; TFLOP/s (prefill problems) = "
            "2 * T * r * (in + out) / the faster of op and graph.\n"
            if cuda
            else "GFLOP/s = 2 * T * r * (in + out) / op time.\n"
        )
        + f"others: CPU cores other processes kept busy while the row was timed; "
        f"NOISY above {NOISY_LOAD_CORES}: rerun that row on a quiet machine."
    )


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--device", choices=["cpu", "cuda"], default="cpu")
    add("--dtypes", default="float32,bfloat16", help=f"comma-separated, of {', '.join(DTYPES)}")
    add("--repeats", type=int, default=None, help="timed rounds at most (default 30; 5 with --quick)")
    add("--warmup", type=int, default=None, help="untimed calls per variant (default 3; 1 with --quick)")
    add("--quick", action="store_true", help="smoke run: fewer repeats; without --problems, the quick set")
    add("--problems", default="*", help="comma-separated names or globs, e.g. 'decode,smollm2-*' (default all)")
    add("--cache", choices=["cold", "hot"], default="cold", help="flush the LLC before each call (cold)")
    add("--out", default=None, help="JSON path (default benchmarks/results/ops-<device>.json)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 30
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.out is None:
        args.out = os.path.join(RESULTS_DIR, f"ops-{args.device}.json")
    unknown = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtype(s) {unknown}; expected some of {list(DTYPES)}")
    args.dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    args.specs = select_problems(args.problems, args.quick, args.device)
    if not args.specs:
        names = [s.name for s in PROBLEMS if args.device in s.devices]
        parser.error(f"--problems {args.problems!r} matches none of {names} ({args.device})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def select_problems(patterns, quick, device="cpu"):
    """The device's problems whose names match a glob; --quick alone keeps the quick set."""
    problems = [s for s in PROBLEMS if device in s.devices]
    if patterns == "*" and quick:
        return [s for s in problems if s.quick]
    globs = [g.strip() for g in patterns.split(",") if g.strip()]
    return [s for s in problems if any(fnmatch.fnmatchcase(s.name, g) for g in globs)]


def load_op():
    """Import moa_engine (which registers torch.ops.moa.*); explain what is missing if not."""
    try:
        import moa_engine  # noqa: F401

        return torch.ops.moa.grouped_lora_add_
    except (ImportError, AttributeError, RuntimeError) as error:
        sys.exit(
            f"benchmarks/ops.py: torch.ops.moa.grouped_lora_add_ is not available ({error}); "
            "build and install moa_engine first: pip install --no-build-isolation -e ."
        )


def measure_ceiling(args, when):
    """The copy bandwidth, with how busy other processes kept the CPU meanwhile."""
    repeats = 5 if args.quick else 10
    if args.device == "cuda":
        with timing.OtherLoad() as other_load:
            copy = cuda_copy_ceiling(repeats=repeats)
        copy["other_load_cores"] = other_load.cores
    else:
        copy = timing.copy_ceiling(args.device, repeats=repeats)
    print(f"copy bandwidth ({when}): {copy['gb_per_s']:.1f} GB/s (read + write)", flush=True)
    return copy


def run_all(args):
    flush = timing.make_cache_flush(args.device) if args.cache == "cold" else None
    rows = []
    for spec in args.specs:
        for dtype in args.dtypes:
            rows.append(run_problem(spec, dtype, args, flush))
            print(f"  {spec.name} {rows[-1]['dtype']}: op {_ms(rows[-1], 'op')} ms", flush=True)
    return rows


def build_payload(args, env, copy, rows, goals, elapsed):
    return {
        "benchmark": "ops",
        "op": "torch.ops.moa.grouped_lora_add_",
        "environment": env,
        "settings": {
            "quick": args.quick,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "cache": args.cache,
            "budget_s_per_row": BUDGET_S["quick" if args.quick else "full"],
            "seed": SEED,
            "timer": (
                "CUDA events around each call on the stream; median"
                if args.device == "cuda"
                else "time.perf_counter per call; median"
            ),
            "variants interleaved": True,
            "noisy_above_other_load_cores": NOISY_LOAD_CORES,
        },
        "copy_bandwidth": copy,
        "figures": {
            "op_gb_per_s": "(used experts' A and B + x + 2 * y) bytes / median op time",
            "op_gflop_per_s": "2 * T * r * (in + out) / median op time",
            "loop_over_op": "loop median / op median",
            "bmm_over_op": "bmm median / op median",
            "op_over_bound": "op median / bound median",
            "copy_fraction": "op_gb_per_s / copy gb_per_s",
            "graph_gb_per_s": "CUDA: the same bytes / median time of the op replayed from a CUDA graph",
            "graph_copy_fraction": "graph_gb_per_s / copy gb_per_s",
            "bmm_over_graph": "bmm median / graph median",
            "other_load_cores": "CPU cores kept busy by other processes while the row was timed",
        },
        "rows": rows,
        "goals": goals,
        "total_s": elapsed,
    }


def report_problems(rows):
    """Name the rows that cannot be trusted; return the exit status (1 if the op was wrong)."""
    noisy = [f"{r['problem']}/{r['dtype']}" for r in rows if is_noisy(r)]
    if noisy:
        print(f"other processes were busy while timing {', '.join(noisy)}: those figures are unreliable")
    wrong = [r for r in rows if not r["check"]["ok"] or not r.get("graph_check", {"ok": True})["ok"]]
    for r in wrong:
        print(
            f"op check failed on {r['problem']}/{r['dtype']}: {r['check']} {r.get('graph_check', '')}", file=sys.stderr
        )
    return 1 if wrong else 0


def main(argv=None):
    args = parse_args(argv)
    load_op()
    started = time.perf_counter()
    env = timing.environment(args.device)
    print(f"torch {env['torch']}, {env['threads']} threads, {env['device_name']}, cache {args.cache}")
    copy_start = measure_ceiling(args, "start")
    rows = run_all(args)
    copy = timing.combine_copy_ceilings(copy_start, measure_ceiling(args, "end"))
    add_copy_fractions(rows, copy["gb_per_s"])
    goals = evaluate_goals(rows, args.device)
    print()
    print_table(rows, copy, goals)
    elapsed = time.perf_counter() - started
    timing.write_json_atomic(args.out, build_payload(args, env, copy, rows, goals, elapsed))
    print(f"\nwrote {args.out} in {elapsed:.1f} s")
    return report_problems(rows)


if __name__ == "__main__":
    sys.exit(main())
