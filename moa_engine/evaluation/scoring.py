"""Scoring held-out records through the serving engine: per-domain perplexity (and, routed, the
routers' accuracy) and exact match, for each mode (see moa_engine.evaluation)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moa_engine.data.records import Record

STRATEGIES = ("per_layer", "last", "vote")


@dataclass
class _Item:
    ids: list[int]
    scored: list[bool]  # scored[i]: token i is predicted from tokens < i and counted
    route_len: int
    domain: str
    record: Record


def _items(engine, records: list[Record], max_len: int) -> list[_Item]:
    """Each record encoded as in training (chat template, loss mask, routing prompt); a record
    longer than max_len is truncated, and one whose prompt alone fills max_len is skipped."""
    from moa_engine.training.dataset import encode_records

    if engine.tokenizer is None:
        raise ValueError(f"evaluation needs a tokenizer; {engine.model_path} has none")
    out = []
    for r in records:
        try:
            (e,), _ = encode_records([r], engine.tokenizer, max_len=max_len, overlong="truncate")
        except ValueError:
            continue  # nothing left to score
        out.append(_Item(e.input_ids, e.loss_mask, e.route_len, e.domain, r))
    return out


def _nll(logits: torch.Tensor, ids: list[int], scored: list[bool]) -> tuple[float, int]:
    target = torch.tensor(ids[1:])
    mask = torch.tensor(scored[1:], dtype=torch.bool)
    logp = torch.log_softmax(logits[: len(ids) - 1].float(), dim=-1)
    nll = -logp.gather(1, target[:, None])[:, 0]
    return float(nll[mask].sum()), int(mask.sum())


def _domain_arg(mode: str, item: _Item) -> str:
    if mode == "label":
        return item.domain
    if mode == "base":
        return "base"
    return mode  # a fixed expert


def perplexity(engine, items: list[_Item], mode: str, batch: int = 8) -> dict:
    """{"domains": {domain: {"nll", "tokens", "ppl"}}, "records": {domain: {"nll": [...], "tokens":
    [...]}}} plus, for a strategy, {"router_accuracy": {domain: acc}}. "records" holds each record's
    NLL sum and scored-token count, in the order of `items`.

    Rows are batched by length and right-padded: a causal model's real positions ignore the
    padding, and a routed row pools over its first route_len tokens, which precede it."""
    sums: dict[str, list] = {}
    hits: dict[str, list] = {}
    per_item: list[tuple[float, int] | None] = [None] * len(items)
    routed = mode in STRATEGIES
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    for start in range(0, len(order), batch):
        chunk = [items[i] for i in order[start : start + batch]]
        ids = torch.zeros((len(chunk), max(len(it.ids) for it in chunk)), dtype=torch.int64)
        for b, it in enumerate(chunk):
            ids[b, : len(it.ids)] = torch.tensor(it.ids)
        if routed:
            logits, routing = engine.forward(
                ids, domain=None, return_routing=True, route_len=[it.route_len for it in chunk], routing=mode
            )
        else:
            logits = engine.forward(ids, domain=[_domain_arg(mode, it) for it in chunk])
        for b, (i, it) in enumerate(zip(order[start : start + batch], chunk)):
            nll, n = _nll(logits[b], it.ids, it.scored)
            per_item[i] = (nll, n)
            s = sums.setdefault(it.domain, [0.0, 0])
            s[0] += nll
            s[1] += n
            if routed:
                h = hits.setdefault(it.domain, [0, 0])
                layers = routing[b].layer_domains
                if mode == "per_layer":
                    h[0] += sum(d == it.domain for d in layers)
                    h[1] += len(layers)
                else:
                    h[0] += int(routing[b].domain == it.domain)
                    h[1] += 1
    out = {
        d: {"nll": s[0] / max(1, s[1]), "tokens": s[1], "ppl": math.exp(s[0] / max(1, s[1]))} for d, s in sums.items()
    }
    records: dict[str, dict] = {}
    for it, (nll, n) in zip(items, per_item):
        r = records.setdefault(it.domain, {"nll": [], "tokens": []})
        r["nll"].append(nll)
        r["tokens"].append(n)
    result = {"domains": out, "records": records}
    if hits:
        result["router_accuracy"] = {d: h[0] / max(1, h[1]) for d, h in hits.items()}
    return result


def _normalise(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(engine, items: list[_Item], mode: str, max_new_tokens: int = 24) -> dict:
    """{domain: share of chat records whose greedy generation equals the response}."""
    chat = [it for it in items if it.record.is_chat]
    if not chat:
        return {}
    prompts = [it.record.prompt for it in chat]
    if mode in STRATEGIES:
        outs = engine.generate(prompts, max_new_tokens=max_new_tokens, chat=True, routing=mode)
    else:
        outs = engine.generate(
            prompts, max_new_tokens=max_new_tokens, chat=True, domain=[_domain_arg(mode, it) for it in chat]
        )
    hits: dict[str, list] = {}
    for it, c in zip(chat, outs):
        h = hits.setdefault(it.domain, [0, 0])
        h[0] += int(_normalise(c.text) == _normalise(it.record.response))
        h[1] += 1
    return {d: h[0] / h[1] for d, h in hits.items()}


def first_per_domain(records: list[Record], limit: int) -> list[Record]:
    """The first `limit` records of each domain, in the records' order."""
    kept, count = [], {}
    for r in records:
        if count.get(r.domain, 0) < limit:
            kept.append(r)
            count[r.domain] = count.get(r.domain, 0) + 1
    return kept


def evaluate(
    engine,
    records: list[Record],
    modes: list[str],
    max_len: int = 512,
    limit: int | None = None,
    exact_match_domains=("math",),
    max_new_tokens: int = 24,
) -> dict:
    """{mode: {"domains": {d: {nll, tokens, ppl}}, "average_ppl", ["router_accuracy"],
    ["exact_match"]}} for each mode (see the module docstring)."""
    if limit is not None:
        records = first_per_domain(records, limit)
    items = _items(engine, records, max_len)
    results = {}
    for mode in modes:
        _check_mode(engine, mode)
        res = perplexity(engine, items, mode)
        res["average_ppl"] = sum(v["ppl"] for v in res["domains"].values()) / max(1, len(res["domains"]))
        em_items = [it for it in items if it.domain in exact_match_domains]
        if em_items:
            res["exact_match"] = exact_match(engine, em_items, mode, max_new_tokens)
        results[mode] = res
    return results


def _check_mode(engine, mode: str) -> None:
    if mode in ("base", "label"):
        if mode == "label" and not engine.experts:
            raise ValueError("mode 'label' needs experts (a MoA directory)")
        return
    if mode in STRATEGIES:
        if not engine.router_domains:
            raise ValueError(f"mode {mode!r} needs routers; the MoA directory has none (run `moa train router`)")
        return
    if mode not in engine.experts:
        raise ValueError(
            f"mode {mode!r} is not base, label, a strategy {list(STRATEGIES)} or an expert {engine.experts}"
        )
