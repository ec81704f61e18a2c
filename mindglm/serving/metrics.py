"""Prometheus metrics, named after vLLM's (`vllm:num_requests_running` -> `mindglm:...`).

Gauges are read from the engine thread's last snapshot when scraped, so a scrape never waits for
a running step. Each server has its own registry (no process-global state).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily

# `*_created` timestamps only double the output; Prometheus does not need them
disable_created_metrics()

# seconds; vLLM's buckets for the same histograms, cut to what a CPU or NPU server sees
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5)


class _EngineGauges:
    """Collector for what the engine thread last reported."""

    def __init__(self, loop, model_name: str):
        self.loop, self.model_name = loop, model_name

    def collect(self):
        stats = self.loop.stats
        for name, key, doc in (("num_requests_running", "running", "Requests in the running batch."),
                               ("num_requests_waiting", "waiting", "Requests waiting for a cache row."),
                               ("cache_rows_in_use", "rows_in_use", "KV cache rows held by requests."),
                               ("max_num_seqs", "max_num_seqs", "KV cache rows in the pool.")):
            family = GaugeMetricFamily(f"mindglm:{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], float(stats.get(key, 0)))
            yield family
        compiles = GaugeMetricFamily("mindglm:graph_compiles", "Graphs compiled so far (warm-up included).",
                                     labels=["model_name"])
        compiles.add_metric([self.model_name], float(self.loop.compiles))
        yield compiles


class ServerMetrics:
    """The server's counters and histograms plus the engine gauges."""

    def __init__(self, loop, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        self.prompt_tokens = Counter("mindglm:prompt_tokens", "Prompt tokens of admitted requests.", labels,
                                     registry=self.registry).labels(model_name)
        self.generation_tokens = Counter("mindglm:generation_tokens", "Generated tokens.", labels,
                                         registry=self.registry).labels(model_name)
        self._finished = Counter("mindglm:request_success", "Finished requests by finish reason.",
                                 labels + ["finished_reason"], registry=self.registry)
        self.ttft = Histogram("mindglm:time_to_first_token_seconds", "Arrival to first generated token.",
                              labels, buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.tpot = Histogram("mindglm:time_per_output_token_seconds", "Time between two generated tokens.",
                              labels, buckets=TPOT_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("mindglm:e2e_request_latency_seconds", "Arrival to finish.", labels,
                             buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.registry.register(_EngineGauges(loop, model_name))

    def finished(self, reason: str) -> None:
        self._finished.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
