"""`moa train experts`, `moa train router` and `moa add-domain`."""

from __future__ import annotations

import argparse
import json
import sys

from moa_engine._argtypes import positive_float as _positive_float
from moa_engine._argtypes import positive_int as _positive_int
from moa_engine.moa_format import TARGET_MODULES


def _targets(text):
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGET_MODULES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown target module(s) {unknown or text!r}; choose from {','.join(TARGET_MODULES)}"
        )
    return tuple(names)


def _common(p, lr: float | None, steps_help: str, lr_help: str | None = None):
    g = p.add_argument_group("training")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, metavar="N", help=steps_help)
    length.add_argument("--epochs", type=_positive_float, metavar="E", help="passes over each domain's examples")
    g.add_argument(
        "--batch", type=_positive_int, default=8, metavar="B", help="samples per domain per step (default 8)"
    )
    g.add_argument(
        "--micro-batch",
        type=_positive_int,
        default=None,
        metavar="M",
        help="sequences per forward (gradient accumulation; default: by --forward-tokens)",
    )
    g.add_argument(
        "--forward-tokens",
        type=_positive_int,
        default=2048,
        metavar="N",
        help="without --micro-batch: each forward takes length-sorted sequences up to N padded tokens (default 2048)",
    )
    g.add_argument("--lr", type=_positive_float, default=lr, help=lr_help or f"peak learning rate (default {lr})")
    g.add_argument(
        "--warmup", type=int, default=0, metavar="N", help="linear warmup steps (default 0); then cosine decay"
    )
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument(
        "--max-grad-norm",
        type=_positive_float,
        default=1.0,
        help="clip each expert's / the routers' gradient norm (default 1.0)",
    )
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float64"],
        default="float32",
        help="float32; bfloat16 autocast (float32 weights); float64 (for checks)",
    )
    g.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: one GPU per process)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=50,
        metavar="N",
        help="write a checkpoint every N steps (default 50; 0: never)",
    )
    g.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="default: <output>.train/<stage>")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    g.add_argument(
        "--log", default=None, metavar="FILE", help="JSONL training log (default: <checkpoint dir>/log.jsonl)"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = p.add_argument_group("data")
    d.add_argument("--max-len", type=_positive_int, default=512, metavar="T", help="tokens per example (default 512)")
    d.add_argument(
        "--overlong",
        choices=["truncate", "drop"],
        default="truncate",
        help="what to do with longer examples (default truncate)",
    )
    d.add_argument("--pack", action="store_true", help="pack text records into --max-len blocks")
    d.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="hold out this share of the records for a validation figure (default 0)",
    )


def _train_config(args, default_steps: int):
    from moa_engine.training import TrainConfig

    steps = args.steps if args.steps is not None or args.epochs is not None else default_steps
    return TrainConfig(
        batch=args.batch,
        steps=steps,
        epochs=args.epochs,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        optimizer=args.optimizer,
        micro_batch=args.micro_batch,
        forward_tokens=args.forward_tokens,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        grad_checkpointing=args.grad_checkpointing,
        checkpoint_every=args.checkpoint_every,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        log_path=args.log,
        progress=not args.no_progress,
    )


def _data_options(args):
    from moa_engine.training import DataOptions

    return DataOptions(max_len=args.max_len, overlong=args.overlong, pack=args.pack, val_fraction=args.val_fraction)


def _expert_args(p):
    g = p.add_argument_group("experts")
    g.add_argument("--rank", type=_positive_int, default=16, help="LoRA rank (default 16)")
    g.add_argument("--alpha", type=_positive_float, default=32.0, help="LoRA alpha (default 32)")
    g.add_argument(
        "--targets",
        type=_targets,
        default=TARGET_MODULES,
        metavar="M,M",
        help="target modules (default all: " + ",".join(TARGET_MODULES) + ")",
    )
    g.add_argument("--rslora", action="store_true", help="scale alpha / sqrt(rank)")


def add_train_subcommands(subparsers) -> None:
    train = subparsers.add_parser("train", help="train LoRA experts (stage 1) or routers (stage 2)")
    stages = train.add_subparsers(dest="stage", required=True)

    p = stages.add_parser(
        "experts",
        help="stage 1: one LoRA expert per domain",
        description="Trains one LoRA expert per domain found in the data on a frozen base model, and writes "
        "a MoA directory (experts only). All domains train at once in mixed-domain batches (each sample "
        "through its domain's expert, the loss summed per domain), or one after another with --sequential; "
        "both give the same experts.",
    )
    p.add_argument("--model", default=None, help="base model folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument(
        "--data", required=True, metavar="DATA.jsonl", help="records {domain, prompt, response} or {domain, text}"
    )
    p.add_argument("--out", required=True, metavar="MOA_DIR")
    p.add_argument(
        "--domains", default=None, metavar="A,B", help="the domains, in router order (default: as first seen)"
    )
    p.add_argument("--sequential", action="store_true", help="train one domain at a time")
    p.add_argument("--overwrite", action="store_true", help="replace an existing MoA_DIR")
    p.add_argument(
        "--keep-best",
        type=int,
        default=0,
        metavar="N",
        help="every N steps measure each expert's held-out loss (needs --val-fraction or --val-data) and end each "
        "expert at its best weights (early stopping; default 0: off)",
    )
    _keep_best_margin_arg(p)
    p.add_argument(
        "--val-data",
        default=None,
        metavar="VAL.jsonl",
        help="held-out records for the validation figure and --keep-best (instead of --val-fraction; "
        "then every --data record trains)",
    )
    _expert_args(p)
    _common(p, 2e-4, "steps per domain (default 100)")
    p.set_defaults(func=_run_experts)

    p = stages.add_parser(
        "router",
        help="stage 2: per-layer routers supervised by the domain labels",
        description="Trains a router at each decoder layer's input to predict the sample's domain "
        "(L = L_LM + eta * mean_l CE, each domain weighing the same), with the forward routed by the "
        "label. Experts frozen (default): the LM loss is then a constant, so one no-grad forward over "
        "each record's prompt gives the routers' inputs, and the routers are fitted on them with --steps "
        "full-batch AdamW steps (one step = one epoch). --joint: --steps steps of --batch samples per "
        "domain tune the experts and routers together, then the routers are refitted on the tuned "
        "experts (--refit-steps). Writes router.safetensors into the MoA directory (atomically).",
    )
    p.add_argument("--moa", required=True, metavar="MOA_DIR")
    p.add_argument("--data", required=True, metavar="DATA.jsonl")
    p.add_argument(
        "--eta", type=_positive_float, default=None, help="weight of the routers' loss (default: moa_config.json's)"
    )
    p.add_argument("--joint", action="store_true", help="tune the experts together with the routers")
    p.add_argument(
        "--expert-lr", type=_positive_float, default=None, help="experts' learning rate with --joint (default lr / 10)"
    )
    p.add_argument(
        "--refit-steps",
        type=int,
        default=300,
        metavar="N",
        help="with --joint: full-batch steps fitting the routers to the tuned experts afterwards (default 300; 0: none)",
    )
    p.add_argument("--refit-lr", type=_positive_float, default=3e-2, help="learning rate of that fit (default 3e-2)")
    p.add_argument(
        "--keep-best",
        type=int,
        default=0,
        metavar="N",
        help="with --joint: every N steps measure each expert's held-out loss (needs --val-fraction) "
        "and end each expert at its best weights, its stage-1 ones included (default 0: off)",
    )
    _keep_best_margin_arg(p)
    p.add_argument(
        "--strategy",
        choices=["last", "per_layer", "vote"],
        default=None,
        help="serving strategy recorded in moa_config.json",
    )
    _common(
        p,
        None,
        "steps (default 300 full-batch fit steps; with --joint 100 steps)",
        "routers' peak learning rate (default 3e-2; with --joint 1e-3)",
    )
    p.set_defaults(func=_run_router)


def add_add_domain_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "add-domain",
        help="add a domain to a MoA directory without retraining the old experts",
        description="Trains the new domain's expert alone, widens every router by one output and retrains "
        "the routers only (on --router-data, a sample of the old domains, plus the new data): by default "
        "only the new domain's row, the old rows kept (--router-rows). The old experts' files are not changed.",
    )
    p.add_argument("--moa", required=True, metavar="MOA_DIR")
    p.add_argument("--domain", required=True, metavar="NAME")
    p.add_argument("--data", required=True, metavar="NEW.jsonl", help="records of the new domain")
    p.add_argument(
        "--router-data",
        default=None,
        metavar="OLD_SAMPLE.jsonl",
        help="records of the old domains (needed when the directory has routers)",
    )
    p.add_argument(
        "--router-steps",
        type=_positive_int,
        default=300,
        help="full-batch steps fitting the widened routers (default 300)",
    )
    p.add_argument("--router-lr", type=_positive_float, default=3e-2, help="their learning rate (default 3e-2)")
    p.add_argument(
        "--router-rows",
        choices=("new", "all"),
        default="new",
        help="new (default): fit the new domain's row of each router only, keeping the old rows, so the old "
        "domains are routed among themselves as before; all: refit every row on --router-data",
    )
    _expert_args(p)
    _common(p, 2e-4, "expert steps (default 100)")
    p.set_defaults(func=_run_add_domain)


def _report(summary: dict) -> None:
    print(json.dumps(summary, indent=2, default=str))


def _errors():
    from moa_engine.training import TrainingDiverged

    return (OSError, ValueError, TrainingDiverged)


def _keep_best_margin_arg(p) -> None:
    p.add_argument(
        "--keep-best-margin",
        type=float,
        default=0.0,
        metavar="Z",
        help="with --keep-best: a later state counts as better only if its held-out loss is lower by "
        "more than Z standard errors of the paired per-example difference (1: the one-standard-error "
        "rule; default 0: the plain minimum)",
    )


def _keep_best_margin(args) -> float:
    if args.keep_best_margin and not args.keep_best:
        raise ValueError("--keep-best-margin applies with --keep-best N")
    return args.keep_best_margin


def _run_experts(args) -> int:
    from moa_engine.training import ExpertOptions, train_experts

    try:
        domains = args.domains.split(",") if args.domains else None
        summary = train_experts(
            args.data,
            args.out,
            model=args.model,
            cfg=_train_config(args, 100),
            expert=ExpertOptions(args.rank, args.alpha, args.targets, args.rslora),
            data_opts=_data_options(args),
            domains=domains,
            sequential=args.sequential,
            overwrite=args.overwrite,
            keep_best=args.keep_best,
            keep_best_margin=_keep_best_margin(args),
            val_data=args.val_data,
        )
    except _errors() as exc:
        print(f"moa train experts: error: {exc}", file=sys.stderr)
        return 1
    _report(summary)
    return 0


def _run_router(args) -> int:
    from moa_engine.training import RouterFit, train_router

    try:
        if args.refit_steps < 0:
            raise ValueError(f"--refit-steps must be >= 0, got {args.refit_steps}")
        if args.keep_best < 0:
            raise ValueError(f"--keep-best must be >= 0, got {args.keep_best}")
        if args.lr is None:
            args.lr = 1e-3 if args.joint else 3e-2
        summary = train_router(
            args.moa,
            args.data,
            cfg=_train_config(args, 100 if args.joint else 300),
            eta=args.eta,
            joint=args.joint,
            expert_lr=args.expert_lr,
            data_opts=_data_options(args),
            strategy=args.strategy,
            refit=RouterFit(steps=args.refit_steps, lr=args.refit_lr),
            keep_best=args.keep_best,
            keep_best_margin=_keep_best_margin(args),
        )
    except _errors() as exc:
        print(f"moa train router: error: {exc}", file=sys.stderr)
        return 1
    _report(summary)
    return 0


def _run_add_domain(args) -> int:
    from dataclasses import replace

    from moa_engine.training import ExpertOptions, add_domain

    try:
        cfg = _train_config(args, 100)
        router_cfg = replace(
            cfg,
            lr=args.router_lr,
            steps=args.router_steps,
            epochs=None,
            warmup=0,
            optimizer="adamw",
            checkpoint_dir=None,
            log_path=None,
        )  # the routers' fit: full-batch AdamW
        expert = None
        if any(
            a != d
            for a, d in ((args.rank, 16), (args.alpha, 32.0), (args.targets, TARGET_MODULES), (args.rslora, False))
        ):
            expert = ExpertOptions(args.rank, args.alpha, args.targets, args.rslora)
        summary = add_domain(
            args.moa,
            args.domain,
            args.data,
            router_data=args.router_data,
            cfg=cfg,
            router_cfg=router_cfg,
            expert=expert,
            data_opts=_data_options(args),
            router_rows=args.router_rows,
        )
    except _errors() as exc:
        print(f"moa add-domain: error: {exc}", file=sys.stderr)
        return 1
    _report(summary)
    return 0
