"""Markdown tables of the evaluation results."""

from __future__ import annotations


def _domains_of(rows) -> list[str]:
    """Every domain of the rows' "domains", in first-seen order."""
    return list(dict.fromkeys(d for row in rows for d in row["domains"]))


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
        lines.append(
            f"| {strategy} | " + " | ".join(cell(r["domains"].get(d)) for d in domains) + f" | {cell(r['overall'])} |"
        )
    return "\n".join(lines)


def comparison_table(pairs: dict) -> str:
    """Rows: {title: compare(...)}; columns: the change in average perplexity, its interval, the
    share of draws where the first system is lower, and each domain's change."""
    domains = _domains_of(pairs.values())
    conf = next(iter(pairs.values()))["confidence"] if pairs else 0.95
    head = ["comparison", "avg ppl change", f"{100 * conf:.0f}% interval", "P(lower)"] + [
        f"{d} change" for d in domains
    ]
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


def add_domain_table(growth: dict, modes=("label", "last"), routed: str = "last") -> str:
    """A markdown table of add_domain_experiment's result: a row per old domain, its perplexity
    before and after the new domain was added and the change, for each of `modes`, and the
    router accuracy of strategy `routed` before and after."""
    before, after = growth["before"], growth["after"]
    lines = [
        "| domain | "
        + " | ".join(f"{m} ppl before | after | change" for m in modes)
        + " | router acc before | after |",
        "|---|" + "---|---|---|" * len(modes) + "---|---|",
    ]
    for d in growth["old_domains"]:
        cells = []
        for mode in modes:
            b, a = before[mode]["domains"][d]["ppl"], after[mode]["domains"][d]["ppl"]
            cells += [f"{b:.3f}", f"{a:.3f}", f"{growth['change_pct'][mode][d]:+.2f}%"]
        acc_b = before[routed]["router_accuracy"].get(d, float("nan"))
        acc_a = after[routed]["router_accuracy"].get(d, float("nan"))
        lines.append(f"| {d} | " + " | ".join(cells) + f" | {100 * acc_b:.1f}% | {100 * acc_a:.1f}% |")
    return "\n".join(lines)
