"""The console's monitor: the server's own Prometheus metrics sampled every ``SAMPLE_SECONDS`` for the last hour,
turned into what a person watches — request rate, error rate, p50/p99 latency, mean batch size, queue depth, input
drift, predictions per class. Parsed from the same text ``/metrics`` serves (so with several workers it is their
sum, as a scraper sees it)."""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

SAMPLE_SECONDS = 15.0
WINDOW_SECONDS = 3600.0


@dataclass
class Sample:
    """Cumulative counters (and the gauges) at one moment, summed over versions; per model where it matters."""

    t: float
    requests: dict[str, float] = field(default_factory=dict)  # model -> requests
    errors: dict[str, float] = field(default_factory=dict)  # model -> responses with status >= 400
    latency: dict[str, dict[float, float]] = field(default_factory=dict)  # model -> {upper bound: cumulative count}
    batch_sum: dict[str, float] = field(default_factory=dict)
    batch_count: dict[str, float] = field(default_factory=dict)
    queue: dict[str, float] = field(default_factory=dict)
    drift: dict[str, float] = field(default_factory=dict)
    predictions: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> label -> count


def parse(text: str, t: float) -> Sample:
    """A ``Sample`` from Prometheus text (Lepton's metric names)."""
    from prometheus_client.parser import text_string_to_metric_families

    s = Sample(t)

    def add(table: dict, model: str, value: float) -> None:
        table[model] = table.get(model, 0.0) + value

    for family in text_string_to_metric_families(text):
        for name, labels, value in ((x.name, x.labels, x.value) for x in family.samples):
            model = labels.get("model", "")
            if name == "lepton_requests_total":
                add(s.requests, model, value)
                if labels.get("status", "").isdigit() and int(labels["status"]) >= 400:
                    add(s.errors, model, value)
            elif name == "lepton_request_latency_seconds_bucket":
                bounds = s.latency.setdefault(model, {})
                le = float(labels["le"])
                bounds[le] = bounds.get(le, 0.0) + value
            elif name == "lepton_batch_size_sum":
                add(s.batch_sum, model, value)
            elif name == "lepton_batch_size_count":
                add(s.batch_count, model, value)
            elif name == "lepton_queue_depth":
                add(s.queue, model, value)
            elif name == "lepton_input_drift":
                s.drift[model] = max(s.drift.get(model, -math.inf), value)
            elif name == "lepton_predictions_total":
                per = s.predictions.setdefault(model, {})
                per[labels.get("label", "")] = per.get(labels.get("label", ""), 0.0) + value
    return s


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """Prometheus's ``histogram_quantile`` over the increase between two cumulative bucket sets (seconds)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 0.0)
        lower, below = bound, count
    return lower


def _total(table: dict[str, float], models: set[str]) -> float:
    return sum(v for m, v in table.items() if m in models)


def _merged(table: dict[str, dict[float, float]], models: set[str]) -> dict[float, float]:
    out: dict[float, float] = {}
    for m, bounds in table.items():
        if m in models:
            for b, v in bounds.items():
                out[b] = out.get(b, 0.0) + v
    return out


class Monitor:
    """The last hour of samples (one every ``SAMPLE_SECONDS``) and the figures between them."""

    def __init__(self, window: float = WINDOW_SECONDS, every: float = SAMPLE_SECONDS):
        self.every = every
        self.samples: deque[Sample] = deque(maxlen=int(window / every) + 1)

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def summary(self, now: Sample, models: set[str]) -> dict[str, Any]:
        """The series (stored samples, then ``now``) for ``models``: one point per interval, and the totals."""
        samples = [s for s in self.samples if s.t < now.t] + [now]
        points = []
        for a, b in itertools.pairwise(samples):
            dt = max(b.t - a.t, 1e-9)
            requests = _total(b.requests, models) - _total(a.requests, models)
            batches = _total(b.batch_count, models) - _total(a.batch_count, models)
            lat_a, lat_b = _merged(a.latency, models), _merged(b.latency, models)
            p50, p99 = quantile(0.5, lat_a, lat_b), quantile(0.99, lat_a, lat_b)
            points.append({
                "t": round(b.t, 3), "requests": requests, "rate": requests / dt,
                "errors": _total(b.errors, models) - _total(a.errors, models),
                "p50_ms": None if p50 is None else round(p50 * 1000, 2),
                "p99_ms": None if p99 is None else round(p99 * 1000, 2),
                "mean_batch": ((_total(b.batch_sum, models) - _total(a.batch_sum, models)) / batches
                               if batches > 0 else None),
                "queue": _total(b.queue, models),
                "drift": max((v for m, v in b.drift.items() if m in models), default=None)})
        first = samples[0]
        per_class: dict[str, float] = {}
        for model in models:
            for label, count in now.predictions.get(model, {}).items():
                before = first.predictions.get(model, {}).get(label, 0.0) if first is not now else 0.0
                per_class[label] = per_class.get(label, 0.0) + count - before
        return {"window_seconds": round(now.t - first.t, 1), "sample_seconds": self.every, "points": points,
                "requests_total": _total(now.requests, models), "errors_total": _total(now.errors, models),
                "queue": _total(now.queue, models),
                "drift": {m: v for m, v in now.drift.items() if m in models},
                "predictions": per_class}
