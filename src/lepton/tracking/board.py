"""TensorBoard: event files in the run directory itself, so ``tensorboard --logdir runs/`` shows every run, live
(each epoch's figures are flushed as they come)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import ConfigError
from lepton.tracking.base import Tracker, metric_key, update_record

log = logging.getLogger("lepton.tracking")


class TensorBoardTracker(Tracker):
    """A ``SummaryWriter`` over the run directory; ``kind`` names the event file (train, evaluate, …)."""

    backend = "tensorboard"

    def __init__(self, run_dir: Path, kind: str = "train"):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--track tensorboard needs TensorBoard: pip install 'lepton-imaging[tracking]'") from None
        self.writer = SummaryWriter(log_dir=str(run_dir), flush_secs=10, filename_suffix=f".{kind}")
        if kind == "train":
            update_record(run_dir, "tensorboard", {"logdir": "."})

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        rows = ["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in params.items())]
        self.writer.add_text("config", "\n".join(rows))
        self.writer.add_text("tags", "\n".join(["| tag | value |", "|---|---|",
                                                *(f"| {k} | {v} |" for k, v in tags.items())]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(metric_key(key), float(value), step)
        self.writer.flush()  # live: an epoch is visible as soon as it ends

    def log_step(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(metric_key(key), float(value), step)

    def log_images(self, tag: str, image: np.ndarray, step: int = 0) -> None:
        self.writer.add_image(tag, np.clip(image, 0, 1), step, dataformats="HWC")

    def log_graph(self, model: Any, example: Any) -> None:
        try:
            self.writer.add_graph(model, example)
        except Exception as exc:  # a network that does not trace still trains
            log.info("TensorBoard: the model graph was not traced (%s: %s)", type(exc).__name__, exc)

    def log_text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text)

    def finish(self, status: str = "FINISHED") -> None:
        self.writer.add_text("status", status)
        self.writer.close()
