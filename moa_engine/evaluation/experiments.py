"""Experiments that train and score: adding a domain to a MoA (add_domain_experiment)."""

from __future__ import annotations

from .scoring import evaluate


def add_domain_experiment(
    stage1,
    old_domains: list[str],
    new_domain: str,
    train_records: list,
    val_records: list,
    out,
    *,
    router_cfg,
    expert_cfg,
    new_router_cfg,
    expert=None,
    data_opts=None,
    eta: float | None = None,
    router_sample: int = 64,
    modes=("label", "last"),
    **eval_options,
) -> dict:
    """Does adding a domain leave the old domains as they were?

    A MoA of `old_domains`' experts taken from `stage1` (a MoA directory with those experts and
    new_domain's training records in `train_records`) is written at `out` (training.subset_moa,
    routers weighted by `eta`), its routers are fitted with the experts frozen (router_cfg) on the
    old domains' training records, and it is scored (evaluate, `modes`) on the old domains'
    `val_records`. Then `new_domain` is added with training.add_domain: its expert trained on
    its training records (expert_cfg, `expert` options), then each widened router's new row fitted
    (new_router_cfg) on up to `router_sample` training records per old domain plus the new ones,
    the old rows kept. Every domain of `val_records` is scored again. eval_options go to evaluate.

    Returns {"old_domains", "new_domain", "before": evaluate's result, "after": the same,
    "change_pct": {mode: {old domain: % change of its perplexity}}}."""
    from moa_engine.engine import Engine
    from moa_engine.training import add_domain, train_router
    from moa_engine.training.common import DataOptions
    from moa_engine.training.new_domain import subset_moa

    data_opts = data_opts or DataOptions()
    old = list(old_domains)
    subset_moa(stage1, out, old, eta=eta)
    old_train = [r for r in train_records if r.domain in old]
    train_router(out, old_train, cfg=router_cfg, data_opts=data_opts)  # experts frozen: a fit
    old_val = [r for r in val_records if r.domain in old]
    before = evaluate(Engine(experts=out), old_val, list(modes), **eval_options)
    new_records = [r for r in train_records if r.domain == new_domain]
    sample = [r for d in old for r in [x for x in old_train if x.domain == d][:router_sample]]
    add_domain(
        out,
        new_domain,
        new_records,
        router_data=sample,
        cfg=expert_cfg,
        router_cfg=new_router_cfg,
        expert=expert,
        data_opts=data_opts,
    )
    after = evaluate(Engine(experts=out), val_records, list(modes), **eval_options)
    growth = {"old_domains": old, "new_domain": new_domain, "before": before, "after": after, "change_pct": {}}
    for mode in modes:
        growth["change_pct"][mode] = {d: perplexity_change(before[mode], after[mode], d) for d in old}
    return growth


def perplexity_change(before: dict, after: dict, domain: str) -> float:
    """The % change of a domain's perplexity from one mode's evaluate result to another's."""
    return 100.0 * (after["domains"][domain]["ppl"] / before["domains"][domain]["ppl"] - 1.0)
