"""The paired bootstrap comparison of two evaluated systems (moa_engine.evaluation.compare),
checked on synthetic per-record results whose true difference is known; and the add-a-domain
experiment's table."""

from __future__ import annotations

import math

import pytest
import torch

from moa_engine.evaluation import add_domain_table, compare, comparison_table, perplexity_change


def _result(records: dict[str, tuple[list[float], list[int]]]) -> dict:
    """A mode's result as `evaluate` returns it, from per-record NLL sums and token counts."""
    domains = {}
    for d, (nll, tok) in records.items():
        mean = sum(nll) / sum(tok)
        domains[d] = {"nll": mean, "tokens": sum(tok), "ppl": math.exp(mean)}
    return {
        "domains": domains,
        "records": {d: {"nll": list(nll), "tokens": list(tok)} for d, (nll, tok) in records.items()},
        "average_ppl": sum(v["ppl"] for v in domains.values()) / len(domains),
    }


def _pair(gen: torch.Generator, shift: float, sizes=(37, 23), mus=(1.1, 2.3), effect=0.5, noise=0.1):
    """Two systems on the same records: each record has a per-token NLL mean+u_i shared by both
    (a hard or an easy record), and system a adds `shift` plus its own noise e_i. The population
    perplexities are exp(mu) and exp(mu + shift) in every domain, so the true change in average
    perplexity is 100 * (exp(shift) - 1)."""
    ra, rb = {}, {}
    for k, (n, mu) in enumerate(zip(sizes, mus)):
        tok = torch.randint(5, 60, (n,), generator=gen)
        u = effect * torch.randn(n, generator=gen, dtype=torch.float64)
        e = noise * torch.randn(n, generator=gen, dtype=torch.float64)
        rb[f"d{k}"] = ((tok * (mu + u)).tolist(), tok.tolist())
        ra[f"d{k}"] = ((tok * (mu + shift + u + e)).tolist(), tok.tolist())
    return _result(ra), _result(rb)


def _seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**31, (), generator=gen))


def test_the_point_estimate_is_the_change_in_average_perplexity(gen):
    a, b = _pair(gen, shift=-0.05, sizes=(11, 4, 29), mus=(0.7, 1.9, 2.4))
    c = compare(a, b, n_boot=300, seed=_seed(gen))
    assert c["change_pct"] == pytest.approx(100 * (a["average_ppl"] / b["average_ppl"] - 1), rel=1e-9, abs=1e-9)
    for d in a["domains"]:
        expected = 100 * (a["domains"][d]["ppl"] / b["domains"][d]["ppl"] - 1)
        assert c["domains"][d]["change_pct"] == pytest.approx(expected, rel=1e-9, abs=1e-9)
        lo, hi = c["domains"][d]["interval_pct"]
        assert lo <= hi
    lo, hi = c["interval_pct"]
    assert lo <= hi and 0.0 <= c["p_lower"] <= 1.0
    assert c["records"] == {"d0": 11, "d1": 4, "d2": 29} and c["n_boot"] == 300


def test_a_system_against_itself_changes_nothing(gen):
    a, _ = _pair(gen, shift=0.0)
    c = compare(a, a, n_boot=200)
    assert c["change_pct"] == 0.0 and c["interval_pct"] == [0.0, 0.0] and c["p_lower"] == 0.0


def test_the_interval_covers_the_true_change_at_about_its_level_and_is_paired(gen):
    """Over 200 fresh data sets the 90% interval holds the true change about 90% of the time
    (the percentile bootstrap runs a little under its level on 23-37 records: about 87%).
    The records' shared difficulty (u_i, 5x the systems' own noise) cancels only if a and b are
    resampled together: an unpaired bootstrap would give intervals several times wider, covering
    nearly always, and a bootstrap that ignored the spread would cover far less."""
    shift = 0.03
    truth = 100 * (math.exp(shift) - 1)
    covered, widths = 0, []
    for trial in range(200):
        a, b = _pair(gen, shift)
        c = compare(a, b, n_boot=400, confidence=0.9, seed=trial)
        lo, hi = c["interval_pct"]
        covered += lo <= truth <= hi
        widths.append(hi - lo)
    assert 0.78 <= covered / 200 <= 0.97, f"coverage {covered}/200"
    # The paired interval's width is set by the systems' own noise (0.1 per token), not by the
    # records' difficulty (0.5): about 2 * 1.645 * 100 * 0.1 / sqrt(30), i.e. 6 points, not 30.
    assert sorted(widths)[100] < 12.0, f"median width {sorted(widths)[100]:.1f}"


def test_a_clear_improvement_is_lower_in_nearly_every_draw(gen):
    a, b = _pair(gen, shift=-0.3, sizes=(40, 40))
    c = compare(a, b, n_boot=500)
    assert c["interval_pct"][1] < 0.0 and c["p_lower"] > 0.99
    a, b = _pair(gen, shift=+0.3, sizes=(40, 40))
    c = compare(a, b, n_boot=500)
    assert c["interval_pct"][0] > 0.0 and c["p_lower"] < 0.01


def test_compare_refuses_results_it_cannot_pair(gen):
    a, b = _pair(gen, shift=0.0)
    other = dict(b, records={"d0": b["records"]["d0"]})
    with pytest.raises(ValueError, match="different domains"):
        compare(a, other)
    moved = {d: dict(v) for d, v in b["records"].items()}
    moved["d1"]["tokens"] = moved["d1"]["tokens"][1:] + moved["d1"]["tokens"][:1]
    with pytest.raises(ValueError, match="domain 'd1'.*records differ"):
        compare(a, dict(b, records=moved))
    with pytest.raises(ValueError, match="per-record results"):
        compare({"domains": a["domains"]}, b)
    with pytest.raises(ValueError, match="n_boot"):
        compare(a, b, n_boot=0)
    with pytest.raises(ValueError, match="confidence"):
        compare(a, b, confidence=1.0)


def test_comparison_table_has_a_row_per_pair_and_a_column_per_domain(gen):
    a, b = _pair(gen, shift=-0.1)
    table = comparison_table({"a vs b": compare(a, b, n_boot=100), "b vs a": compare(b, a, n_boot=100)})
    lines = table.splitlines()
    assert len(lines) == 4 and "d0 change" in lines[0] and "95% interval" in lines[0]
    assert lines[2].startswith("| a vs b | -") and lines[3].startswith("| b vs a | +")


def _scored(ppl: dict[str, float], router_accuracy: dict[str, float] | None = None) -> dict:
    """A mode's result as evaluate returns it, reduced to what the add-a-domain table reads."""
    out = {"domains": {d: {"ppl": p} for d, p in ppl.items()}}
    if router_accuracy is not None:
        out["router_accuracy"] = router_accuracy
    return out


def test_add_domain_table_has_a_row_per_old_domain_with_the_changes(gen):
    old = ["d0", "d1", "d2"]
    ppl = {m: {d: 1.0 + 9.0 * float(torch.rand((), generator=gen)) for d in old} for m in ("label", "last")}
    moved = {m: {d: p * (0.9 + 0.2 * float(torch.rand((), generator=gen))) for d, p in ppl[m].items()} for m in ppl}
    acc = {d: float(torch.rand((), generator=gen)) for d in old}
    before = {"label": _scored(ppl["label"]), "last": _scored(ppl["last"], acc)}
    after = {
        "label": _scored({**moved["label"], "new": 3.0}),
        "last": _scored({**moved["last"], "new": 3.0}, {**acc, "new": 1.0}),
    }
    change = {m: {d: perplexity_change(before[m], after[m], d) for d in old} for m in ("label", "last")}
    for m in change:
        for d in old:
            assert change[m][d] == pytest.approx(100.0 * (moved[m][d] / ppl[m][d] - 1.0), rel=1e-12)
    growth = {"old_domains": old, "new_domain": "new", "before": before, "after": after, "change_pct": change}
    lines = add_domain_table(growth).splitlines()
    assert (
        lines[0]
        == "| domain | label ppl before | after | change | last ppl before | after | change | router acc before | after |"
    )
    assert lines[1] == "|---|---|---|---|---|---|---|---|---|"
    assert len(lines) == 2 + len(old)
    for d, line in zip(old, lines[2:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == d
        assert cells[1:4] == [f"{ppl['label'][d]:.3f}", f"{moved['label'][d]:.3f}", f"{change['label'][d]:+.2f}%"]
        assert cells[4:7] == [f"{ppl['last'][d]:.3f}", f"{moved['last'][d]:.3f}", f"{change['last'][d]:+.2f}%"]
        assert cells[7:] == [f"{100 * acc[d]:.1f}%", f"{100 * acc[d]:.1f}%"]
    one = add_domain_table(growth, modes=("label",)).splitlines()
    assert (
        one[0] == "| domain | label ppl before | after | change | router acc before | after |"
        and len(one[2].split("|")) == 8
    )
