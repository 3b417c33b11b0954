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
        self.queue = Gauge("tensorfabric_tier_queue_depth", "Requests waiting for the tier's engine",
                           ["tier"], registry=r)  # fmt: skip
        self.batch = Gauge("tensorfabric_tier_batch_size", "Requests the tier's engine runs at once",
                           ["tier"], registry=r)  # fmt: skip
        self.kv = Gauge("tensorfabric_tier_kv_usage", "KV cache in use (0-1; vLLM tiers)", ["tier"],
                        registry=r)  # fmt: skip
        self.tps = Gauge("tensorfabric_tier_tokens_per_second",
                         "Output tokens per second over the last scrape interval", ["tier"], registry=r)
        self.hold = Gauge("tensorfabric_tier_hold_seconds",
                          "How long the tier works on one request (the moving average admission "
                          "control uses; 0 until measured)", ["tier"], registry=r)  # fmt: skip
        self._last_tokens: dict[str, tuple[float, float]] = {}
        self._answered_tokens: dict[str, float] = {}

    def record(self, done: Any, seconds: float) -> None:
        self.requests.labels(done.tier, done.reason, str(done.degraded).lower()).inc()
        self.latency.labels(done.tier).observe(seconds)
        self.tokens.labels(done.tier).inc(done.completion_tokens)
        self._answered_tokens[done.tier] = self._answered_tokens.get(done.tier, 0.0) + done.completion_tokens
        if done.confidence is not None:
            self.confidence.observe(done.confidence)
        for kind, n in done.pii.items():
            self.pii.labels(kind).inc(n)

    def update_tiers(self, stats: dict[str, dict[str, float]]) -> None:
        """Refresh the per-tier gauges (at scrape time) from :meth:`EdgeTier.tier_stats`."""
        import time

        now = time.monotonic()
        for tier, st in stats.items():
            self.queue.labels(tier).set(st.get("queue", 0.0))
            self.batch.labels(tier).set(st.get("batch", 0.0))
            self.kv.labels(tier).set(st.get("kv_usage", 0.0))
            self.hold.labels(tier).set(st.get("hold", 0.0))
            # tokens the tier generated: its engine's own count where it reports one (vLLM
            # counts every request, wherever it came from), else the answers recorded here
            total = st.get("generated")
            if total is None:
                total = self._answered_tokens.get(tier, 0.0)
            prev = self._last_tokens.get(tier)
            if prev is not None and now > prev[0]:
                self.tps.labels(tier).set(max(total - prev[1], 0.0) / (now - prev[0]))
            self._last_tokens[tier] = (now, total)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
