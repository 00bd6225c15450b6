"""Prometheus metrics of one server instance, in a registry of its own.

A registry per app (not the process-global default) keeps two apps in one process, as in tests
and benchmarks, from sharing or double-registering counters.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    """The server's counters, histograms and gauges; :meth:`render` gives the text exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ssole_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.request_latency = Histogram(
            "ssole_request_latency_seconds",
            "Time from request received to response sent, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "ssole_queue_time_seconds",
            "Time an image waited in the queue before its forward pass.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_time = Histogram(
            "ssole_inference_seconds",
            "Duration of one forward pass over a batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "ssole_batch_size", "Images per forward pass.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "ssole_queue_depth", "Images waiting for a forward pass.", registry=r
        )
        self.decoding = Gauge(
            "ssole_decoding_images",
            "Images being decoded, which a batch below its target size waits for.",
            registry=r,
        )
        self.images = Counter("ssole_images", "Images embedded.", registry=r)
        self.decode_errors = Counter(
            "ssole_decode_errors",
            "Images rejected while decoding, by error code.",
            ["code"],
            registry=r,
        )
        self.rejected = Counter(
            "ssole_rejected",
            "Requests turned away before queueing, by reason.",
            ["reason"],
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric in this registry."""
        return generate_latest(self.registry)
