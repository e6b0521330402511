"""benchmarks/throughput.py: the report. The tables and goals on stdout, the JSON payload and the plot."""

import os
import tempfile

import torch

if __package__:
    from . import _timing as timing
    from ._throughput_measure import MIN_REPEATS, NOISY_LOAD_CORES, NOISY_SPREAD, ROUTINGS
    from ._throughput_sides import FORWARD_BATCH, MOA_ALPHA, MOA_RANK, PROMPT_TOKENS, ROUTER_BATCH, ROUTER_SEED
else:
    import _timing as timing
    from _throughput_measure import MIN_REPEATS, NOISY_LOAD_CORES, NOISY_SPREAD, ROUTINGS
    from _throughput_sides import FORWARD_BATCH, MOA_ALPHA, MOA_RANK, PROMPT_TOKENS, ROUTER_BATCH, ROUTER_SEED

OVERHEAD_GOAL, PEFT_GOAL = 1.15, 8.0  # moa step / base step at E = 8, B = 32; ours / PEFT tokens/s


def _fmt(value, spec, suffix=""):
    return "-" if value is None else format(value, spec) + suffix


def print_tables(rows, copy, has_hf):
    base = [r for r in rows if not r["mode"].startswith("moa")]
    moa = [r for r in rows if r["mode"].startswith("moa")]
    if base:
        print_table(base, copy, has_hf)
        print_gguf_goals(base)
    if moa:
        print("\n" if base else "", end="")
        print_moa_tables(moa, copy, has_hf)


DECODE_HEADERS = (
    "mode",
    "dtype",
    "kind",
    "B",
    "experts",
    "tokens",
    "ours tok/s",
    "PEFT tok/s",
    "ours/PEFT",
    "ours ms/step",
    "base ms/step",
    "overhead",
    "ours % roof",
    "agree",
    "others",
)
ROUTING_HEADERS = (
    "mode",
    "dtype",
    "kind",
    "B",
    "experts",
    "prompt tokens",
    "domain",
    "TTFT ms",
    "prefill tok/s",
    "vs named",
    "experts used",
    "others",
)


def print_moa_tables(rows, copy, has_hf):
    print(timing.format_table(list(DECODE_HEADERS), moa_decode_table(rows)))
    routing = moa_routing_table(rows)
    if routing:
        print()
        print(timing.format_table(list(ROUTING_HEADERS), routing))
    print_moa_legend(rows, has_hf)
    print_goals(rows, has_hf)


def moa_decode_table(rows):
    """A row per decode measurement: ours against PEFT and against the base model."""
    table = []
    for r in rows:
        if r["kind"] != "decode":
            continue
        ours, base, peft = r["ours"], r["ours_base"], r.get("PEFT", {})
        table.append(
            [
                r["mode"],
                r["dtype"],
                r["kind"],
                r["batch"],
                r["experts"],
                r["tokens"],
                _fmt(ours["tokens_per_s"], ".0f"),
                _fmt(peft.get("tokens_per_s"), ".0f"),
                _fmt(r["ours_over_peft"], ".1f", "x"),
                _fmt(ours["step_ms"], ".2f"),
                _fmt(base["step_ms"], ".2f"),
                _fmt(r["overhead"], ".3f", "x"),
                _fmt(ours.get("roofline_fraction"), ".0%"),
                _fmt(r.get("agreement"), ".2f"),
                _fmt(r["other_load_cores"], ".2f", " NOISY" if r["noisy"] else ""),
            ]
        )
    return table


def moa_routing_table(rows):
    """A row per routing variant of each routing measurement: time to first token."""
    table = []
    for r in rows:
        if r["kind"] != "routing":
            continue
        for label, figures in r["ttft"].items():
            domain = label if label in ("base", "named") else f"None, {label}"
            table.append(
                [
                    r["mode"],
                    r["dtype"],
                    r["kind"],
                    r["batch"],
                    r["experts"],
                    r["tokens"],
                    domain,
                    _fmt(figures["ttft_ms"], ".1f"),
                    _fmt(figures["tokens_per_s"], ".0f"),
                    _fmt(r["over_named"][label], ".3f", "x"),
                    figures["experts_used"],
                    _fmt(r["other_load_cores"], ".2f", " NOISY" if r["noisy"] else ""),
                ]
            )
    return table


def print_moa_legend(rows, has_hf):
    decode = [r for r in rows if r["kind"] == "decode"]
    peft = f"{decode[0]['peft_tokens']}" if decode and "peft_tokens" in decode[0] else "-"
    print(
        f"\nmoa decode: experts = distinct rank-{MOA_RANK} experts in the batch (request i gets e<i mod experts>; "
        f"{decode[0]['experts_loaded'] if decode else '-'} loaded); tokens = N timed per sequence for ours "
        f"(PEFT: N = {peft}); tok/s = B * N / ([N + 1 tokens] - [1 token]) generate time.\n"
        "PEFT: transformers + PEFT generate(adapter_names=[per row]) on one PeftModel holding every adapter.\n"
        'base ms/step: the same engine and prompts with domain="base"; overhead = ours ms/step / base ms/step '
        f"(goal <= {OVERHEAD_GOAL} at 8 experts, B = 32); ours/PEFT goal >= {PEFT_GOAL:g}x.\n"
        "% roof: (base weights + the batch's experts, in the engine dtype) / copy bandwidth / step time.\n"
        "agree: as above, ours against PEFT over the tokens both made.\n"
        "routing: time to first token of the batch; domain None = routed by the MoA directory's random routers "
        "with that strategy; vs named = TTFT / TTFT with named experts (round-robin); experts used = distinct "
        "experts the requests ended up with (any layer)." + ("" if has_hf else "\n--no-hf: PEFT was not run.")
    )


def print_goals(rows, has_hf):
    """One line per goal: the figures it is judged on."""
    decode = [r for r in rows if r["kind"] == "decode"]
    at = [r for r in decode if r["experts"] == 8 and r["batch"] == 32]
    for r in at:
        verdict = "met" if r["overhead"] is not None and r["overhead"] <= OVERHEAD_GOAL else "NOT met"
        print(
            f"goal overhead <= {OVERHEAD_GOAL} at 8 experts, B = 32, {r['dtype']}: {_fmt(r['overhead'], '.3f', 'x')} "
            f"({verdict}{', NOISY' if r['noisy'] else ''})"
        )
    if has_hf and decode:
        ratios = [r["ours_over_peft"] for r in decode if r["ours_over_peft"]]
        if ratios:
            short = sum(r < PEFT_GOAL for r in ratios)
            verdict = "met in every row" if not short else f"NOT met in {short}"
            print(
                f"goal ours/PEFT >= {PEFT_GOAL:g}x: {min(ratios):.1f}x to {max(ratios):.1f}x over "
                f"{len(ratios)} rows ({verdict})"
            )
    for r in rows:
        if r["kind"] == "routing":
            parts = [f"{label} {r['over_named'][label]:.3f}x" for label in ROUTINGS if r["over_named"].get(label)]
            print(f"routing TTFT / named TTFT, {r['dtype']}: {', '.join(parts)}")


def print_gguf_goals(rows):
    """The GGUF modes' goals: ours / llama.cpp, the batch-1 roofline, peak memory."""
    if __package__:
        from ._throughput_gguf import GGUF_MODES, ROOFLINE_GOAL, goals
    else:
        from _throughput_gguf import GGUF_MODES, ROOFLINE_GOAL, goals
    for r in rows:
        if r["mode"] not in GGUF_MODES:
            continue
        name = "prefill" if r["kind"] == "prefill" else f"decode B={r['batch']}"
        noisy = ", NOISY" if r["noisy"] else ""
        if name in goals(r["mode"]):
            value, goal = r.get("ours_over_llama_cpp"), goals(r["mode"])[name]
            verdict = "no llama.cpp" if value is None else ("met" if value >= goal else "NOT met")
            print(f"goal {r['mode']} {name}: ours/llama.cpp >= {goal:g}x: {_fmt(value, '.2f', 'x')} ({verdict}{noisy})")
            bf16k = r.get("ours_bf16_over_llama_cpp")
            if bf16k is not None and r["kind"] == "decode" and r["batch"] > 1:
                verdict = "met" if bf16k >= goal else "NOT met"
                print(
                    f"goal {r['mode']} {name}, opt-in bfloat16 kernels: ours/llama.cpp >= {goal:g}x: "
                    f"{_fmt(bf16k, '.2f', 'x')} ({verdict}{noisy})"
                )
        if r["kind"] == "decode" and r["batch"] == 1:
            roof = r["ours"].get("roofline_fraction")
            verdict = "met" if roof is not None and roof >= ROOFLINE_GOAL else "NOT met"
            print(
                f"goal {r['mode']} decode B=1: >= {ROOFLINE_GOAL:.0%} of the roofline: {_fmt(roof, '.0%')} ({verdict}{noisy})"
            )
        memory = r.get("memory")
        if memory and "over_file_plus_kv" in memory:
            verdict = "met" if memory["over_file_plus_kv"] <= memory["goal"] else "NOT met"
            print(
                f"goal {r['mode']} peak RSS <= {memory['goal']:g}x (file + KV cache): "
                f"{memory['engine_rss_bytes'] / 2**20:.0f} MiB above the imports = "
                f"{memory['over_file_plus_kv']:.2f}x ({verdict})"
            )


def print_table(rows, copy, has_hf):
    headers = [
        "mode",
        "dtype",
        "kind",
        "B",
        "tokens",
        "ours tok/s",
        "HF tok/s",
        "ours/HF",
        "ours ms/step",
        "HF ms/step",
        "ours % roof",
        "HF % roof",
        "f32 tok/s",
        "ours/f32",
        "llama.cpp tok/s",
        "ours/llama.cpp",
        "bf16k tok/s",
        "bf16k/llama.cpp",
        "agree",
        "others",
    ]
    table = []
    for r in rows:
        ours, hf, f32, lcpp = r["ours"], r.get("HF", {}), r.get("ours_f32", {}), r.get("llama.cpp", {})
        table.append(
            [
                r["mode"],
                r["dtype"],
                r["kind"],
                r["batch"],
                r["tokens"],
                _fmt(ours["tokens_per_s"], ".0f"),
                _fmt(hf.get("tokens_per_s"), ".0f"),
                _fmt(r["ours_over_hf"], ".2f", "x"),
                _fmt(ours.get("step_ms"), ".2f"),
                _fmt(hf.get("step_ms"), ".2f"),
                _fmt(ours.get("roofline_fraction"), ".0%"),
                _fmt(hf.get("roofline_fraction"), ".0%"),
                _fmt(f32.get("tokens_per_s"), ".0f"),
                _fmt(r.get("ours_over_f32"), ".2f", "x"),
                _fmt(lcpp.get("tokens_per_s"), ".0f"),
                _fmt(r.get("ours_over_llama_cpp"), ".2f", "x"),
                _fmt(r.get("ours_bf16", {}).get("tokens_per_s"), ".0f"),
                _fmt(r.get("ours_bf16_over_llama_cpp"), ".2f", "x"),
                _fmt(r.get("agreement"), ".2f"),
                _fmt(r["other_load_cores"], ".2f", " NOISY" if r["noisy"] else ""),
            ]
        )
    print(timing.format_table(headers, table))
    print(
        "\ndecode: tokens = N new tokens per sequence timed; tok/s = B * N / ([N + 1 tokens] - [1 token]) "
        "generate time, median of per-round differences.\n"
        "prefill: tokens = real prompt tokens of B ragged prompts; tok/s = tokens / time to first token "
        "(HF left-pads).\n"
        "forward: one forward over [B, tokens / B] equal-length ids, full logits.\n"
        f"% roof = (weight_bytes / copy bandwidth) / step time; copy bandwidth {copy['gb_per_s']:.1f} GB/s "
        "counts read + write bytes (a copy of X bytes moves 2X); weights counted as read bytes only.\n"
        "agree: mean fraction of each sequence's tokens before ours and HF first differ (greedy).\n"
        "GGUF modes (q4_1, q8_0, bf16): ours serves the file natively; f32 = the float32 engine on its "
        "float32 conversion, HF = transformers on that in the row's dtype; llama.cpp = llama-batched-bench S_TG (decode, -npp the "
        "mean prompt length) and llama-bench -p (prefill: one sequence of the row's tokens), run "
        "after each row with the same threads; bf16k = the same engine with the opt-in bfloat16 kernels "
        "(MOA_ENGINE_QUANT_ISA=avx512_bf16), timed interleaved with it.\n"
        f"others: CPU cores other processes kept busy; NOISY above {NOISY_LOAD_CORES} or when a "
        f"timing's IQR exceeds {NOISY_SPREAD:.0%} of its median: rerun on a quiet machine."
        + ("" if has_hf else "\n--no-hf: HF was not run, so there are no ratios.")
    )


def build_payload(args, env, model_path, copy, rows, elapsed):
    return {
        "benchmark": "throughput",
        "model": str(model_path),
        "environment": env,
        "settings": {
            "modes": args.mode,
            "dtypes": args.dtype,
            "batches": args.mode_batches,
            "new_tokens": args.new_tokens,
            "moa": {
                "experts": args.experts,
                "rank": MOA_RANK,
                "alpha": MOA_ALPHA,
                "peft_new_tokens": args.peft_new_tokens,
                "router_experts": args.router_experts,
                "router_batch": ROUTER_BATCH,
                "routings": list(ROUTINGS),
                "router_seed": ROUTER_SEED,
                "adapter_cache": args.adapter_cache,
                "goals": {"overhead_at_8_experts_B32_max": OVERHEAD_GOAL, "ours_over_peft_min": PEFT_GOAL},
            },
            "prefill_tokens": args.prefill_tokens,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "budget_s_per_row": args.budget,
            "min_repeats": MIN_REPEATS,
            "quick": args.quick,
            "hf": not args.no_hf,
            "threads": torch.get_num_threads(),
            "prompt_tokens_range": list(PROMPT_TOKENS),
            "forward_batch": FORWARD_BATCH,
            "variants interleaved": True,
            "noisy_above_other_load_cores": NOISY_LOAD_CORES,
            "noisy_above_spread": NOISY_SPREAD,
        },
        "method": {
            "decode": "B * N / median over rounds of (t[generate N + 1 new tokens] - t[generate 1 new token])",
            "step_ms": "that difference / N",
            "ttft_ms": "median t[generate 1 new token]: prefill of the B prompts + the first token",
            "prefill": "real prompt tokens / median t[generate 1 new token] (HF left-padded)",
            "forward": "B * P / median t[forward over equal-length ids [B, P]], full logits",
            "ours": "moa_engine._C.Engine.generate(requests), greedy, ignore_eos=True",
            "HF": "transformers generate, greedy, min_new_tokens = max_new_tokens, left padding + attention mask",
            "roofline_fraction": "(weight_bytes / copy gb_per_s) / step time; weights counted as read bytes, "
            "copy gb_per_s counts read + write bytes",
            "agreement": "mean over sequences of (tokens before the first ours / HF difference) / N + 1",
            "spread": "IQR / median of the timed quantity (max - min below 4 samples)",
            "moa decode": "rows with 'experts': ours = the engine with every expert loaded, request i naming "
            "expert e<i mod experts>; ours_base = the same engine and prompts with domain='base'; PEFT = "
            "PeftModel.generate(adapter_names=[per row]) with every adapter loaded, left padding, greedy, "
            "min_new_tokens = max_new_tokens, peft_tokens new tokens timed; all six calls interleaved per round",
            "overhead": "ours step_ms / ours_base step_ms (overhead_paired: median over rounds of the ratio of "
            "the decode times)",
            "ours_over_peft": "ours tokens_per_s / PEFT tokens_per_s (each B * its N / its decode time)",
            "moa weight_bytes": "base weights + experts in the batch * expert_bytes (LoRA A and B in the engine "
            "dtype); ours_base's roofline uses base_weight_bytes",
            "routing": "median t[generate 1 new token] of the batch on Engine(model, experts=MoA dir with random "
            "routers): domain 'base', named (round-robin), None with routing last / per_layer / vote; "
            "over_named = TTFT / named TTFT",
        },
        "copy_bandwidth": copy,
        "rows": rows,
        "total_s": elapsed,
    }


def write_plot(rows, path, title):
    """One line of panels per kind of mode. base: decode tokens/s vs batch, one panel per dtype
    (ours and HF), and a prefill panel. moa: decode tokens/s vs experts, one panel per dtype
    (ours, PEFT, ours base-only, per batch), the LoRA overhead, and the routing TTFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moa_engine._io import atomic_copy

    base = [r for r in rows if not r["mode"].startswith("moa")]
    moa = [r for r in rows if r["mode"].startswith("moa")]
    lines = []
    if base:
        lines.append(("base", base, len(_dtypes(base)) + 1))
    if moa:
        lines.append(("moa", moa, len(_dtypes(moa)) + 2))
    columns = max(count for _, _, count in lines)
    fig, axes = plt.subplots(len(lines), columns, figsize=(5 * columns, 4.2 * len(lines)), squeeze=False)
    for panels, (kind, group, count) in zip(axes, lines):
        for ax in panels[count:]:
            ax.set_visible(False)
        dtypes = _dtypes(group)
        if kind == "base":
            modes = list(dict.fromkeys(r["mode"] for r in group))
            for ax, dtype in zip(panels, dtypes):
                plot_decode_panel(ax, [r for r in group if r["dtype"] == dtype], modes, dtype)
            plot_prefill_panel(panels[count - 1], group, dtypes, modes)
        else:
            for ax, dtype in zip(panels, dtypes):
                plot_moa_decode_panel(ax, [r for r in group if r["dtype"] == dtype and r["kind"] == "decode"], dtype)
            plot_overhead_panel(panels[len(dtypes)], [r for r in group if r["kind"] == "decode"])
            plot_routing_panel(panels[len(dtypes) + 1], [r for r in group if r["kind"] == "routing"])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as folder:
        scratch = os.path.join(folder, "plot.png")
        fig.savefig(scratch, dpi=110)
        atomic_copy(scratch, path)
    plt.close(fig)


def _dtypes(rows):
    return list(dict.fromkeys(r["dtype"] for r in rows))


def _experts_axis(ax, experts):
    if experts:
        ax.margins(x=0.15, y=0.12)
        ax.set_xscale("log", base=2)
        ax.set_xticks(experts, [str(e) for e in experts])
        ax.minorticks_off()
    ax.set_xlabel("distinct experts in the batch")
    ax.grid(alpha=0.3)


def plot_moa_decode_panel(ax, rows, dtype):
    """Decode tokens/s vs experts in the batch: ours and PEFT per batch, ours base-only dotted."""
    batches = sorted({r["batch"] for r in rows})
    colors = dict(zip(batches, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))
    for batch in batches:
        series = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["experts"])
        experts = [r["experts"] for r in series]
        color = colors.get(batch)
        for side, style, name in (("ours", "o-", "ours"), ("PEFT", "s--", "PEFT"), ("ours_base", ":", "ours, base")):
            values = [r.get(side, {}).get("tokens_per_s") for r in series]
            if any(v is not None for v in values):
                ax.plot(
                    experts,
                    [v or float("nan") for v in values],
                    style,
                    color=color,
                    label=f"{name} B={batch}",
                    alpha=0.6 if side == "ours_base" else 1.0,
                )
        for r in series:
            if r["ours_over_peft"]:
                ax.annotate(
                    f"{r['ours_over_peft']:.1f}x",
                    (r["experts"], r["ours"]["tokens_per_s"]),
                    textcoords="offset points",
                    xytext=(3, 5),
                    fontsize=7,
                    color=color,
                )
    _experts_axis(ax, sorted({r["experts"] for r in rows}))
    ax.set_ylim(bottom=0)
    noisy = any(r["noisy"] for r in rows)
    ax.set_title(f"MoA decode, {dtype}: ours vs PEFT (x: ours/PEFT)" + (" (NOISY)" if noisy else ""), fontsize=9)
    ax.set_ylabel("new tokens / s")
    ax.legend(fontsize=7, ncol=2)


def plot_overhead_panel(ax, rows):
    """LoRA overhead: ours step / the same engine's base-only step, vs experts in the batch."""
    for dtype in _dtypes(rows):
        for batch in sorted({r["batch"] for r in rows}):
            series = sorted((r for r in rows if (r["dtype"], r["batch"]) == (dtype, batch)), key=lambda r: r["experts"])
            if series:
                ax.plot(
                    [r["experts"] for r in series],
                    [r["overhead"] or float("nan") for r in series],
                    "o-",
                    label=f"{dtype} B={batch}",
                )
    ax.axhline(OVERHEAD_GOAL, color="red", linestyle="--", linewidth=1, label=f"goal {OVERHEAD_GOAL} (8 experts, B=32)")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    _experts_axis(ax, sorted({r["experts"] for r in rows}))
    noisy = any(r["noisy"] for r in rows)
    ax.set_title("LoRA overhead: MoA step / base step, same engine" + (" (NOISY)" if noisy else ""), fontsize=9)
    ax.set_ylabel("step time ratio")
    ax.legend(fontsize=7)


def plot_routing_panel(ax, rows):
    """Time to first token per domain choice, one group per dtype; routed / named annotated."""
    labels = list(dict.fromkeys(label for r in rows for label in r["ttft"]))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [d + (i - (len(labels) - 1) / 2) * width for d in range(len(rows))]
        values = [r["ttft"][label]["ttft_ms"] if label in r["ttft"] else 0 for r in rows]
        name = label if label in ("base", "named") else f"routed, {label}"
        ax.bar(xs, values, width, label=name)
        for x, r in zip(xs, rows):
            if label not in ("base", "named") and r["over_named"].get(label) and label in r["ttft"]:
                ax.annotate(
                    f"{r['over_named'][label]:.2f}x",
                    (x, r["ttft"][label]["ttft_ms"]),
                    textcoords="offset points",
                    xytext=(0, 2),
                    ha="center",
                    fontsize=7,
                )
    ax.set_xticks(range(len(rows)), [f"{r['dtype']}\nB={r['batch']}, {r['experts']} experts" for r in rows], fontsize=8)
    ax.margins(y=0.15)
    noisy = any(r["noisy"] for r in rows)
    ax.set_title("routing: time to first token (x: vs named)" + (" (NOISY)" if noisy else ""), fontsize=9)
    ax.set_ylabel("ms")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)


def _series_label(side, mode, modes):
    return side if len(modes) == 1 else f"{side} ({mode})"


def plot_decode_panel(ax, rows, modes, dtype):
    for mode in modes:
        decode = sorted((r for r in rows if r["mode"] == mode and r["kind"] == "decode"), key=lambda r: r["batch"])
        batches = [r["batch"] for r in decode]
        for side, style in (("ours", "o-"), ("HF", "s--")):
            values = [r.get(side, {}).get("tokens_per_s") for r in decode]
            if any(v is not None for v in values):
                label = _series_label(side, mode, modes)
                ax.plot(batches, [v or float("nan") for v in values], style, label=label)
        for r in decode:
            if r["ours_over_hf"]:
                ax.annotate(
                    f"{r['ours_over_hf']:.1f}x",
                    (r["batch"], r["ours"]["tokens_per_s"]),
                    textcoords="offset points",
                    xytext=(4, 6),
                    fontsize=8,
                )
        if batches:
            ax.margins(x=0.15, y=0.12)
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
    noisy = any(r["noisy"] for r in rows if r["kind"] == "decode")
    ax.set_title(f"decode, {dtype}" + (" (NOISY)" if noisy else ""))
    ax.set_xlabel("batch size")
    ax.set_ylabel("new tokens / s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_prefill_panel(ax, rows, dtypes, modes):
    groups = [(m, d, k) for m in modes for d in dtypes for k in ("prefill", "forward")]
    width = 0.38
    for offset, side in ((-width / 2, "ours"), (width / 2, "HF")):
        values = []
        for mode, dtype, kind in groups:
            match = [r for r in rows if (r["mode"], r["dtype"], r["kind"]) == (mode, dtype, kind)]
            values.append(match[0].get(side, {}).get("tokens_per_s") if match else None)
        if any(v is not None for v in values):
            xs = [i + offset for i in range(len(groups))]
            ax.bar(xs, [v or 0 for v in values], width, label=side)
    for i, (mode, dtype, kind) in enumerate(groups):
        match = [r for r in rows if (r["mode"], r["dtype"], r["kind"]) == (mode, dtype, kind)]
        if match and match[0]["ours_over_hf"]:
            top = max(match[0]["ours"]["tokens_per_s"], match[0]["HF"]["tokens_per_s"])
            ax.annotate(
                f"{match[0]['ours_over_hf']:.2f}x",
                (i, top),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                fontsize=8,
            )
    ax.margins(y=0.12)
    names = [f"{d}\n{k}" if len(modes) == 1 else f"{m} {d}\n{k}" for m, d, k in groups]
    ax.set_xticks(range(len(groups)), names, fontsize=8)
    noisy = any(r["noisy"] for r in rows if r["kind"] != "decode")
    ax.set_title("prefill (time to first token) and forward" + (" (NOISY)" if noisy else ""))
    ax.set_ylabel("prompt tokens / s")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def plot_title(env, copy, args):
    peft = f" (PEFT: N={args.peft_new_tokens})" if "moa" in args.mode and not args.no_hf else ""
    return (
        f"moa_engine vs HF transformers, {env['device_name']}, {env['threads']} threads, "
        f"N={args.new_tokens} new tokens{peft}, copy {copy['gb_per_s']:.1f} GB/s (read+write)"
    )
