"""Prometheus metrics of the edge server (one registry per app, so tests can run several)."""

from __future__ import annotations

from typing import Any

__all__ = ["ServeMetrics"]


class ServeMetrics:
    def __init__(self) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError("metrics need prometheus-client: pip install 'tensorfabric[serve]'") from exc
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "tensorfabric_requests", "Answered chat requests by tier, routing reason and degraded flag",
            ["tier", "reason", "degraded"], registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "tensorfabric_rejected", "Requests refused, by HTTP status", ["status"], registry=r
        )
        self.latency = Histogram(
            "tensorfabric_request_seconds", "Wall time per chat request by answering tier", ["tier"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128), registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "tensorfabric_time_to_first_token_seconds", "Time to the first streamed text", ["tier"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32), registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "tensorfabric_completion_tokens", "Generated tokens by tier", ["tier"], registry=r
        )
        self.confidence = Histogram(
            "tensorfabric_route_confidence", "Edge probe score (mean token log-probability)",
            buckets=(-5, -3, -2, -1.5, -1, -0.75, -0.5, -0.25, -0.1, 0), registry=r,
        )  # fmt: skip
        self.pii = Counter(
            "tensorfabric_pii_entities", "PII entities replaced before leaving the edge", ["kind"],
            registry=r,
        )  # fmt: skip
        self.cloud_up = Gauge("tensorfabric_cloud_up", "1 while the cloud tier is in use", registry=r)
        self.inflight = Gauge("tensorfabric_requests_in_flight", "Admitted requests", registry=r)

    def record(self, done: Any, seconds: float) -> None:
        self.requests.labels(done.tier, done.reason, str(done.degraded).lower()).inc()
        self.latency.labels(done.tier).observe(seconds)
        self.tokens.labels(done.tier).inc(done.completion_tokens)
        if done.confidence is not None:
            self.confidence.observe(done.confidence)
        for kind, n in done.pii.items():
            self.pii.labels(kind).inc(n)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
