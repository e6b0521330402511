"""Quality of Mixture-of-LoRAs against its baselines, on the default model and the packaged domains.

The paper's comparison (Feng et al., 2024), on real data built from installed packages
(`moa data build`: code, math, medicine, dialogue), every system scored by the serving engine on
the same held-out records (moa_engine.evaluation):

  base          the model alone
  single        one LoRA per domain trained on that domain alone, each scored on its own domain
                (stage 1 of MoA: concurrent stage-1 training equals separate training, which the
                tests check, so these are the single-domain LoRAs)
  mixed         one LoRA trained on all domains' records mixed, with as many samples as MoA
                saw in all (stage 1 and the joint stage 2): (steps + router steps) x domains
                steps of --batch samples
                With --stage1-keep-best N, single and mixed are each early-stopped: measured
                every N stage-1 steps (the mixed LoRA every N x domains steps, as many samples)
                on the held-out training records stage 2's keep-best uses, and kept at its best
                state, so no comparison depends on a step count that over- or under-trains one
                system.
  moa-label     MoA after stage 2 (routers trained with the experts tuned jointly; with
                --keep-best each expert ends at its best state by the loss on held-out training
                records no system trains on, the stage-1 state included), each record served by its own
                domain's expert
  moa-<s>       the same MoA routed by its routers over the prompt, strategy s (per_layer, last,
                vote), with the routers' accuracy per domain

Router accuracy (--router-val N): the routers alone, on the scored records plus up to N more
held-out records per domain that no system trains on, with 95% Wilson intervals: the scored
records alone are too few to tell 99% from 97%.

Add-a-domain: a MoA of the first three domains (stage-1 experts + routers) is scored, the fourth
domain is added with `add_domain` (the new expert alone, then the new row of each widened router,
the old rows kept), and the old domains are scored again.

Every budget (steps, batch, records) is printed and saved with the figures. Output: a markdown
table on stdout, JSON (--out) and a plot beside it. --quick is a smoke run for CI.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]


HOLD_OUT = 0.2  # see prepare_data: the split score's [0.1, 0.2), as the data build took [0, 0.1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run (tiny budgets)")
    p.add_argument("--domains", default="code,math,medicine,dialogue")
    p.add_argument("--records", type=int, default=300, help="records per domain built (train + val)")
    p.add_argument("--val", type=int, default=30, help="held-out records scored per domain")
    p.add_argument("--steps", type=int, default=40, help="stage-1 steps per domain")
    p.add_argument("--batch", type=int, default=4, help="samples per domain per step")
    p.add_argument("--router-steps", type=int, default=25, help="stage-2 steps (joint)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--expert-lr", type=float, default=2e-4, help="experts' lr in the joint stage 2")
    p.add_argument("--router-lr", type=float, default=1e-2)
    p.add_argument("--eta", type=float, default=0.1)
    p.add_argument(
        "--keep-best",
        type=int,
        default=5,
        help="stage 2: every N joint steps each expert's loss on held-out training records (about a ninth); "
        "each expert ends at its best (0: off)",
    )
    p.add_argument(
        "--keep-best-margin",
        type=float,
        default=1.0,
        help="keep-best (stage 2; with --stage1-keep-best also stage 1 and the mixed LoRA): a later state "
        "counts as better only by more than this many standard errors of the paired per-record difference "
        "(default 1: the one-standard-error rule; 0: the plain minimum)",
    )
    p.add_argument(
        "--stage1-keep-best",
        type=int,
        default=0,
        metavar="N",
        help="early stopping for stage 1 and the mixed LoRA too: every N stage-1 steps (the mixed LoRA: every "
        "N x domains steps, as many samples) each is measured on the same held-out records and ends at its "
        "best state, with --keep-best-margin (default 0: off, both train to their step counts)",
    )
    p.add_argument("--max-len", type=int, default=160)
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws for the paired comparisons")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="working folder (default: build/quality)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    p.add_argument(
        "--reuse-stage1",
        action="store_true",
        help="keep the working folder's finished stage-1 experts and mixed LoRA (same arguments) instead of training them again",
    )
    p.add_argument("--grow-steps", type=int, default=None, help="steps of the added domain's expert (default --steps)")
    p.add_argument("--router-sample", type=int, default=64, help="records per old domain in add-domain's --router-data")
    p.add_argument(
        "--router-val",
        type=int,
        default=300,
        metavar="N",
        help="router accuracy also on up to N more held-out records per domain (built beyond --records, none "
        "in any system's training or scoring), routing only, with Wilson intervals (0: off)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        choices=(1, 2),
        help="2: train stage 1 and the mixed LoRA in two processes at once, half the threads each",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.records, args.val, args.steps, args.batch, args.router_steps = 16, 2, 2, 1, 2
        args.router_val = min(args.router_val, 3)
        args.max_len = 48
    return args


# The paired comparisons of the report: (system, baseline).
PAIRS = [
    ("moa-label", "single"),
    ("moa-label", "mixed"),
    ("moa-last", "single"),
    ("moa-last", "mixed"),
    ("moa-per_layer", "single"),
    ("moa-per_layer", "mixed"),
    ("mixed", "single"),
]


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    run = start_run(args)
    data = prepare_data(run)
    trained = train_baselines(run, data)
    trained.stage2 = train_stage2(run, data)
    results, routing = score(run, data)
    growth = add_domain_experiment(run, data)
    report(run, data, trained, results, routing, growth)
    return 0


# ---------------------------------------------------------------------------------------------
# The run: its working folder, budgets and data
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One benchmark run: the arguments, the working folder and the timings of its steps."""

    args: argparse.Namespace
    domains: list
    work: Path
    reuse: bool  # --reuse-stage1 with a finished stage 1 in the working folder
    t_start: float = 0.0
    timings: dict = field(default_factory=dict)

    @property
    def stage1(self) -> Path:
        return self.work / "stage1"

    @property
    def mixed(self) -> Path:
        return self.work / "mixed"

    @property
    def moa(self) -> Path:
        return self.work / "moa"

    @property
    def mixed_steps(self) -> int:
        """The mixed LoRA sees as many samples as MoA does in all: stage 1 plus the joint stage 2."""
        return (self.args.steps + self.args.router_steps) * len(self.domains)

    @property
    def mixed_every(self) -> int:
        """The mixed LoRA's keep-best interval: as many samples as stage 1's."""
        return self.args.stage1_keep_best * len(self.domains)

    @property
    def expert(self):
        from moa_engine.training import ExpertOptions

        return ExpertOptions(rank=self.args.rank, alpha=2.0 * self.args.rank)

    @property
    def eval_options(self) -> dict:
        return dict(max_len=self.args.max_len, limit=self.args.val, exact_match_domains=("math",), max_new_tokens=16)

    def cfg(self, steps, lr, what):
        """A training run's config; its log goes to <work>/<what>.log.jsonl."""
        from moa_engine.training import TrainConfig

        return TrainConfig(
            batch=self.args.batch,
            steps=steps,
            lr=lr,
            warmup=max(1, steps // 10),
            seed=self.args.seed,
            checkpoint_every=0,
            progress=False,
            log_path=str(self.work / f"{what}.log.jsonl"),
        )

    def fit_cfg(self, what):
        """The routers' fit with frozen experts: full-batch steps, no warmup."""
        return replace(self.cfg(300, 3e-2, what), warmup=0)

    def early(self, every, held_out) -> dict:
        """Stage-1 / mixed keep-best on the records stage 2's keep-best uses (none when every is 0)."""
        if not every:
            return {}
        return dict(keep_best=every, keep_best_margin=self.args.keep_best_margin, val_data=held_out)


@dataclass
class Data:
    build: dict  # build_corpora's summary
    all_train: list  # train.jsonl
    train: list  # what every system trains on: train.jsonl less the held-out records
    held_out: list  # held out of every system's training; stage 2's keep-best measures on them
    val: list  # val.jsonl: the scored records
    counts: dict  # training records per domain
    opts: object  # the DataOptions every system trains with


@dataclass
class Trained:
    """The training runs' summaries (train_experts / train_router, or read back from a log)."""

    stage1: dict
    mixed: dict
    stage2: dict = field(default_factory=dict)


def start_run(args) -> Run:
    """Check the domains and clear the working folder (keeping a reusable stage 1 and mixed LoRA)."""
    domains = [d for d in args.domains.split(",") if d]
    if len(domains) < 3:
        raise SystemExit("--domains: at least 3 domains (the add-a-domain run adds the last one to the others)")
    work = Path(args.work or ROOT / "build" / ("quality-quick" if args.quick else "quality"))
    reuse = args.reuse_stage1 and (work / "stage1" / "moa_config.json").exists()
    if work.exists():
        for child in work.iterdir():
            if not (reuse and child.name in ("stage1", "stage1.log.jsonl", "mixed", "mixed.log.jsonl", "data")):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    work.mkdir(parents=True, exist_ok=True)
    return Run(args, domains, work, reuse, t_start=time.perf_counter())


def prepare_data(run: Run) -> Data:
    """Build the corpora; hold some training records out of every system's training."""
    from moa_engine.data import build_corpora, read_records
    from moa_engine.data.records import split_records
    from moa_engine.training import DataOptions

    args = run.args
    build = build_corpora(
        run.work / "data", run.domains, max_per_domain=args.records, seed=args.seed, val_fraction=0.1, progress=False
    )
    all_train = read_records(run.work / "data" / "train.jsonl")
    val_records = read_records(run.work / "data" / "val.jsonl")
    # Some training records are held out of every system's training; stage 2's keep-best measures
    # on them. The split is the records' seeded content hash (split_records), so stage 2, given
    # val_fraction HOLD_OUT, recomputes it. The data build already sent the hash's lowest tenth
    # to val.jsonl (the scored records, never trained on), so HOLD_OUT = 0.2 holds out the next
    # tenth: about a ninth of train.jsonl.
    train_records, dev_records = split_records(all_train, HOLD_OUT, args.seed)
    counts = {d: sum(r.domain == d for r in train_records) for d in run.domains}
    log(f"data: train {counts}, held out for keep-best {len(dev_records)}, scored {len(val_records)} records")
    return Data(build, all_train, train_records, dev_records, val_records, counts, DataOptions(max_len=args.max_len))


def _more_held_out(folder: Path, domains: list[str], args, taken) -> list:
    """Up to args.router_val records per domain that no system trains on or is scored on: a build of
    args.records + args.router_val records per domain, less every record of the main build (by
    content). A small corpus (dialogue has about 1,240 records) gives fewer."""
    from moa_engine.data import build_corpora, read_records

    build_corpora(
        folder, domains, max_per_domain=args.records + args.router_val, seed=args.seed, val_fraction=0.1, progress=False
    )
    seen = {r.content_key() for r in taken}
    out, count = [], dict.fromkeys(domains, 0)
    for r in read_records(folder / "train.jsonl") + read_records(folder / "val.jsonl"):
        if r.content_key() not in seen and count[r.domain] < args.router_val:
            out.append(r)
            count[r.domain] += 1
    return out


# ---------------------------------------------------------------------------------------------
# The systems
# ---------------------------------------------------------------------------------------------


def train_baselines(run: Run, data: Data) -> Trained:
    """Stage 1 (the single-domain LoRAs, all domains at once) and the mixed LoRA, or the finished
    ones in the working folder with --reuse-stage1."""
    from moa_engine.training import summary_from_log, train_experts, train_mixed_lora

    args = run.args
    jobs, stage1, mixed = {}, {}, {}
    if run.reuse:
        log("stage 1: reusing the experts in the working folder")
        stage1 = summary_from_log(run.work / "stage1.log.jsonl")
    else:
        jobs["stage1"] = (
            train_experts,
            dict(
                data=data.train,
                out=str(run.stage1),
                cfg=run.cfg(args.steps, args.lr, "stage1"),
                expert=run.expert,
                data_opts=data.opts,
                domains=run.domains,
                **run.early(args.stage1_keep_best, data.held_out),
            ),
        )
    if run.reuse and (run.mixed / "moa_config.json").exists():
        log("mixed LoRA: reusing the one in the working folder")
        mixed = summary_from_log(run.work / "mixed.log.jsonl")
    else:
        jobs["mixed"] = (
            train_mixed_lora,
            dict(
                data=data.train,
                out=str(run.mixed),
                cfg=run.cfg(run.mixed_steps, args.lr, "mixed"),
                expert=run.expert,
                data_opts=data.opts,
                **run.early(run.mixed_every, data.held_out),
            ),
        )
    t = time.perf_counter()
    results_of = _run_jobs(jobs, args.jobs)
    run.timings["stage1_and_mixed_s"] = time.perf_counter() - t
    log(
        f"stage 1 ({len(run.domains)} experts x {args.steps} steps) and the mixed LoRA ({run.mixed_steps} steps) in "
        f"{run.timings['stage1_and_mixed_s']:.0f} s ({args.jobs} process(es))"
    )
    return Trained(results_of.get("stage1", stage1), results_of.get("mixed", mixed))


def _train_job(job, threads: int | None) -> dict:
    fn, kwargs = job
    if threads:
        torch.set_num_threads(threads)
    return fn(**kwargs)


def _run_jobs(jobs: dict, n: int) -> dict:
    """Each job's summary (a job: (train_experts or train_mixed_lora, its arguments)); with n = 2,
    the jobs run in two processes at once."""
    if n == 1 or len(jobs) < 2:
        return {name: _train_job(job, None) for name, job in jobs.items()}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, torch.get_num_threads() // n)
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(_train_job, job, threads) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def train_stage2(run: Run, data: Data) -> dict:
    """Stage 2 on a copy of stage 1: routers with the experts tuned jointly."""
    from moa_engine.training import train_router

    args = run.args
    t = time.perf_counter()
    shutil.copytree(run.stage1, run.moa)
    s2_opts = replace(data.opts, val_fraction=HOLD_OUT) if args.keep_best else data.opts
    s2 = train_router(
        run.moa,
        data.all_train if args.keep_best else data.train,
        cfg=run.cfg(args.router_steps, args.router_lr, "stage2"),
        eta=args.eta,
        joint=True,
        expert_lr=args.expert_lr,
        data_opts=s2_opts,
        keep_best=args.keep_best,
        keep_best_margin=args.keep_best_margin if args.keep_best else 0.0,
    )
    run.timings["stage2_s"] = time.perf_counter() - t
    log(f"stage 2 (joint): {args.router_steps} steps in {run.timings['stage2_s']:.0f} s")
    return s2


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def score(run: Run, data: Data):
    """(every system's evaluate result on the scored records, the routers' accuracy on more
    held-out records or None)."""
    from moa_engine import Engine
    from moa_engine.evaluation import evaluate

    t = time.perf_counter()
    ev = run.eval_options
    results = {}
    results["base"] = evaluate(Engine(experts=None), data.val, ["base"], **ev)["base"]
    results["single"] = evaluate(Engine(experts=run.stage1), data.val, ["label"], **ev)["label"]
    results["mixed"] = evaluate(Engine(experts=run.mixed), data.val, ["mixed"], **ev)["mixed"]
    moa_engine = Engine(experts=run.moa)
    for mode, res in evaluate(moa_engine, data.val, ["label", "per_layer", "last", "vote"], **ev).items():
        results[f"moa-{mode}"] = res
    run.timings["eval_s"] = time.perf_counter() - t
    log(f"evaluation in {run.timings['eval_s']:.0f} s")
    routing = router_accuracy(run, data, moa_engine) if run.args.router_val else None
    return results, routing


def router_accuracy(run: Run, data: Data, engine) -> dict:
    """The routers alone on the scored records and up to --router-val more per domain."""
    from moa_engine.evaluation import first_per_domain, routing_accuracy

    t = time.perf_counter()
    extra = _more_held_out(run.work / "data-routing", run.domains, run.args, data.train + data.held_out + data.val)
    scored = first_per_domain(data.val, run.args.val)
    routing = routing_accuracy(engine, scored + extra, ("per_layer", "last", "vote"), max_len=run.args.max_len)
    run.timings["routing_s"] = time.perf_counter() - t
    log(f"router accuracy on {len(scored) + len(extra)} held-out records in {run.timings['routing_s']:.0f} s")
    return routing


def add_domain_experiment(run: Run, data: Data) -> dict:
    """A MoA of all domains but the last, scored before and after the last one is added."""
    from moa_engine import evaluation

    args = run.args
    t = time.perf_counter()
    growth = evaluation.add_domain_experiment(
        run.stage1,
        run.domains[:-1],
        run.domains[-1],
        data.train,
        data.val,
        run.work / "grow",
        router_cfg=run.fit_cfg("grow-router"),
        expert_cfg=run.cfg(args.grow_steps or args.steps, args.lr, "grow-expert"),
        new_router_cfg=run.fit_cfg("grow-router2"),
        expert=run.expert,
        data_opts=data.opts,
        eta=args.eta,
        router_sample=args.router_sample,
        **run.eval_options,
    )
    run.timings["add_domain_s"] = time.perf_counter() - t
    log(f"add-a-domain in {run.timings['add_domain_s']:.0f} s")
    return growth


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def report(run: Run, data: Data, trained: Trained, results: dict, routing: dict | None, growth: dict) -> None:
    """The markdown report on stdout and beside --out, the JSON (--out) and the plot."""
    from moa_engine._io import atomic_write_json, atomic_write_text
    from moa_engine.evaluation import compare

    args = run.args
    # Paired bootstrap over the scored records: is a difference larger than the records' spread?
    comparisons = {
        f"{a} vs {b}": compare(results[a], results[b], n_boot=args.bootstrap, seed=args.seed) for a, b in PAIRS
    }
    budget = budget_text(run, data, trained, results)
    text = report_text(run, results, comparisons, routing, growth, budget)
    print(text)
    out = Path(args.out)
    atomic_write_json(out, payload(run, data, trained, results, comparisons, routing, growth, budget))
    atomic_write_text(out.with_suffix(".md"), text + "\n")
    _plot(results, growth, comparisons, out.with_suffix(".png"))
    log(f"wrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")


def budget_text(run: Run, data: Data, trained: Trained, results: dict) -> str:
    """Every budget of the run, in words."""
    args = run.args
    early_text = ""
    if args.stage1_keep_best:
        early_text = (
            f"stage 1 and the mixed LoRA each kept at its best of every {args.stage1_keep_best} (mixed: "
            f"{run.mixed_every}) steps by the loss on the held-out records"
            + (f" ({args.keep_best_margin:g} standard error margin)" if args.keep_best_margin else "")
            + ", kept at: "
            + ", ".join(
                f"{d} step {k['step']}"
                for d, k in {**(trained.stage1.get("kept") or {}), **(trained.mixed.get("kept") or {})}.items()
            )
            + "; "
        )
    return (
        f"stage 1: {args.steps} steps x {args.batch} samples per domain (rank {args.rank}, lr {args.lr}); "
        f"mixed: {run.mixed_steps} steps x {args.batch} samples (as many as MoA's stages 1 and 2); {early_text}stage 2 (joint): "
        f"{args.router_steps} steps x {args.batch} samples per domain (router lr {args.router_lr}, expert lr "
        f"{args.expert_lr}, eta {args.eta}"
        + (
            f"; each expert kept at its best of steps 0, {args.keep_best}, ... by its loss on the held-out records"
            + (
                f", a later state counting as better only by more than {args.keep_best_margin:g} standard error(s)"
                if args.keep_best_margin
                else ""
            )
            if args.keep_best
            else ""
        )
        + "), then the routers refitted on the tuned experts (300 full-batch steps, each prompt through a random expert); "
        f"added domain: {args.grow_steps or args.steps} expert steps, then each router's new row fitted (the old rows "
        f"kept) on the old and new records ({args.router_sample} per old domain); "
        f"max_len {args.max_len}; every system trained on the same {sum(data.counts.values())} records "
        f"({len(data.held_out)} more held out for keep-best); scored records: "
        + ", ".join(f"{d} {len(v['tokens'])}" for d, v in results["single"]["records"].items())
    )


def report_text(run: Run, results: dict, comparisons: dict, routing: dict | None, growth: dict, budget: str) -> str:
    """The markdown report: the systems' table, the comparisons, add-a-domain and router accuracy."""
    from moa_engine.evaluation import add_domain_table, comparison_table, markdown_table, routing_table

    args = run.args
    old, new = growth["old_domains"], growth["new_domain"]
    new_row = growth["after"]["label"]["domains"].get(new)
    return "\n".join(
        [
            "### Per-domain perplexity (held-out), router accuracy, math exact match",
            "",
            markdown_table(results),
            "",
            f"Budget: {budget}.",
            "",
            "### MoA against the baselines: change in average perplexity (paired bootstrap over the scored records)",
            "",
            comparison_table(comparisons),
            "",
            f"Each of {args.bootstrap} draws resamples every domain's scored records with replacement, the same "
            "records for both systems; P(lower) is the share of draws where the first system's average "
            "perplexity is the lower.",
            "",
            f"### Adding a domain ({new}) to a MoA of {', '.join(old)}",
            "",
            add_domain_table(growth),
            "",
            f"New domain {new}: label-routed perplexity {new_row['ppl']:.3f}" if new_row else "",
            *(
                []
                if routing is None
                else [
                    "",
                    "### Router accuracy on more held-out records (routing only; 95% Wilson intervals)",
                    "",
                    routing_table(routing),
                    "",
                    f"The records: each domain's {args.val} scored ones and up to {args.router_val} more built beyond --records. "
                    "per_layer counts every layer's choice.",
                ]
            ),
        ]
    )


def payload(run: Run, data: Data, trained: Trained, results, comparisons, routing, growth, budget) -> dict:
    """The JSON written to --out."""
    args = run.args
    return {
        "benchmark": "quality",
        "quick": args.quick,
        "args": vars(args),
        "budget": budget,
        "data": {
            "train": data.counts,
            "held_out_for_keep_best": len(data.held_out),
            "val_per_domain": args.val,
            "sources": data.build.get("sources", {}),
        },
        "results": results,
        "comparisons": comparisons,
        "routing": routing,
        "add_domain": growth,
        "timings_s": run.timings,
        "total_s": time.perf_counter() - run.t_start,
        "stage1_final": trained.stage1.get("final"),
        "stage1_kept": trained.stage1.get("kept"),
        "mixed_kept": trained.mixed.get("kept"),
        "stage2_final": trained.stage2.get("final"),
        "stage2_kept": trained.stage2.get("kept"),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
    }


def _plot(results: dict, growth: dict, comparisons: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(results)
    domains = list(next(iter(results.values()))["domains"])
    fig, (ax, ax3, ax2) = plt.subplots(1, 3, figsize=(18, 4.5), gridspec_kw={"width_ratios": [3, 2, 2]})
    width = 0.8 / len(systems)
    for i, s in enumerate(systems):
        values = [results[s]["domains"].get(d, {}).get("ppl", 0) for d in domains] + [results[s]["average_ppl"]]
        ax.bar([k + i * width for k in range(len(domains) + 1)], values, width, label=s)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(domains) + 1)], domains + ["average"])
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Per-domain perplexity by system")
    # The comparisons: each pair's change in average perplexity with its bootstrap interval.
    names = list(comparisons)[::-1]
    mid = [comparisons[n]["change_pct"] for n in names]
    lo = [m - comparisons[n]["interval_pct"][0] for m, n in zip(mid, names)]
    hi = [comparisons[n]["interval_pct"][1] - m for m, n in zip(mid, names)]
    ax3.errorbar(mid, range(len(names)), xerr=[lo, hi], fmt="o", capsize=4)
    ax3.axvline(0.0, color="grey", lw=0.8, ls="--")
    ax3.set_yticks(range(len(names)), names, fontsize=8)
    conf = next(iter(comparisons.values()))["confidence"] if comparisons else 0.95
    ax3.set_xlabel(f"change in average perplexity (%), {100 * conf:.0f}% paired bootstrap interval")
    ax3.set_title("MoA against the baselines")
    old = growth["old_domains"]
    for i, mode in enumerate(("label", "last")):
        ax2.bar([k + i * 0.4 for k in range(len(old))], [growth["change_pct"][mode][d] for d in old], 0.4, label=mode)
    ax2.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax2.axhline(-0.5, color="grey", lw=0.8, ls="--")
    ax2.set_xticks([k + 0.2 for k in range(len(old))], old)
    ax2.set_ylabel("perplexity change after adding a domain (%)")
    ax2.set_title(f"Old domains after adding {growth['new_domain']}")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
