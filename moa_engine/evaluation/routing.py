"""The routers alone: how often they pick each record's own domain (routing_accuracy), with
Wilson intervals."""

from __future__ import annotations

import math

import torch

from moa_engine.data.records import Record

from .scoring import STRATEGIES


def wilson_interval(hits: int, n: int, confidence: float = 0.95) -> list[float]:
    """The Wilson score interval of a binomial share hits / n (sound near 0 and 1, where the
    normal approximation is not)."""
    if n < 1 or not 0 <= hits <= n:
        raise ValueError(f"wilson_interval: need 0 <= hits <= n and n >= 1, got {hits} of {n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + confidence / 2.0, dtype=torch.float64)))
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 or n hits an end is exactly 0 or 1; rounding would leave it a hair off.
    return [0.0 if hits == 0 else max(0.0, centre - half), 1.0 if hits == n else min(1.0, centre + half)]


def _collapse(layers: list[str], strategy: str) -> str:
    """The one expert "last" or "vote" serves all layers with, from the routing pass's per-layer
    choices: the last layer's, or the most frequent (a tie goes to the later layer's)."""
    choice = layers[-1]
    if strategy == "vote":
        votes = {d: layers.count(d) for d in layers}
        for d in reversed(layers):
            if votes[d] > votes[choice]:
                choice = d
    return choice


def routing_accuracy(
    engine, records: list[Record], strategies=("last",), max_len: int = 512, batch: int = 64, confidence: float = 0.95
) -> dict:
    """How often the routers pick each record's own domain, routing only: each record's routing
    prompt (what a request is routed over at prefill: a chat record's prompt, a text record's
    text, cut at max_len tokens) goes through one routing pass (Engine.route), and each strategy's
    choice is read from it.

    Unlike perplexity, no record is skipped: a chat prompt longer than max_len is routed over its
    first max_len tokens.

    {strategy: {"domains": {d: {"hits", "n", "accuracy", "interval"}}, "overall": {...},
    "confusion": {own domain: {chosen: count}}}}. last / vote count one choice per record, with a
    Wilson interval; per_layer counts every layer's choice (the share perplexity() reports), and
    as those are not independent it has no interval. Records of a domain the routers do not
    know are an error."""
    _check_routing_args(engine, records, strategies, max_len)
    prompts = _routing_prompts(engine, records, max_len)
    # One routing pass serves every strategy: per_layer keeps the pass's per-layer choices, and
    # last / vote collapse them (the engine's rule, checked against it in the tests).
    layer_choices = []
    for start in range(0, len(prompts), batch):
        layer_choices += [
            list(r.layer_domains) for r in engine.route(prompts[start : start + batch], routing="per_layer")
        ]
    return {s: _strategy_accuracy(records, layer_choices, s, engine.router_domains, confidence) for s in strategies}


def _check_routing_args(engine, records: list[Record], strategies, max_len: int) -> None:
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"strategy {s!r} is not one of {list(STRATEGIES)}")
    if not engine.router_domains:
        raise ValueError("routing_accuracy needs routers; the engine has none")
    known = set(engine.router_domains)
    unknown = sorted({r.domain for r in records} - known)
    if unknown:
        raise ValueError(f"records of domain(s) {unknown} the routers do not know (they know {sorted(known)})")
    if not records:
        raise ValueError("routing_accuracy: no records to route")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if engine.tokenizer is None:
        raise ValueError(f"routing_accuracy needs a tokenizer; {engine.model_path} has none")


def _routing_prompts(engine, records: list[Record], max_len: int) -> list[list[int]]:
    """Each record's routing prompt, encoded as in training (a chat record's prompt with the
    template's assistant header; a text record's text), its first max_len tokens."""
    from moa_engine.training.dataset import encode_chat, encode_text

    prompts = []
    for r in records:
        if r.is_chat:
            ids, prompt_len = encode_chat(engine.tokenizer, r.prompt, r.response)
            ids = ids[:prompt_len]
        else:
            ids = encode_text(engine.tokenizer, r.text)
        prompts.append(ids[:max_len])
    return prompts


def _strategy_accuracy(
    records: list[Record], layer_choices: list[list[str]], strategy: str, router_domains: list[str], confidence: float
) -> dict:
    """One strategy's entry of routing_accuracy's result, from every record's per-layer choices."""
    confusion: dict[str, dict[str, int]] = {}
    for rec, layers in zip(records, layer_choices):
        row = confusion.setdefault(rec.domain, {})
        for c in layers if strategy == "per_layer" else [_collapse(layers, strategy)]:
            row[c] = row.get(c, 0) + 1

    def summary(hits: int, n: int) -> dict:
        interval = wilson_interval(hits, n, confidence) if strategy != "per_layer" else None
        return {"hits": hits, "n": n, "accuracy": hits / n, "interval": interval}

    domains = {
        d: summary(confusion[d].get(d, 0), sum(confusion[d].values()))
        for d in sorted(confusion, key=router_domains.index)
    }
    overall = summary(sum(v["hits"] for v in domains.values()), sum(v["n"] for v in domains.values()))
    return {"domains": domains, "overall": overall, "confusion": confusion, "confidence": confidence}
