"""Prometheus metrics: engine state read from its latest stats, and per-request latency histograms.

The gauges and counters come from the engine's `stats()` snapshot at scrape time (a custom
collector), so they are exactly the engine's numbers; the histograms are observed by the HTTP
layer as it hands each token to the client.
"""
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
                  0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

# name, help, EngineStats field
_GAUGES = (("jllm_requests_running", "Requests in the running batch.", "running"),
           ("jllm_requests_waiting", "Requests waiting to be scheduled.", "waiting"),
           ("jllm_kv_cache_usage_ratio", "Fraction of KV cache pages in use (0..1).", "kv_cache_usage"),
           ("jllm_kv_cache_pages_used", "KV cache pages in use.", "pages_used"),
           ("jllm_kv_cache_pages_total", "KV cache pages in all.", "pages_total"),
           ("jllm_kv_cache_pages_cached", "Unreferenced pages the prefix cache keeps.", "pages_cached"),
           ("jllm_prefix_cache_hit_ratio", "Prompt tokens served from the prefix cache / prompt "
            "tokens.", "prefix_cache_hit_ratio"))
_COUNTERS = (("jllm_requests_aborted", "Requests aborted (client gone or shutdown).", "aborted"),
             ("jllm_prompt_tokens", "Prompt tokens processed.", "prompt_tokens"),
             ("jllm_generation_tokens", "Tokens generated.", "generated_tokens"),
             ("jllm_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
              "prefix_hit_tokens"),
             ("jllm_preemptions", "Requests preempted (pages short) and recomputed later.",
              "preemptions"))


class _EngineCollector:
    def __init__(self, stats: Callable[[], object]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        if s is None:
            return
        for name, doc, field in _GAUGES:
            yield GaugeMetricFamily(name, doc, value=float(getattr(s, field)))
        for name, doc, field in _COUNTERS:
            yield CounterMetricFamily(name, doc, value=float(getattr(s, field)))


class Metrics:
    """The server's registry; `stats()` returns the engine's latest EngineStats (or None)."""

    def __init__(self, stats: Callable[[], object]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        kw = dict(registry=self.registry)
        self.ttft = Histogram("jllm_time_to_first_token_seconds",
                              "From the request's arrival to its first token leaving the server.",
                              buckets=_LATENCY_BUCKETS, **kw)
        self.itl = Histogram("jllm_inter_token_latency_seconds",
                             "Time between tokens of a request, as the server hands them out.",
                             buckets=_TOKEN_BUCKETS, **kw)
        self.latency = Histogram("jllm_request_latency_seconds",
                                 "From the request's arrival to its last token.",
                                 buckets=_LATENCY_BUCKETS, **kw)
        self.rejected = Counter("jllm_requests_rejected", "Requests refused: 429 (queue full) "
                                "or 503 (shutting down).", ["reason"], **kw)

    def render(self) -> bytes:
        return generate_latest(self.registry)
