"""Adding a domain to a MoA directory: a new expert trained alone, every router widened by one
output, the routers retrained; the existing experts' files are not rewritten."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from moa_engine.moa_format import ADAPTER_CONFIG, MoAConfig, MoADir

from .common import DataOptions, as_records, base_of_moa
from .experts import ExpertOptions, train_experts
from .routers import RouterFit, train_router
from .trainer import TrainConfig, _barrier, init_distributed, world


def add_domain(
    moa_dir,
    domain: str,
    data,
    router_data=None,
    cfg: TrainConfig | None = None,
    router_cfg: TrainConfig | None = None,
    expert: ExpertOptions | None = None,
    data_opts: DataOptions | None = None,
    router_rows: str = "new",
) -> dict:
    """Train an expert for `domain` alone on `data`, add it to `moa_dir`, widen the routers by one
    output and retrain the routers only (on `router_data`, a sample of the old domains, plus the
    new domain's records). The old experts' files are copied, never rewritten.

    router_rows: "new" (default) fits the new domain's row only and keeps the old rows as they
    are, so among the old domains a prompt is routed as before, and an old domain's prompt can
    only be lost to the new one; "all" refits every row of the widened routers from their old
    values, on router_data, which is usually a small sample of the old domains."""
    moa, records, old_records = _check_args(moa_dir, domain, data, router_data, router_rows)
    cfg = cfg or TrainConfig(steps=100)
    data_opts = data_opts or DataOptions()
    if expert is None:
        expert = _expert_options_like(moa)
    cfg.device = init_distributed(cfg.device)
    # Scratch beside the MoA dir (every process sees it under torchrun); removed at the end.
    work = Path(f"{moa.path}.train") / f"add-{domain}"
    scratch = work / "scratch"
    _remove_old_scratch(scratch)
    try:
        summary, new_folder = _train_new_expert(moa, domain, records, work, scratch, cfg, expert, data_opts)
        config = _grown_config(moa, domain)
        experts = {**moa.expert_paths, domain: new_folder}
        if moa.router is None:
            if world()[0] == 0:
                MoADir.save(moa.path, config, experts, overwrite=True)
            return {"out": str(moa.path), "expert": summary, "router": None}
        router_cfg = router_cfg or TrainConfig(
            steps=RouterFit.steps,
            lr=RouterFit.lr,
            batch=cfg.batch,
            seed=cfg.seed,
            dtype=cfg.dtype,
            device=cfg.device,
            progress=cfg.progress,
        )
        fixed = list(moa.config.domains) if router_rows == "new" else ()
        result = _retrain_widened_routers(
            moa, config, experts, list(old_records) + list(records), work, scratch, router_cfg, data_opts, fixed
        )
    finally:
        if world()[0] == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    return {"out": str(moa.path), "expert": summary, "router": result}


def _check_args(moa_dir, domain: str, data, router_data, router_rows: str):
    """(the MoA directory, the new domain's records, the old domains' records or None), checked."""
    if router_rows not in ("all", "new"):
        raise ValueError(f"router_rows must be 'all' or 'new', got {router_rows!r}")
    moa = MoADir.load(moa_dir)
    if domain in moa.config.domains:
        raise ValueError(f"{moa.path}: already has a domain {domain!r}")
    MoAConfig(base_model="x", domains=list(moa.config.domains) + [domain])  # checks the name
    records = as_records(data)
    other = sorted({r.domain for r in records} - {domain})
    if other:
        raise ValueError(f"--data must hold only records of the new domain {domain!r}; it also has {other}")
    if not records:
        raise ValueError(f"no records for the new domain {domain!r}")
    old_records = as_records(router_data) if router_data is not None else None
    if moa.router is not None and old_records is None:
        raise ValueError(
            f"{moa.path} has routers: retraining them needs --router-data, a sample of the old "
            f"domains' records {moa.config.domains}"
        )
    return moa, records, old_records


def _remove_old_scratch(scratch: Path) -> None:
    """An interrupted run's scratch folder goes before a new one starts."""
    if world()[0] == 0 and scratch.exists():
        shutil.rmtree(scratch)
    _barrier()


def _train_new_expert(
    moa: MoADir,
    domain: str,
    records,
    work: Path,
    scratch: Path,
    cfg: TrainConfig,
    expert: ExpertOptions,
    data_opts: DataOptions,
) -> tuple[dict, Path]:
    """Stage 1 for the new domain alone, into a scratch MoA dir; (its summary, the expert's folder)."""
    staged = scratch / "new"
    summary = train_experts(
        records,
        staged,
        model=base_of_moa(moa),
        cfg=replace(cfg, checkpoint_dir=str(work / "expert"), log_path=None),
        expert=expert,
        data_opts=data_opts,
        domains=[domain],
    )
    new_folder = scratch / "expert"
    if world()[0] == 0:
        shutil.copytree(staged / "experts" / domain, new_folder)
    _barrier()
    return summary, new_folder


def _grown_config(moa: MoADir, domain: str) -> MoAConfig:
    """The directory's config with `domain` added as the last domain."""
    return MoAConfig(
        base_model=moa.config.base_model,
        domains=list(moa.config.domains) + [domain],
        target_modules=list(moa.config.target_modules),
        router=moa.config.router,
        eta=moa.config.eta,
    )


def _retrain_widened_routers(
    moa: MoADir,
    config: MoAConfig,
    experts: dict,
    records,
    work: Path,
    scratch: Path,
    router_cfg: TrainConfig,
    data_opts: DataOptions,
    fixed_domains,
) -> dict:
    """The routers widened by one zero row, retrained on old + new records (experts frozen), then
    the grown directory written over the old one (its old experts' files copied)."""
    widened = scratch / "widened"
    widened_router = [torch.cat([w, torch.zeros(1, w.shape[1])]) for w in moa.router]
    if world()[0] == 0:
        MoADir.save(widened, config, experts, router=widened_router)
    _barrier()
    result = train_router(
        widened,
        records,
        cfg=replace(router_cfg, checkpoint_dir=str(work / "router"), log_path=None),
        data_opts=data_opts,
        out=widened,
        init_from_existing=True,
        fixed_domains=fixed_domains,
    )
    if world()[0] == 0:
        final = MoADir.load(widened)
        grown = {d: (moa.expert_paths[d] if d in moa.expert_paths else final.expert_paths[d]) for d in config.domains}
        MoADir.save(moa.path, final.config, grown, router=final.router, overwrite=True)
    _barrier()
    return result


def subset_moa(source, out, domains: list[str], eta: float | None = None) -> Path:
    """A MoA directory at `out` with the experts of `domains` from the MoA directory `source`, and
    no routers (e.g. the starting point of an add-a-domain experiment). eta: the routers' loss
    weight it records (default: source's). Returns `out`."""
    moa = MoADir.load(source)
    config = MoAConfig(
        base_model=moa.config.base_model,
        domains=list(domains),
        target_modules=moa.config.target_modules,
        eta=moa.config.eta if eta is None else eta,
    )
    MoADir.save(out, config, {d: moa.expert_paths[d] for d in domains})
    return Path(out)


def _expert_options_like(moa: MoADir) -> ExpertOptions:
    """Rank, alpha and targets of the directory's first expert (a new expert matches them)."""
    first = moa.config.domains[0]
    config = json.loads((moa.expert_paths[first] / ADAPTER_CONFIG).read_text())
    return ExpertOptions(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        targets=tuple(moa.config.target_modules),
        use_rslora=bool(config.get("use_rslora", False)),
    )
