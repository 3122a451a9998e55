"""Prometheus metrics of one server: its own collector registry (so apps in one process never share
counters), or, under several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set), prometheus-client's
multiprocess mode, where every worker writes its values to files and a scrape of any worker sums them."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        # In multiprocess mode metrics live in files, not in a registry: rendering collects them all.
        r = self.registry = None if self.multiprocess else CollectorRegistry()
        self.requests = Counter("lepton_requests", "Prediction requests by model, version and HTTP status",
                                ["model", "version", "status"], registry=r)
        self.latency = Histogram("lepton_request_latency_seconds", "End-to-end request latency", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.model_latency = Histogram("lepton_batch_latency_seconds", "Model time per batch", ["model", "version"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("lepton_batch_size", "Images per model batch", ["model", "version"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.queue_depth = Gauge("lepton_queue_depth", "Requests queued or running", ["model", "version"],
                                 registry=r, multiprocess_mode="livesum")
        self.rejected = Counter("lepton_rejected", "Requests refused because the queue was full", ["model"], registry=r)
        self.predictions = Counter("lepton_predictions", "Predicted labels", ["model", "version", "label"], registry=r)
        self.drift = Gauge("lepton_input_drift", "Recent mean input intensity against training, in standard "
                           "deviations of training image means (the largest over workers)", ["model"], registry=r,
                           multiprocess_mode="livemax")
        self.shadow = Counter("lepton_shadow_predictions", "Shadow predictions by agreement with the served one",
                              ["model", "version", "outcome"], registry=r)

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, multiprocess_dir())
        return generate_latest(registry)
