"""Two systems scored on the same records, compared record by record: the change in average
perplexity with a paired, domain-stratified bootstrap interval."""

from __future__ import annotations

import torch


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
            raise ValueError(
                f"domain {d!r}: the two systems' records differ (scored-token counts do not match); "
                "compare needs both scored on the same records with the same tokenizer"
            )
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
    out.update(
        p_lower=float((avg_a[1:] < avg_b[1:]).double().mean()),
        n_boot=n_boot,
        confidence=confidence,
        records={d: len(ra[d]["tokens"]) for d in ra},
        domains={d: summary(c) for d, c in per_domain.items()},
    )
    return out
