"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Requests, tokens, TTFT/TPOT histograms, queue depth, decode and prefill batch sizes."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ecospa_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("ecospa_prompt_tokens", "prompt tokens prefilled",
                                     registry=r)
        self.generation_tokens = Counter("ecospa_generation_tokens", "tokens generated",
                                         registry=r)
        self.ttft = Histogram("ecospa_time_to_first_token_seconds",
                              "arrival to first token, queueing included",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("ecospa_time_per_output_token_seconds",
                              "mean time between tokens after the first, per sequence",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("ecospa_request_latency_seconds", "arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("ecospa_queue_depth", "sequences waiting for a slot",
                                 registry=r)
        self.running = Gauge("ecospa_running_sequences", "sequences holding a slot",
                             registry=r)
        self.batch_size = Histogram("ecospa_batch_size", "sequences decoded per step",
                                    buckets=_BATCH_BUCKETS, registry=r)
        # a burst's TTFTs depend on how many prompts share a (shortest-first) prefill call
        self.prefill_batch_size = Histogram("ecospa_prefill_batch_size",
                                            "whole prompts prefilled in one backend call",
                                            buckets=_BATCH_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
