"""Prometheus metrics, written in the text exposition format (0.0.4) by hand: a few counters, gauges
and histograms do not need a client library. All updates happen on the event loop thread.

Exported (prefix `starcoder2_`): HTTP requests by route and status and their latency; generations by
finish reason; prompt, generated and prefix-cache tokens; time to first token, generation time and
time per output token; engine queue depth, running rows and in-flight requests; the prefix-cache hit
rate (cached prompt tokens / prompt tokens since start) and the prefix cache's size in tokens and
bytes (it grows up to its token budget: memory growth that is not a leak); HTTP requests superseded by a newer one
from the same X-Client-Id; Tabby acceptance events.
"""

from __future__ import annotations

import math
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, math.inf)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, math.inf)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[next(i for i, b in enumerate(self.buckets) if value <= b)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, total = [], 0
        sep = "," if labels else ""
        for b, c in zip(self.buckets, self.counts):
            total += c
            le = "+Inf" if b == math.inf else repr(b)
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {total}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.sum}", f"{name}_count{braces} {self.count}"]
        return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self.http_requests: dict[tuple[str, str, int], int] = defaultdict(int)  # (method, route, status)
        self.http_latency: dict[str, Histogram] = {}  # by route
        self.generations: dict[str, int] = defaultdict(int)  # by finish reason
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.cached_tokens = 0
        self.superseded = 0  # HTTP requests cancelled by a newer request with the same X-Client-Id
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.generation_time = Histogram(LATENCY_BUCKETS)
        self.time_per_token = Histogram(TOKEN_TIME_BUCKETS)
        self.tabby_events: dict[str, int] = defaultdict(int)

    def http(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests[(method, route, status)] += 1
        self.http_latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def render(self, *, queue_depth: int, running: int, in_flight: int, prefix_cache_tokens: int = 0,
               prefix_cache_bytes: int = 0, draft_tokens: int = 0, accepted_tokens: int = 0) -> str:
        p = "starcoder2_"
        out: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            out.extend([f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} {kind}"])

        family("http_requests_total", "counter", "HTTP requests by method, route and status.")
        for (method, route, status), n in sorted(self.http_requests.items()):
            out.append(f'{p}http_requests_total{{method="{method}",route="{_label(route)}",status="{status}"}} {n}')
        family("http_request_duration_seconds", "histogram", "HTTP request latency (streams: until the last byte).")
        for route, h in sorted(self.http_latency.items()):
            out += h.lines(f"{p}http_request_duration_seconds", f'route="{_label(route)}"')
        family("generations_total", "counter", "Engine requests by finish reason.")
        for reason, n in sorted(self.generations.items()):
            out.append(f'{p}generations_total{{finish_reason="{reason}"}} {n}')
        for name, value, help_ in (
            ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished generations."),
            ("generated_tokens_total", self.generated_tokens, "Tokens generated."),
            ("prefix_cache_hit_tokens_total", self.cached_tokens, "Prompt tokens taken from the prefix cache."),
            ("superseded_requests_total", self.superseded,
             "Requests cancelled by a newer request with the same X-Client-Id."),
            ("speculative_draft_tokens_total", draft_tokens, "Draft tokens verified (speculative decoding)."),
            ("speculative_accepted_tokens_total", accepted_tokens, "Draft tokens the model agreed with."),
        ):
            family(name, "counter", help_)
            out.append(f"{p}{name} {value}")
        for name, h, help_ in (
            ("time_to_first_token_seconds", self.ttft, "From submission (queueing included) to the first token."),
            ("generation_duration_seconds", self.generation_time, "From submission to the last token."),
            ("time_per_output_token_seconds", self.time_per_token, "Decode time per token after the first."),
        ):
            family(name, "histogram", help_)
            out += h.lines(f"{p}{name}")
        rate = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        for name, value, help_ in (
            ("queue_depth", queue_depth, "Engine requests waiting for a free row."),
            ("running_requests", running, "Engine requests being decoded."),
            ("in_flight_requests", in_flight, "Engine requests submitted by the server and not finished."),
            ("prefix_cache_hit_rate", rate, "Cached prompt tokens / prompt tokens, since start."),
            ("prefix_cache_tokens", prefix_cache_tokens, "Tokens of KV held by the prefix cache."),
            ("prefix_cache_bytes", prefix_cache_bytes, "Bytes of KV held by the prefix cache."),
        ):
            family(name, "gauge", help_)
            out.append(f"{p}{name} {value}")
        family("tabby_events_total", "counter", "Tabby acceptance events by type.")
        for kind, n in sorted(self.tabby_events.items()):
            out.append(f'{p}tabby_events_total{{type="{_label(kind)}"}} {n}')
        return "\n".join(out) + "\n"
