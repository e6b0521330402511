"""Evaluation of a MoA directory (or a base model) through the serving engine: what is evaluated
is what is served (Engine.forward is the generation forward).

For each domain of the held-out records:
  perplexity   exp(mean NLL) over the scored tokens (a chat record's response; a text record's
               every token but the first), the sequence served with
                 "base"       no expert,
                 "label"      the record's own domain's expert,
                 a strategy   ("per_layer", "last", "vote") the routers' choice, routed over the
                              prompt only, as a request is at prefill,
                 an expert    a fixed expert for every record (e.g. one LoRA trained on mixed data);
  router accuracy   for a strategy: the share of records whose chosen expert is their own domain
               (per_layer: the share of (record, layer) choices);
  routing accuracy   (routing_accuracy) the routers alone, on records' routing prompts: each
               domain's share with a Wilson interval and the confusion counts; cheap enough for
               many more records than the perplexity runs score;
  exact match  for chat records of the domains in `exact_match_domains`: greedy generation from the
               prompt, served the same way, equal to the response after stripping whitespace.

Each mode's result keeps every record's NLL sum and scored-token count, so two systems scored on
the same records can be compared record by record: `compare` gives the change in average
perplexity with a paired, domain-stratified bootstrap interval.
"""

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
            logits, routing = engine.forward(ids, domain=None, return_routing=True, route_len=[it.route_len for it in chunk],
                                             routing=mode)  # fmt: skip
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
    out = {d: {"nll": s[0] / max(1, s[1]), "tokens": s[1], "ppl": math.exp(s[0] / max(1, s[1]))} for d, s in sums.items()}
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
        outs = engine.generate(prompts, max_new_tokens=max_new_tokens, chat=True, domain=[_domain_arg(mode, it) for it in chat])
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


def routing_accuracy(engine, records: list[Record], strategies=("last",), max_len: int = 512, batch: int = 64,
                     confidence: float = 0.95) -> dict:
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
    from moa_engine.training.dataset import encode_chat, encode_text

    # Each record's routing prompt, encoded as in training (a chat record's prompt with the
    # template's assistant header; a text record's text), its first max_len tokens.
    prompts = []
    for r in records:
        if r.is_chat:
            ids, prompt_len = encode_chat(engine.tokenizer, r.prompt, r.response)
            ids = ids[:prompt_len]
        else:
            ids = encode_text(engine.tokenizer, r.text)
        prompts.append(ids[:max_len])
    # One routing pass serves every strategy: per_layer keeps the pass's per-layer choices, and
    # last / vote collapse them (the engine's rule, checked against it in the tests).
    layer_choices = []
    for start in range(0, len(prompts), batch):
        layer_choices += [list(r.layer_domains) for r in engine.route(prompts[start : start + batch], routing="per_layer")]
    out = {}
    for strategy in strategies:
        confusion: dict[str, dict[str, int]] = {}
        for rec, layers in zip(records, layer_choices):
            row = confusion.setdefault(rec.domain, {})
            for c in layers if strategy == "per_layer" else [_collapse(layers, strategy)]:
                row[c] = row.get(c, 0) + 1

        def summary(hits: int, n: int) -> dict:
            interval = wilson_interval(hits, n, confidence) if strategy != "per_layer" else None
            return {"hits": hits, "n": n, "accuracy": hits / n, "interval": interval}

        domains = {d: summary(confusion[d].get(d, 0), sum(confusion[d].values()))
                   for d in sorted(confusion, key=engine.router_domains.index)}  # fmt: skip
        overall = summary(sum(v["hits"] for v in domains.values()), sum(v["n"] for v in domains.values()))
        out[strategy] = {"domains": domains, "overall": overall, "confusion": confusion, "confidence": confidence}
    return out


def routing_table(result: dict) -> str:
    """A markdown table of routing_accuracy's result: a row per strategy, a column per domain
    (accuracy, hits of n, interval) and the overall share."""
    domains = _domains_of(result.values())
    lines = ["| strategy | " + " | ".join(domains) + " | overall |", "|" + "---|" * (len(domains) + 2)]

    def cell(v: dict | None) -> str:
        if v is None:
            return ""
        text = f"{100 * v['accuracy']:.1f}% ({v['hits']}/{v['n']})"
        if v["interval"] is not None:
            text += f" [{100 * v['interval'][0]:.1f}, {100 * v['interval'][1]:.1f}]"
        return text

    for strategy, r in result.items():
        lines.append(f"| {strategy} | " + " | ".join(cell(r["domains"].get(d)) for d in domains) + f" | {cell(r['overall'])} |")
    return "\n".join(lines)


def compare(a: dict, b: dict, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """System a against system b, both scored on the same records (results of `evaluate` for one
    mode each): the change in average perplexity, 100 * (avg_ppl(a) / avg_ppl(b) - 1), with a
    paired bootstrap interval.

    Each of n_boot draws resamples every domain's records with replacement (the same records for
    a and b, so what the two systems share cancels), recomputes each domain's perplexity
    exp(sum NLL / sum tokens) and averages over the domains as `evaluate` does. The interval is
    the draws' central `confidence` share (percentile bootstrap).

    Returns {"change_pct", "interval_pct": [lo, hi], "p_lower": share of draws where a's average
    perplexity is below b's, "n_boot", "confidence", "records": {domain: n}, "domains": {d:
    {"change_pct", "interval_pct"}}}."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    ra, rb = a.get("records"), b.get("records")
    if ra is None or rb is None:
        raise ValueError("compare needs per-record results (a mode's result from evaluate)")
    if set(ra) != set(rb):
        raise ValueError(f"the two systems were scored on different domains: {sorted(ra)} vs {sorted(rb)}")
    if not ra:
        raise ValueError("no scored records to compare")
    gen = torch.Generator().manual_seed(seed)
    avg_a = torch.zeros(n_boot + 1, dtype=torch.float64)
    avg_b = torch.zeros_like(avg_a)
    per_domain = {}
    for d in ra:
        if ra[d]["tokens"] != rb[d]["tokens"]:
            raise ValueError(f"domain {d!r}: the two systems' records differ (scored-token counts do not match); "
                             "compare needs both scored on the same records with the same tokenizer")  # fmt: skip
        tokens = torch.tensor(ra[d]["tokens"], dtype=torch.float64)
        nll_a = torch.tensor(ra[d]["nll"], dtype=torch.float64)
        nll_b = torch.tensor(rb[d]["nll"], dtype=torch.float64)
        n = len(tokens)
        # Row 0 is the sample itself; rows 1.. are the bootstrap draws.
        idx = torch.cat([torch.arange(n)[None], torch.randint(0, n, (n_boot, n), generator=gen)])
        count = tokens[idx].sum(1).clamp_min(1.0)
        ppl_a = torch.exp(nll_a[idx].sum(1) / count)
        ppl_b = torch.exp(nll_b[idx].sum(1) / count)
        avg_a += ppl_a / len(ra)
        avg_b += ppl_b / len(ra)
        per_domain[d] = 100.0 * (ppl_a / ppl_b - 1.0)
    alpha = (1.0 - confidence) / 2.0

    def summary(change: torch.Tensor) -> dict:
        lo, hi = torch.quantile(change[1:], torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
        return {"change_pct": float(change[0]), "interval_pct": [lo, hi]}

    out = summary(100.0 * (avg_a / avg_b - 1.0))
    out.update(p_lower=float((avg_a[1:] < avg_b[1:]).double().mean()), n_boot=n_boot, confidence=confidence,
               records={d: len(ra[d]["tokens"]) for d in ra}, domains={d: summary(c) for d, c in per_domain.items()})  # fmt: skip
    return out


def _domains_of(rows) -> list[str]:
    """Every domain of the rows' "domains", in first-seen order."""
    return list(dict.fromkeys(d for row in rows for d in row["domains"]))


def comparison_table(pairs: dict) -> str:
    """Rows: {title: compare(...)}; columns: the change in average perplexity, its interval, the
    share of draws where the first system is lower, and each domain's change."""
    domains = _domains_of(pairs.values())
    conf = next(iter(pairs.values()))["confidence"] if pairs else 0.95
    head = ["comparison", "avg ppl change", f"{100 * conf:.0f}% interval", "P(lower)"] + [f"{d} change" for d in domains]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for title, c in pairs.items():
        lo, hi = c["interval_pct"]
        row = [title, f"{c['change_pct']:+.2f}%", f"[{lo:+.2f}%, {hi:+.2f}%]", f"{100 * c['p_lower']:.0f}%"]
        for d in domains:
            if d in c["domains"]:
                dlo, dhi = c["domains"][d]["interval_pct"]
                row.append(f"{c['domains'][d]['change_pct']:+.2f}% [{dlo:+.1f}, {dhi:+.1f}]")
            else:
                row.append("")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


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
        raise ValueError(f"mode {mode!r} is not base, label, a strategy {list(STRATEGIES)} or an expert {engine.experts}")


def markdown_table(results: dict, title_of=lambda m: m) -> str:
    """Rows: systems; columns: each domain's perplexity, the average, router accuracy, exact match."""
    domains = _domains_of(results.values())
    head = ["system"] + [f"{d} ppl" for d in domains] + ["avg ppl", "router acc", "exact match"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, res in results.items():
        row = [title_of(mode)]
        row += [f"{res['domains'][d]['ppl']:.3f}" if d in res["domains"] else "" for d in domains]
        row.append(f"{res['average_ppl']:.3f}")
        acc = res.get("router_accuracy")
        row.append(f"{100 * sum(acc.values()) / len(acc):.1f}%" if acc else "")
        em = res.get("exact_match")
        row.append(", ".join(f"{d} {100 * v:.0f}%" for d, v in em.items()) if em else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
