"""`GET /metrics`: the server's state and load in Prometheus' text format (`prometheus-client`).

What an operator watches: requests by endpoint and HTTP status, prompt and completion tokens, queue depth,
running slots, time to first token and the time between a request's deliveries (inter-token latency;
one delivery holds one token, or several when the engine runs several steps per call), decode steps,
rejections, compilations after warm-up, and the prefix cache (hits, tokens reused, bytes held, evictions).
Counters and gauges the engine already keeps (`Stats`) are read when scraped, so the engine thread does no
extra work per token; latencies are observed by the HTTP handlers, on the event loop.

Each app has its own registry (not prometheus-client's global one), so several servers in one process
(tests, notebooks) do not share numbers.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
KNOWN_PATHS = ("/v1/completions", "/v1/models", "/health")

# Seconds: from a few milliseconds (an accelerator's decode step) to minutes (a long CPU prefill).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _EngineCollector:
    """The engine's own counters (`engine.stats`), read at scrape time."""

    def __init__(self, stats: Callable[[], Any]):
        self._stats = stats

    def collect(self):
        s = self._stats()
        for name, value, help_ in (("steps", s.steps, "decode steps run"),
                                   ("completion_tokens", s.tokens, "tokens generated"),
                                   ("rejected_requests", s.rejected, "requests refused with 503, queue full"),
                                   ("compiles_after_warmup", s.compiles_after_warmup,
                                    "programs compiled after warm-up (each one stalls every stream)"),
                                   ("prefix_cache_hits", s.prefix_hits, "prefills that reused a cached prompt prefix"),
                                   ("prefix_cache_hit_tokens", s.prefix_hit_tokens,
                                    "prompt tokens reused from the prefix cache instead of prefilled"),
                                   ("prefill_chunks", s.prefill_chunks,
                                    "chunks of long prompts prefilled between decoding steps (--prefill_chunk)"),
                                   ("draft_tokens_proposed", s.draft_proposed,
                                    "draft tokens checked by the target model (--draft_model)"),
                                   ("draft_tokens_accepted", s.draft_accepted,
                                    "draft tokens kept: emitted without a target step of their own"),
                                   ("prefix_cache_evictions", s.prefix_evictions,
                                    "prefix cache blocks dropped (least recently used, or device memory short)")):
            yield CounterMetricFamily(f"flax_gpt2_{name}", help_, value=value)
        for name, value, help_ in (("queue_depth", s.queued, "sequences waiting for a slot"),
                                   ("running_slots", s.busy_slots, "slots holding a running sequence"),
                                   ("peak_running_slots", s.peak_busy_slots, "most slots busy at once"),
                                   ("prefix_cache_bytes", s.prefix_cache_bytes, "device memory the prefix cache holds"),
                                   ("prefix_cache_blocks", s.prefix_cache_blocks, "blocks the prefix cache holds")):
            yield GaugeMetricFamily(f"flax_gpt2_{name}", help_, value=value)


class ServerMetrics:
    """The metrics of one app; `render()` is the body of `GET /metrics`."""

    def __init__(self, stats: Callable[[], Any]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.requests = Counter("flax_gpt2_http_requests", "HTTP requests answered, by path and status",
                                ("path", "status"), registry=self.registry)
        self.prompt_tokens = Counter("flax_gpt2_prompt_tokens", "prompt tokens of accepted completions requests",
                                     registry=self.registry)
        self.time_to_first_token = Histogram(
            "flax_gpt2_time_to_first_token_seconds", "from a request's arrival to its first generated text",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            "flax_gpt2_inter_token_latency_seconds", "between consecutive deliveries of new text to one request",
            buckets=_LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountResponses:
    """An ASGI middleware counting every HTTP response by path and status (`/metrics` itself excluded); a
    streamed response is counted when its headers are sent."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/metrics":
            return await self.app(scope, receive, send)
        # Known paths only as labels: a scanner's random URLs must not grow the label set without bound.
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"

        async def send_counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path=path, status=str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, send_counted)


class RequestClock:
    """Times one request's deliveries: the first one observes time to first token, the later ones the
    inter-token latency."""

    def __init__(self, metrics: ServerMetrics, arrived: float):
        self.metrics, self.last = metrics, arrived
        self.first = True

    def delivered(self) -> None:
        now = time.perf_counter()
        (self.metrics.time_to_first_token if self.first else self.metrics.inter_token_latency).observe(now - self.last)
        self.first, self.last = False, now
