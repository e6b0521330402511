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

The modules: scoring.py (perplexity, exact match, evaluate), routing.py (routing_accuracy),
comparison.py (compare), tables.py (the markdown tables), experiments.py (the add-a-domain
experiment) and cli.py (`moa eval`).
"""

from .comparison import compare
from .experiments import add_domain_experiment, perplexity_change

# The private names that moa_engine/evaluation.py had, for the callers (and tests) that use them.
from .routing import (
    _collapse,  # noqa: F401, E402
    routing_accuracy,
    wilson_interval,
)
from .scoring import (  # noqa: F401, E402
    STRATEGIES,
    _check_mode,
    _domain_arg,
    _Item,
    _items,
    _nll,
    _normalise,
    evaluate,
    exact_match,
    first_per_domain,
    perplexity,
)
from .tables import (
    _domains_of,  # noqa: F401, E402
    add_domain_table,
    comparison_table,
    markdown_table,
    routing_table,
)

__all__ = [
    "STRATEGIES",
    "add_domain_experiment",
    "add_domain_table",
    "compare",
    "comparison_table",
    "evaluate",
    "exact_match",
    "first_per_domain",
    "markdown_table",
    "perplexity",
    "perplexity_change",
    "routing_accuracy",
    "routing_table",
    "wilson_interval",
]
