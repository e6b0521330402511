"""argparse types shared by the `moa` subcommands."""

from __future__ import annotations

import argparse


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def experts_arg(values):
    """--experts: one MoA directory, or NAME=PEFT_DIR pairs."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    named = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--experts: expected one MoA directory or NAME=PEFT_DIR pairs, got {value!r}")
        named[name] = path
    return named


QUANTIZATION_CHOICES = ("auto", "none", "q8_0", "q4_0", "q4_1", "q4_k")
QUANTIZATION_HELP = (
    "auto: a .gguf file keeps its types (default); none: float32 throughout; "
    "q8_0 / q4_0 / q4_1 / q4_k: quantize the float weights on load"
)


BACKEND_CHOICES = ("auto", "cpu", "reference", "cuda")


def add_device_args(p):
    """--device and --backend, shared by `moa generate` and `moa serve`."""
    p.add_argument("--device", default="cpu", help="cpu (default), or cuda / cuda:N in a build with CUDA")
    p.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help="where the forward runs: auto ($MOA_ENGINE_BACKEND, else the device's), cpu, reference (ATen only), cuda",
    )


def engine_from_args(args):
    """The Engine that the shared model options of `moa generate` and `moa serve` describe
    (--model, --experts, --dtype, --quantization, --device, --backend, --max-batch,
    --max-seq-len, --routing)."""
    from moa_engine.engine import Engine

    quantization = getattr(args, "quantization", "auto")
    return Engine(
        args.model,
        quantization=None if quantization == "none" else quantization,
        experts=experts_arg(args.experts),
        dtype=args.dtype,
        device=getattr(args, "device", "cpu"),
        backend=getattr(args, "backend", "auto"),
        max_batch=args.max_batch,
        max_seq_len=args.max_seq_len,
        routing=args.routing,
    )
