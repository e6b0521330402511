"""The routing vocabulary, named once: routing strategies and the domain sentinels.

    domain=ROUTE            the routers choose the expert at prefill (Engine.generate's default)
    domain=BASE             no expert: the base model alone
    Completion.domain MIXED per-layer routing chose different experts in different layers

A strategy decides how the per-layer routers' choices make one routing decision:
    per_layer   each layer uses its own router's choice
    last        the last layer's router picks one expert for every layer
    vote        the most frequent choice over the layers picks (a tie goes to the later layer)
The C++ engine defines the same names (csrc/include/moa/); docs/moa-serving.md describes them.
"""

from __future__ import annotations

STRATEGIES = ("per_layer", "last", "vote")
BASE = "base"
MIXED = "mixed"
ROUTE = None

__all__ = ["BASE", "MIXED", "ROUTE", "STRATEGIES"]
