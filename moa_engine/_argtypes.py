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


def engine_from_args(args):
    """The Engine that the shared model options of `moa generate` and `moa serve` describe
    (--model, --experts, --dtype, --quantization, --max-batch, --max-seq-len, --routing)."""
    from moa_engine.engine import Engine

    quantization = getattr(args, "quantization", "auto")
    return Engine(
        args.model,
        quantization=None if quantization == "none" else quantization,
        experts=experts_arg(args.experts),
        dtype=args.dtype,
        max_batch=args.max_batch,
        max_seq_len=args.max_seq_len,
        routing=args.routing,
    )
