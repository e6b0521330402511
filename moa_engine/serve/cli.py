"""`moa serve`: the command line of the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import os
import sys

from moa_engine._argtypes import (
    QUANTIZATION_CHOICES,
    QUANTIZATION_HELP,
    add_device_args,
    engine_from_args,
    positive_float,
    positive_int,
)
from moa_engine.routing import STRATEGIES


def add_serve_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the model and its experts over an OpenAI-compatible HTTP API",
        description="Serves the engine over OpenAI's API (/v1/models, /v1/completions, "
        "/v1/chat/completions, streaming), one continuous batch for every client. `model` names the "
        "served model (routed by the MoA routers when there are any), an expert, or 'base'. Also "
        "/health and /metrics (Prometheus). Prints 'moa serve: ready on http://HOST:PORT' to stderr "
        "once it listens; SIGTERM or SIGINT stops it gracefully. See docs/server.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", metavar="PATH|GGUF", help="model folder or .gguf file (default: the embedded default model)"
    )
    p.add_argument(
        "--experts",
        action="append",
        metavar="MOA_DIR|NAME=PEFT_DIR",
        help="a MoA directory, or named PEFT LoRA folders (repeatable)",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="port (0: a free one, announced in the ready line)")
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $MOA_API_KEY, else none)"
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the routed model's name (default: the MoA dir's or model's folder name)",
    )
    p.add_argument("--routing", choices=STRATEGIES, help="routing strategy (default: the MoA directory's)")
    p.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="float16: CUDA only"
    )
    add_device_args(p)
    p.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default="auto", help=QUANTIZATION_HELP)
    p.add_argument("--max-batch", type=positive_int, default=16, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max-seq-len", type=positive_int, default=2048, help="prompt + generated tokens per sequence")
    p.add_argument("--max-queue", type=positive_int, default=256, help="requests waiting for a slot before 429")
    p.add_argument(
        "--allow-runtime-experts", action="store_true", help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter"
    )
    p.add_argument(
        "--shutdown-timeout",
        type=positive_float,
        default=10.0,
        help="seconds in-flight requests get to finish on SIGTERM",
    )
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    from moa_engine.serve.runner import run

    api_key = args.api_key if args.api_key is not None else os.environ.get("MOA_API_KEY") or None
    try:
        engine = engine_from_args(args)
        run(
            engine,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            served_model_name=args.served_model_name,
            api_key=api_key,
            max_queue=args.max_queue,
            allow_runtime_experts=args.allow_runtime_experts,
            shutdown_timeout=args.shutdown_timeout,
        )
    except (OSError, ValueError) as exc:
        print(f"moa serve: error: {exc}", file=sys.stderr)
        return 1
    return 0
