"""benchmarks/throughput.py: the GGUF modes. The engine serving a GGUF file natively (weight-only
quantized kernels, or the file's bfloat16 matrices as they are) against, in the same run:
  ours_f32   the float32 engine on the same file dequantized (Engine(file, quantization=None)),
  ours_bf16  (q4_1, q8_0, on CPUs with AVX512-BF16) the same engine with the opt-in bfloat16
             kernels (MOA_ENGINE_QUANT_ISA=avx512_bf16: products of 5 to 32 rows with the
             activations and dequantized weights rounded to bfloat16), set around each call,
  HF         transformers on those dequantized weights, in the mode's dtype,
  llama.cpp  on the same file with the same thread count, when its tools are found
             (--llama-cpp DIR, $LLAMA_CPP_BIN_DIR, or llama-bench / llama-batched-bench on PATH).

Modes: q4_1 (the default model's shipped file, or --model when it is a .gguf) and q8_0 (the float
weights written by `moa convert --quantize q8_0`, cached in $MOA_ENGINE_CACHE/gguf), in float32
activations; bf16 (`moa convert --quantize bf16`), served in bfloat16. Other dtypes are skipped.

llama.cpp's figures. It has no generate call that takes our prompts, so its own benchmarks run
right after each of our rows (not interleaved round by round):
  decode B   llama-batched-bench -npl B -npp P -ntg N (P = the mean length of our B prompts),
             its S_TG: B * N / the time of the N decode steps;
  prefill    llama-bench -p T -n 0 (T = the tokens of our prefill row, one sequence; ours is
             several ragged prompts totalling T), its tokens/s; -r --repeats.
Peak memory: a fresh process imports torch and moa_engine, then loads Engine(file, max_batch=1,
max_seq_len=2048) and runs one forward; its peak RSS (VmHWM) above the RSS after the imports,
against the file's size plus that KV cache (goal <= 1.3x).
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

if __package__:
    from . import _timing as timing
    from ._throughput_measure import measure_decode, measure_prefill, ratio
    from ._throughput_sides import DTYPES, HFRunner, OursRunner, Sides, hf_pad_id, quantized_base
else:
    import _timing as timing
    from _throughput_measure import measure_decode, measure_prefill, ratio
    from _throughput_sides import DTYPES, HFRunner, OursRunner, Sides, hf_pad_id, quantized_base

GGUF_MODES = ("q4_1", "q8_0", "bf16")
MEMORY_GOAL = 1.3  # peak RSS <= this x (file size + KV cache)
GOALS = {"decode B=1": 1.5, "decode B=32": 2.0, "prefill": 1.0}  # ours / llama.cpp, quantized files
BF16_GOALS = {"decode B=1": 1.0, "decode B=32": 1.0}  # ours / llama.cpp on the BF16 file


def goals(mode):
    """ours / llama.cpp goals of a GGUF mode's rows, by row name."""
    return BF16_GOALS if mode == "bf16" else GOALS


ROOFLINE_GOAL = 0.70  # batch-1 decode, of the memory roofline


class F32Runner(OursRunner):
    """The engine on the same file's float32 conversion."""

    label = "ours_f32"


class Bf16KernelsRunner(OursRunner):
    """The same engine with the opt-in bfloat16 kernels chosen for the duration of each call."""

    label = "ours_bf16"

    def generate_fn(self, *args, **kw):
        return self._with_kernels(super().generate_fn(*args, **kw))

    def forward_fn(self, ids):
        return self._with_kernels(super().forward_fn(ids))

    @staticmethod
    def _with_kernels(fn):
        from moa_engine import _C

        def run():
            previous = _C._quant_isa()
            _C._set_quant_isa("avx512_bf16")
            try:
                return fn()
            finally:
                _C._set_quant_isa(previous)

        return run


def gguf_file(qtype, args):
    """The GGUF file a mode serves."""
    if qtype == "q4_1":
        return quantized_base(args)
    from moa_engine.gguf_export import default_export_path, export_gguf

    path = default_export_path(args.model, qtype)
    if not path.is_file():
        started = time.perf_counter()
        export_gguf(args.model, path, qtype, progress=False)
        print(f"  {qtype}: wrote {path} in {time.perf_counter() - started:.1f} s")
    return str(path)


def gguf_mode(qtype):
    """The build function of the mode serving a `qtype` GGUF file."""

    def build(model_path, dtype, workload, args):
        import moa_engine
        from moa_engine.models import resolve_model

        path = gguf_file(qtype, args)
        options = dict(
            dtype=dtype,
            device=args.device,
            max_batch=max(max(args.mode_batches[qtype]), len(workload.prefill_prompts)),
            max_seq_len=workload.longest_prompt + args.new_tokens + 1,
            max_prefill_tokens=max(4096, sum(map(len, workload.decode_prompts + workload.prefill_prompts))),
        )
        engine = moa_engine.Engine(path, **options)
        f32 = moa_engine.Engine(path, quantization=None, **dict(options, dtype="float32"))
        hf = None
        if not args.no_hf:
            from transformers import AutoModelForCausalLM

            folder = resolve_model(path)  # the file's float32 conversion: the weights ours_f32 holds
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[dtype]).eval()
            hf = HFRunner(model, hf_pad_id(model, engine))
        extra = [F32Runner(f32)]
        if qtype != "bf16" and timing.quant_isa_available("avx512_bf16"):
            extra.append(Bf16KernelsRunner(engine))
        sides = Sides(OursRunner(engine), hf, engine.weight_bytes, extra=extra)
        sides.mode, sides.gguf_path = qtype, path
        sides.f32_weight_bytes = f32.weight_bytes
        sides.llama_cpp = LlamaCpp.find(args)
        return sides

    return build


def measure_gguf(sides, model_path, dtype, workload, args):
    """Decode at each batch and prefill, each with llama.cpp's figure beside it; memory first."""
    memory = peak_memory(sides.gguf_path, dtype, args)
    for index, batch in enumerate(args.mode_batches[sides.mode]):
        prompts = workload.decode_prompts[:batch]
        row = measure_decode(sides, prompts, args.new_tokens, args)
        row.update(gguf=sides.gguf_path, weight_bytes=sides.weight_bytes, f32_weight_bytes=sides.f32_weight_bytes)
        row["ours_over_f32"] = ratio(row["ours"]["tokens_per_s"], row["ours_f32"]["tokens_per_s"])
        if sides.llama_cpp is not None:
            mean_prompt = round(statistics.mean(map(len, prompts)))
            row["llama.cpp"] = sides.llama_cpp.decode(sides.gguf_path, batch, mean_prompt, args.new_tokens, args)
            row["ours_over_llama_cpp"] = ratio(row["ours"]["tokens_per_s"], row["llama.cpp"]["tokens_per_s"])
            if "ours_bf16" in row:
                row["ours_bf16_over_llama_cpp"] = ratio(
                    row["ours_bf16"]["tokens_per_s"], row["llama.cpp"]["tokens_per_s"]
                )
        if "ours_bf16" in row:
            row["ours_bf16_over_ours"] = ratio(row["ours_bf16"]["tokens_per_s"], row["ours"]["tokens_per_s"])
        if index == 0:
            row["memory"] = memory
        yield row
    row = measure_prefill(sides, workload.prefill_prompts, args)
    row.update(gguf=sides.gguf_path, weight_bytes=sides.weight_bytes)
    row["ours_over_f32"] = ratio(row["ours"]["tokens_per_s"], row["ours_f32"]["tokens_per_s"])
    if sides.llama_cpp is not None:
        tokens = sum(map(len, workload.prefill_prompts))
        row["llama.cpp"] = sides.llama_cpp.prefill(sides.gguf_path, tokens, args)
        row["ours_over_llama_cpp"] = ratio(row["ours"]["tokens_per_s"], row["llama.cpp"]["tokens_per_s"])
    yield row


def peak_memory(path, dtype, args):
    """Peak RSS of a fresh process serving `path` in `dtype` (one slot of 2048 tokens, one
    forward), above its RSS once torch and moa_engine are imported, against the goal."""
    code = (
        "import re, sys, torch\n"
        "def status(key):\n"
        "    text = open('/proc/self/status').read()\n"
        "    return int(re.search(key + r':\\s+(\\d+) kB', text).group(1)) * 1024\n"
        f"torch.set_num_threads({args.threads})\n"
        "from moa_engine import Engine\n"
        "baseline = status('VmRSS')\n"
        "e = Engine(sys.argv[1], dtype=sys.argv[2], max_batch=1, max_seq_len=2048)\n"
        "e.forward(torch.tensor([[1, 2, 3]]))\n"
        "c = e.config\n"
        "kv = 2 * c['num_layers'] * c['num_kv_heads'] * c['head_dim'] * 2048 * torch.finfo(getattr(torch, sys.argv[2])).bits // 8\n"
        "print(status('VmHWM'), baseline, kv, e.weight_bytes)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, path, dtype], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"error": done.stderr[-500:]}
    peak, baseline, kv, weights = map(int, done.stdout.split()[-4:])
    size = os.path.getsize(path)
    return {
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "engine_rss_bytes": peak - baseline,
        "file_bytes": size,
        "kv_cache_bytes": kv,
        "weight_bytes": weights,
        "over_file_plus_kv": (peak - baseline) / (size + kv),
        "goal": MEMORY_GOAL,
    }


# ---------------------------------------------------------------------------------------------
# llama.cpp
# ---------------------------------------------------------------------------------------------


class LlamaCpp:
    """llama.cpp's llama-bench and llama-batched-bench."""

    def __init__(self, folder):
        self.bench = os.path.join(folder, "llama-bench")
        self.batched = os.path.join(folder, "llama-batched-bench")

    @classmethod
    def find(cls, args):
        for folder in (getattr(args, "llama_cpp", None), os.environ.get("LLAMA_CPP_BIN_DIR")):
            if folder and all(os.path.isfile(os.path.join(folder, t)) for t in ("llama-bench", "llama-batched-bench")):
                return cls(folder)
        bench = shutil.which("llama-bench")
        if bench and shutil.which("llama-batched-bench"):
            return cls(os.path.dirname(bench))
        return None

    def version(self):
        done = subprocess.run([self.batched, "--version"], capture_output=True, text=True, timeout=60)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("version")]
        return lines[0] if done.returncode == 0 and lines else None

    def prefill(self, path, tokens, args):
        cmd = [self.bench, "-m", path, "-t", str(args.threads), "-p", str(tokens), "-n", "0"]
        cmd += ["-r", str(args.repeats), "-o", "json"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-1000:]}")
        result = json.loads(done.stdout)[0]
        return {"tokens_per_s": result["avg_ts"], "spread": result["stddev_ts"] / result["avg_ts"], "command": cmd}

    def decode(self, path, batch, prompt_tokens, new_tokens, args):
        ctx = batch * (prompt_tokens + new_tokens) + 16
        cmd = [self.batched, "-m", path, "-t", str(args.threads), "-c", str(max(ctx, 512)), "-b", "2048"]
        cmd += ["-ub", "512", "-npp", str(prompt_tokens), "-ntg", str(new_tokens), "-npl", str(batch)]
        samples = []
        for _ in range(max(1, min(args.repeats, 3))):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-1000:]}")
            samples.append(parse_batched_bench(done.stdout + done.stderr))
        tokens_per_s = statistics.median(samples)
        return {
            "tokens_per_s": tokens_per_s,
            "step_ms": batch / tokens_per_s * 1e3,
            "samples": samples,
            "command": cmd,
        }


def parse_batched_bench(text):
    """S_TG t/s of llama-batched-bench's table (its only data row for one -npl)."""
    header = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "S_TG t/s" in cells:
            header = cells
        elif header and len(cells) == len(header) and re.fullmatch(r"[\d.]+", cells[0] or "x"):
            return float(cells[header.index("S_TG t/s")])
    raise RuntimeError(f"no S_TG row in llama-batched-bench's output: {text[-500:]}")
