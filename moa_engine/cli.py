"""The ``moa`` command line."""

import argparse
import sys

from moa_engine.data.cli import add_data_subcommand


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moa", description="moa_engine: Mixture-of-LoRAs engine")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo(subparsers)
    add_data_subcommand(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
