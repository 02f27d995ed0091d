"""Metrics exported through Ray Serve (`ray.serve.metrics`, scraped from Ray's Prometheus endpoint).

Serve adds the `deployment`, `replica` and `application` tags. Prometheus sees the names with
Ray's `ray_` prefix (e.g. `ray_bitllava_requests_total`).

Ingress (ChatIngress):
- bitllava_requests: requests by route and HTTP status;
- bitllava_request_latency_seconds: request latency (to the last byte of a stream) by route;
- bitllava_time_to_first_token_seconds: streamed requests, request start to the first token;
- bitllava_prompt_tokens / bitllava_completion_tokens: token counts of completed requests.

Model (BitLlavaModel):
- bitllava_queue_length: requests waiting for a batch slot on the replica;
- bitllava_running_requests: requests in the replica's running batch;
- bitllava_batch_size: rows per decode step;
- bitllava_generated_tokens: tokens generated;
- bitllava_tokens_per_second: generation throughput of the replica over the last second or so.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = Counter("bitllava_requests", description="HTTP requests by route and status",
                                tag_keys=("route", "status"))
        self.latency = Histogram("bitllava_request_latency_seconds", description="request latency",
                                 boundaries=LATENCY_BOUNDARIES, tag_keys=("route",))
        self.ttft = Histogram("bitllava_time_to_first_token_seconds",
                              description="streamed requests: request start to the first token",
                              boundaries=LATENCY_BOUNDARIES)
        self.prompt_tokens = Counter("bitllava_prompt_tokens", description="prompt tokens of completed requests")
        self.completion_tokens = Counter("bitllava_completion_tokens",
                                         description="completion tokens of completed requests")

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})


class ModelMetrics:
    def __init__(self) -> None:
        self.queue_length = Gauge("bitllava_queue_length", description="requests waiting for a batch slot")
        self.running = Gauge("bitllava_running_requests", description="requests in the running batch")
        self.batch_size = Histogram("bitllava_batch_size", description="rows per decode step",
                                    boundaries=BATCH_BOUNDARIES)
        self.tokens = Counter("bitllava_generated_tokens", description="tokens generated")
        self.tokens_per_second = Gauge("bitllava_tokens_per_second",
                                       description="generation throughput over the last second or so")
