"""benchmarks/throughput.py: the measurements. Each mode's rows (measure_base, measure_moa), each
row timed with its variants interleaved (time_interleaved) and returned JSON-ready."""

import functools
import gc
import statistics

if __package__:
    from . import _timing as timing
    from ._throughput_sides import ROUTER_BATCH, OursRunner, ensure_moa_dir
else:
    import _timing as timing
    from _throughput_sides import ROUTER_BATCH, OursRunner, ensure_moa_dir

MIN_REPEATS = 3  # rounds a row always gets (fewer if --repeats is lower), whatever --budget says
NOISY_LOAD_CORES = 0.2  # a row taken while other processes kept more cores busy is flagged
NOISY_SPREAD = 0.10  # ... and one whose timings' IQR exceeds this fraction of their median
ROUTINGS = ("last", "per_layer", "vote")  # routed variants of a routing row
QUICK_ROUTING_VARIANTS = ("named", "last", "per_layer")  # --quick times only these


# ---------------------------------------------------------------------------------------------
# The modes' rows
# ---------------------------------------------------------------------------------------------


def measure_base(sides, model_path, dtype, workload, args):
    """The base mode's rows: decode at each batch, prefill, forward."""
    measurements = [
        lambda b=b: measure_decode(sides, workload.decode_prompts[:b], args.new_tokens, args)
        for b in args.mode_batches["base"]
    ]
    measurements.append(lambda: measure_prefill(sides, workload.prefill_prompts, args))
    measurements.append(lambda: measure_forward(sides, workload.forward_ids, args))
    for measure in measurements:
        row = measure()
        row["weight_bytes"] = sides.weight_bytes
        if sides.hf is not None:
            row["hf_weight_bytes"] = sides.hf.weight_bytes()
        yield row


def measure_moa(sides, model_path, dtype, workload, args):
    """The moa mode's rows: decode at each batch and number of experts, then routing TTFT."""
    for batch in args.mode_batches[sides.mode]:
        for n_experts in sorted({min(e, batch) for e in args.experts}):  # at most one expert per request
            yield measure_moa_decode(sides, workload.decode_prompts[:batch], n_experts, args)
    sides.ours = sides.peft = None  # free the decode engine and PeftModel before the next engine
    gc.collect()
    yield measure_routing(model_path, dtype, workload.decode_prompts[:ROUTER_BATCH], args, sides.engine_model)


# ---------------------------------------------------------------------------------------------
# Measurements: each returns one JSON-ready row
# ---------------------------------------------------------------------------------------------


def time_interleaved(fns, args, cold=()):
    """Warm up, then time the variants round by round; with the other load meanwhile.
    Variants named in `cold` get no warm-up (--quick: PEFT, whose calls are long)."""
    warmup = args.warmup
    with timing.OtherLoad() as other_load:
        if cold:  # time_fns' warm-up, for the others only
            seconds = None if args.budget is None else args.budget / 4 / len(fns)
            for name, fn in fns.items():
                if name not in cold:
                    timing.warm_up(fn, device=args.device, calls=warmup, max_seconds=seconds)
            warmup = 0
        timings = timing.time_fns(
            fns,
            device=args.device,
            warmup=warmup,
            repeats=args.repeats,
            min_repeats=min(MIN_REPEATS, args.repeats),
            max_seconds=args.budget,
        )
    return timings, other_load.cores


def recording(fn, outputs, key):
    """fn, keeping its latest result in outputs[key]."""

    def run():
        outputs[key] = fn()

    return run


def check_lengths(outputs, batch, new_tokens):
    """Every sequence must have exactly new_tokens new tokens, or the figure is wrong."""
    for side, sequences in outputs.items():
        lengths = sorted({len(s) for s in sequences})
        if len(sequences) != batch or lengths != [new_tokens]:
            raise RuntimeError(
                f"{side} generated {len(sequences)} sequences of lengths {lengths}; "
                f"expected {batch} of exactly {new_tokens} tokens"
            )


def agreement(ours, hf):
    """Mean over sequences of the fraction of tokens before the first ours / HF divergence."""
    fractions = []
    for a, b in zip(ours, hf):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        fractions.append(same / max(len(a), 1))
    return statistics.mean(fractions)


def measure_decode(sides, prompts, new_tokens, args):
    """Decode tokens/s at batch len(prompts): [N + 1 new tokens] - [1 new token], paired by round."""
    fns, outputs = {}, {}
    for side in sides.runners():
        fns[f"{side.label} ttft"] = side.generate_fn(prompts, 1)
        fns[f"{side.label} gen"] = recording(side.generate_fn(prompts, new_tokens + 1), outputs, side.label)
    timings, other_load = time_interleaved(fns, args)
    check_lengths(outputs, len(prompts), new_tokens + 1)
    row = {"kind": "decode", "batch": len(prompts), "tokens": new_tokens, "prompt_tokens": sum(map(len, prompts))}
    for side in sides.runners():
        row[side.label], _ = decode_figures(timings, side.label, len(prompts), new_tokens)
    if sides.hf is not None:
        row["agreement"] = agreement(outputs["ours"], outputs["HF"])
    return finish_row(row, timings, other_load)


def decode_figures(timings, label, batch, new_tokens):
    """Figures of `label`'s decode: per round [N + 1 tokens] - [1 token]; and that Timing."""
    first, whole = timings[f"{label} ttft"], timings[f"{label} gen"]
    decode = timing.Timing([w - f for w, f in zip(whole.samples, first.samples)])
    figures = side_figures(batch * new_tokens, decode, per_step=new_tokens)
    figures["ttft_ms"] = first.median * 1e3
    return figures, decode


def measure_moa_decode(sides, prompts, n_experts, args):
    """Decode tokens/s at batch len(prompts) with n_experts distinct experts, round-robin: the
    engine with experts, the same engine with domain="base", and PEFT mixed-batch generate."""
    batch, new_tokens, peft_tokens = len(prompts), args.new_tokens, args.peft_new_tokens
    names = [sides.experts[i % n_experts] for i in range(batch)]
    fns, outputs = {}, {}
    for label, domains in (("ours", names), ("ours_base", ["base"] * batch)):
        fns[f"{label} ttft"] = sides.ours.generate_fn(prompts, 1, domains)
        fns[f"{label} gen"] = recording(sides.ours.generate_fn(prompts, new_tokens + 1, domains), outputs, label)
    if sides.peft is not None:
        fns["PEFT ttft"] = sides.peft.generate_fn(prompts, 1, adapter_names=names)
        peft_gen = sides.peft.generate_fn(prompts, peft_tokens + 1, adapter_names=names)
        fns["PEFT gen"] = recording(peft_gen, outputs, "PEFT")
    cold = ("PEFT ttft", "PEFT gen") if args.quick else ()
    timings, other_load = time_interleaved(fns, args, cold=cold)
    check_lengths({k: v for k, v in outputs.items() if k != "PEFT"}, batch, new_tokens + 1)
    row = {
        "kind": "decode",
        "batch": batch,
        "experts": len(set(names)),
        "experts_loaded": len(sides.experts),
        "tokens": new_tokens,
        "prompt_tokens": sum(map(len, prompts)),
        "base_weight_bytes": sides.base_weight_bytes,
        "expert_bytes": sides.expert_bytes,
        # a step reads the base weights and each expert in the batch once
        "weight_bytes": sides.base_weight_bytes + len(set(names)) * sides.expert_bytes,
    }
    row["ours"], moa = decode_figures(timings, "ours", batch, new_tokens)
    row["ours_base"], base = decode_figures(timings, "ours_base", batch, new_tokens)
    row["overhead"] = ratio(row["ours"]["step_ms"], row["ours_base"]["step_ms"])
    paired = [m / b for m, b in zip(moa.samples, base.samples) if b > 0]
    row["overhead_paired"] = statistics.median(paired) if paired else None
    row["ours_over_peft"] = None
    if sides.peft is not None:
        check_lengths({"PEFT": outputs["PEFT"]}, batch, peft_tokens + 1)
        row["peft_tokens"] = peft_tokens
        row["PEFT"], _ = decode_figures(timings, "PEFT", batch, peft_tokens)
        row["ours_over_peft"] = ratio(row["ours"]["tokens_per_s"], row["PEFT"]["tokens_per_s"])
        shared = min(new_tokens, peft_tokens) + 1  # agreement over the tokens both sides made
        row["agreement"] = agreement([s[:shared] for s in outputs["ours"]], [s[:shared] for s in outputs["PEFT"]])
    return flag_noise(row, ("ours", "ours_base", "PEFT"), timings, other_load)


def measure_routing(model_path, dtype, prompts, args, engine_model=None):
    """Time to first token of a batch of prompts on a MoA directory's engine: domain="base",
    named experts (round-robin), and routed (domain=None) with each routing strategy.
    engine_model: what the engine serves instead of model_path (a GGUF file of it)."""
    import moa_engine

    moa_dir = ensure_moa_dir(model_path, args.router_experts, args)
    engine = moa_engine.Engine(
        str(engine_model or model_path),
        experts=moa_dir,
        dtype=dtype,
        device=args.device,
        max_batch=len(prompts),
        max_seq_len=max(map(len, prompts)) + 2,
        max_prefill_tokens=max(4096, sum(map(len, prompts))),
    )
    ours, batch = OursRunner(engine), len(prompts)
    domains = engine.router_domains
    variants = {"base": (["base"] * batch, None), "named": ([domains[i % len(domains)] for i in range(batch)], None)}
    variants.update({strategy: ([None] * batch, strategy) for strategy in ROUTINGS})
    if args.quick:
        variants = {label: variants[label] for label in QUICK_ROUTING_VARIANTS}
    fns, results = {}, {}
    for label, (names, routing) in variants.items():
        keep = functools.partial(results.__setitem__, label)  # a reference only
        fns[label] = ours.generate_fn(prompts, 1, names, routing, on_results=keep)
    timings, other_load = time_interleaved(fns, args)
    tokens = sum(map(len, prompts))
    row = {"kind": "routing", "batch": batch, "experts": len(domains), "tokens": tokens, "prompt_tokens": tokens}
    row["ttft"] = {}
    for label in variants:
        figures = side_figures(tokens, timings[label])
        figures["ttft_ms"] = figures["median_ms"]
        chosen = {d for r in results[label] for d in r.routing.layer_domains}
        figures["experts_used"] = len(chosen - {"base"})
        row["ttft"][label] = figures
    named = row["ttft"]["named"]["median_ms"]
    row["over_named"] = {label: ratio(row["ttft"][label]["median_ms"], named) for label in variants}
    del engine, ours, fns, results
    gc.collect()
    return flag_noise(row, (), timings, other_load, spreads=[f["spread"] for f in row["ttft"].values()])


def ratio(a, b):
    return a / b if a and b else None


def measure_prefill(sides, prompts, args):
    """Prefill tokens/s: time to the first token of a batch of ragged prompts."""
    fns = {f"{side.label} ttft": side.generate_fn(prompts, 1) for side in sides.runners()}
    timings, other_load = time_interleaved(fns, args)
    tokens = sum(map(len, prompts))
    row = {"kind": "prefill", "batch": len(prompts), "tokens": tokens, "prompt_tokens": tokens}
    for side in sides.runners():
        row[side.label] = side_figures(tokens, timings[f"{side.label} ttft"])
    return finish_row(row, timings, other_load)


def measure_forward(sides, ids, args):
    """Forward tokens/s over an equal-length [B, P] batch (no padding on either side)."""
    fns = {f"{side.label} forward": side.forward_fn(ids) for side in sides.runners()}
    timings, other_load = time_interleaved(fns, args)
    batch, length = ids.shape
    row = {"kind": "forward", "batch": batch, "tokens": batch * length, "prompt_tokens": batch * length}
    for side in sides.runners():
        row[side.label] = side_figures(batch * length, timings[f"{side.label} forward"])
    return finish_row(row, timings, other_load)


def side_figures(tokens, t, per_step=None):
    """tokens/s from a Timing of the work that produced `tokens`; ms per step if given."""
    ok = t.median > 0
    figures = {
        "tokens_per_s": tokens / t.median if ok else None,
        "median_ms": t.median * 1e3,
        "spread": t.iqr / t.median if ok else None,
    }
    if per_step:
        figures["step_ms"] = t.median * 1e3 / per_step if ok else None
    return figures


def finish_row(row, timings, other_load):
    """Ratio ours / HF, the raw timings and the noise flag."""
    ours, hf = row["ours"]["tokens_per_s"], row.get("HF", {}).get("tokens_per_s")
    row["ours_over_hf"] = ours / hf if ours and hf else None
    return flag_noise(row, ("ours", "HF"), timings, other_load)


def flag_noise(row, sides, timings, other_load, spreads=()):
    """The raw timings, the other load and the noise flag (from the sides' spreads, and `spreads`)."""
    row["times"] = {name: t.to_json() for name, t in timings.items()}
    row["other_load_cores"] = other_load
    spreads = list(spreads) + [row[s]["spread"] for s in sides if s in row]
    row["noisy"] = (other_load or 0.0) > NOISY_LOAD_CORES or any(s is not None and s > NOISY_SPREAD for s in spreads)
    return row


def add_roofline(rows, copy):
    """Per decode row: the weights-read bound (weight_bytes / copy GB/s) over the step time."""
    for row in rows:
        if row["kind"] != "decode":
            continue
        bound_ms = row["weight_bytes"] / (copy["gb_per_s"] * 1e9) * 1e3
        row["roofline_step_ms"] = bound_ms
        # ours_base (moa): the base weights alone; ours_f32 (GGUF modes): the file in float32
        weights = {"ours_base": row.get("base_weight_bytes"), "ours_f32": row.get("f32_weight_bytes")}
        for side in ("ours", "HF", "ours_base", "ours_f32"):
            step = row.get(side, {}).get("step_ms")
            if step:
                nbytes = weights.get(side) or row["weight_bytes"]
                row[side]["weight_gb_per_s"] = nbytes / (step * 1e-3) / 1e9
                row[side]["roofline_fraction"] = nbytes / (copy["gb_per_s"] * 1e9) * 1e3 / step
