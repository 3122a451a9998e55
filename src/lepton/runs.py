"""Run directories: loading a trained run and predicting with its saved preprocessing.

A run directory ``runs/<name>/`` holds ``config.yaml`` (the resolved config), ``last.pt`` (the
resumable checkpoint, rewritten atomically each epoch), ``best.pt`` (the selected weights and the
network spec), ``history.csv``, ``curves.png``, ``labels.json``, ``preprocessing.json``,
``data.json`` (the data fingerprint) and ``run.json`` (status, best epoch, decision threshold).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lepton.config import TrainConfig
from lepton.data.transforms import Preprocessing
from lepton.errors import RunError
from lepton.models.layout import fast_layout, model_layout
from lepton.tasks import Task, get_task

RUN_FILES = ("config.yaml", "best.pt", "labels.json", "preprocessing.json", "run.json")


def predict_outputs(model, x, activate: Callable, *, batch_size: int = 256, tta: bool = False,
                    device: str = "cpu") -> np.ndarray:
    """The task's outputs (``activate`` of the logits: probabilities, values) of ``model`` for a normalised
    tensor batch, in chunks of ``batch_size``; with ``tta`` averaged with the horizontally flipped input."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            xb = fast_layout(x[start:start + batch_size].to(device))
            probs = activate(model(xb))
            if tta:
                probs = (probs + activate(model(torch.flip(xb, dims=[-1])))) / 2
            out.append(probs.cpu())
    if not out:
        return np.zeros((0, 0), np.float32)
    return torch.cat(out).numpy()


@dataclass
class Run:
    """A trained run loaded from disk, ready to predict."""

    path: Path
    config: TrainConfig
    preprocessing: Preprocessing
    label_names: list[str]
    info: dict[str, Any]
    model: Any = field(repr=False, default=None)
    device: str = "cpu"
    task: Task = field(default=None)  # type: ignore[assignment]  # filled from the config when not given

    def __post_init__(self) -> None:
        if self.task is None:
            self.task = get_task(self.config.task)

    @property
    def threshold(self) -> float | None:
        """The val-selected decision threshold on P(positive class) for binary tasks."""
        return self.info.get("threshold")

    def predict_proba(self, images: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """The task's outputs (N, K) for decoded images (C, H, W) in [0, 1]: class probabilities for classification."""
        return predict_outputs(self.model, self.preprocessing(images), self.task.activate, tta=self.config.tta,
                               device=self.device)

    def decide(self, outputs: np.ndarray) -> np.ndarray:
        """The task's decision per row (for classification: the stored threshold for two classes, else arg-max)."""
        return self.task.decide(outputs, self.info)

    def predict(self, paths: list[str | Path]) -> list[dict[str, Any]]:
        """Predict image files (any readable format); one dict per frame: ``path`` and the task's answer."""
        from lepton.data.io import read_image

        frames, names = [], []
        for p in paths:
            for frame in read_image(p, window=self.preprocessing.window, slices=self.preprocessing.slices,
                                    steps=self.preprocessing.steps):
                frames.append(frame.pixels)
                names.append(str(p) if frame.name == Path(p).name else f"{p}{frame.name[len(Path(p).name):]}")
        if not frames:
            return []
        outputs = self.predict_proba(frames)
        return [{"path": name, **self.task.encode(row, self.label_names, self.info)}
                for name, row in zip(names, outputs, strict=True)]


def load_run(path: str | Path, *, device: str = "cpu") -> Run:
    """Load a finished run directory (weights from ``best.pt``) for prediction or evaluation."""
    import torch

    from lepton.models import create_model

    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: run directory not found")
    missing = [f for f in RUN_FILES if not (path / f).is_file()]
    if missing:
        hint = " (training has not finished: resume it with `lepton train --resume`)" \
            if (path / "last.pt").is_file() else ""
        raise RunError(f"{path}: not a complete run, missing {', '.join(missing)}{hint}")
    try:
        config = TrainConfig.from_yaml(path / "config.yaml")
        spec = Preprocessing.from_dict(json.loads((path / "preprocessing.json").read_text()))
        labels = json.loads((path / "labels.json").read_text())
        info = json.loads((path / "run.json").read_text())
        ckpt = torch.load(path / "best.pt", map_location="cpu", weights_only=True)
        model = create_model(**ckpt["spec"])
        model.load_state_dict(ckpt["model"])
    except RunError:
        raise
    except Exception as exc:
        raise RunError(f"{path}: cannot load run ({type(exc).__name__}: {exc})") from exc
    model = model_layout(model.to(device)).eval()
    return Run(path, config, spec, labels, info, model, device, get_task(config.task))
