"""The server's Prometheus metrics, in a registry of their own (one per app, so that several
servers in one process, as in tests, do not share counters).

Beside the usual serving metrics (vLLM's set, under the moa_ prefix), the per-expert counters
and the routers' decisions: what an adapter-aware gateway routes on, and what no peer exports.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

# No *_created series: they double the output and no dashboard reads them.
disable_created_metrics()

# Latency buckets: decode steps of a small model on CPU are milliseconds, a long prefill seconds.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_REQUEST = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)

STATUSES = ("stop", "length", "cancelled", "error", "rejected")


class ServerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "moa_requests",
            "Requests (one per choice) by how they ended: stop, length, cancelled, error, rejected",
            ["status"],
            registry=r,
        )
        self.prompt_tokens = Counter("moa_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("moa_generation_tokens", "Generated tokens", registry=r)
        self.running = Gauge("moa_requests_running", "Requests with a KV-cache slot, decoding", registry=r)
        self.waiting = Gauge("moa_requests_waiting", "Requests accepted and waiting for a slot", registry=r)
        self.ttft = Histogram(
            "moa_time_to_first_token_seconds", "From arrival to the first generated token", buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            "moa_inter_token_latency_seconds", "Between consecutive tokens of a request", buckets=_LATENCY, registry=r
        )
        self.latency = Histogram(
            "moa_request_latency_seconds", "From arrival to the last token", buckets=_REQUEST, registry=r
        )
        self.expert_requests = Counter(
            "moa_expert_requests",
            "Finished requests by the expert that served them (base, mixed)",
            ["expert"],
            registry=r,
        )
        self.expert_tokens = Counter(
            "moa_expert_generation_tokens", "Generated tokens by expert (base, mixed)", ["expert"], registry=r
        )
        self.routing = Counter(
            "moa_routing_decisions",
            "The routers' decision per routed request: the expert chosen (mixed when layers differ), by strategy",
            ["domain", "strategy"],
            registry=r,
        )
        self.layer_routing = Counter(
            "moa_routing_layer_decisions",
            "The routers' choices per layer of routed requests, by expert and strategy",
            ["domain", "strategy"],
            registry=r,
        )
        for status in STATUSES:  # every status shows from the start, at 0
            self.requests.labels(status)

    def text(self) -> bytes:
        return generate_latest(self.registry)
