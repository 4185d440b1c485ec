"""Prometheus metrics of a star-serve process (prometheus_client), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("star_requests", "Chat-completion requests by HTTP status", ["status"], registry=r)
        self.ttft = Histogram(
            "star_time_to_first_token_seconds", "Arrival to first generated token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.per_token = Histogram(
            "star_time_per_output_token_seconds",
            "Time between a request's consecutive tokens",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "star_request_latency_seconds",
            "Arrival to last token of successful requests",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("star_queue_depth", "Requests waiting to join the running batch", registry=r)
        self.running = Gauge("star_running_batch_size", "Rows in the running batch", registry=r)
        self.batch_size = Histogram(
            "star_decode_batch_size", "Rows per decode step", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r
        )
        self.tokens_generated = Counter("star_generation_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("star_prompt_tokens", "Prompt tokens (image tokens counted unpruned)", registry=r)
        self.connections_closed = Counter(
            "star_connections_closed",
            "Connections closed before a request: header_timeout, connection_limit",
            ["reason"],
            registry=r,
        )
        self.visual = Counter(
            "star_visual_tokens",
            "Visual tokens per STAR stage: input, after stage 1, kept after stage 2",
            ["stage"],
            registry=r,
        )

    def token(self, since_last: float, first: bool) -> None:
        (self.ttft if first else self.per_token).observe(since_last)

    def visual_tokens(self, total: int, stage1: int, kept: int) -> None:
        for stage, n in (("input", total), ("stage1", stage1), ("kept", kept)):
            self.visual.labels(stage).inc(n)
