"""Attention-based multiple-instance learning over a slide's tile embeddings (Ilse, Tomczak & Welling, ICML 2018,
gated attention), trained on slide labels, with patient-grouped splits, slide-level evaluation and a model folder.

A slide is a bag of tile embeddings (N, D): standardised with the training tiles' mean and deviation, projected, and
pooled by a learned attention over its tiles; the pooled vector is classified. The attention weights say which tiles
made the decision (the heatmap); the classifier applied to each tile alone gives a per-tile score as well.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import DataError, RunError

MODEL_FILE, CONFIG_FILE = "mil.pt", "slide_model.json"


def abmil(dim: int, classes: int = 2, hidden: int = 128, attention: int = 64, dropout: float = 0.25):
    """The gated-attention MIL network: (N, D) tiles → (logits (classes,), attention (N,), tile logits (N, classes))."""
    import torch
    from torch import nn

    class GatedABMIL(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.project = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
            self.v = nn.Linear(hidden, attention)
            self.u = nn.Linear(hidden, attention)
            self.w = nn.Linear(attention, 1)
            self.classify = nn.Linear(hidden, classes)

        def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            h = self.project(bag)
            scores = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1)
            weights = torch.softmax(scores, dim=0)
            return self.classify(weights @ h), weights, self.classify(h)

    return GatedABMIL()


@dataclass
class SlideModel:
    """A trained slide classifier: the MIL network, the feature standardisation, the labels, the decision threshold
    on P(positive) chosen on validation, and what it needs to reproduce its inputs (backbone identity, tile spec)."""

    net: Any = field(repr=False)
    mean: np.ndarray = field(repr=False)
    std: np.ndarray = field(repr=False)
    labels: list[str]
    threshold: float
    backbone: dict[str, Any]
    spec: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)

    def predict(self, features: np.ndarray) -> dict[str, Any]:
        """P(classes), attention per tile (summing to 1) and the per-tile positive score for one slide's tiles."""
        import torch

        if not len(features):
            raise DataError("the slide has no tissue tiles to classify: check the tissue mask, --min-tissue or --mpp")
        self.net.eval()
        with torch.no_grad():
            logits, weights, tile_logits = self.net(torch.from_numpy((features - self.mean) / self.std).float())
        probs = torch.softmax(logits, 0).numpy()
        return {"probs": probs, "attention": weights.numpy(),
                "tile_scores": torch.softmax(tile_logits, 1)[:, -1].numpy()}

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        from lepton.utils import atomic_torch_save, atomic_write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(folder / MODEL_FILE, {"net": self.net.state_dict(), "mean": self.mean, "std": self.std})
        atomic_write_json(folder / CONFIG_FILE, {
            "kind": "lepton-slide-model", "labels": self.labels, "threshold": self.threshold, "dim": len(self.mean),
            "backbone": self.backbone, "spec": self.spec, "history": self.history, **(extra or {})})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> SlideModel:

        folder = Path(folder)
        try:
            return cls.from_bytes((folder / CONFIG_FILE).read_bytes(), (folder / MODEL_FILE).read_bytes())
        except (OSError, RunError) as exc:
            raise RunError(f"{folder}: not a slide model folder ({CONFIG_FILE} and {MODEL_FILE} from `lepton slides "
                           f"train`): {exc}") from exc

    @classmethod
    def from_bytes(cls, config_json: bytes, weights: bytes) -> SlideModel:
        """A slide model from its two files' contents (as the registry stores them)."""
        import io

        import torch

        try:
            config = json.loads(config_json)
            state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=False)
        except (ValueError, RuntimeError, EOFError, OSError) as exc:
            raise RunError(f"not a slide model ({exc})") from exc
        if not isinstance(config, dict) or config.get("kind") != "lepton-slide-model":
            raise RunError(f"{CONFIG_FILE} does not describe a Lepton slide model (kind lepton-slide-model)")
        net = abmil(config["dim"], len(config["labels"]))
        net.load_state_dict(state["net"])
        return cls(net.eval(), state["mean"], state["std"], config["labels"], config["threshold"],
                   config["backbone"], config["spec"], config.get("history", []))


def grouped_split(labels: np.ndarray, groups: np.ndarray, *, test: float = 0.25, val: float = 0.2,
                  seed: int = 0) -> np.ndarray:
    """``train``/``val``/``test`` per slide, stratified by label, no patient in two splits."""
    from sklearn.model_selection import StratifiedGroupKFold

    out = np.full(len(labels), "train", dtype=object)

    def carve(pool: np.ndarray, fraction: float, offset: int) -> None:
        idx = np.flatnonzero(pool)
        if fraction <= 0 or len(np.unique(groups[idx])) < 2:
            return
        k = max(2, min(round(1 / fraction), len(np.unique(groups[idx]))))
        folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + offset)
        _, chosen = next(folds.split(idx, labels[idx], groups[idx]))
        out[idx[chosen]] = "val" if offset else "test"

    carve(np.ones(len(labels), bool), test, 0)
    carve(out == "train", val / (1 - test), 1)
    return out.astype(str)


def train_mil(bags: list[np.ndarray], y: np.ndarray, val_bags: list[np.ndarray], y_val: np.ndarray, *,
              labels: list[str], backbone: dict[str, Any], spec: dict[str, Any], epochs: int = 40, lr: float = 5e-4,
              seed: int = 0, max_tiles: int = 512) -> SlideModel:
    """Train the gated-attention MIL network one slide per step (Adam, weight decay, at most ``max_tiles`` random
    tiles per bag per step), keeping the epoch with the lowest validation loss; threshold by Youden's J on val."""
    import torch

    if len(np.unique(y)) < 2:
        raise DataError(f"the training slides hold one label only ({labels[int(y[0])]}): MIL needs both")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a bag is a few small matrix products: threads cost more than they give (20x on 2 cores)
    try:
        return _train(bags, y, val_bags, y_val, labels, backbone, spec, epochs, lr, seed, max_tiles)
    finally:
        torch.set_num_threads(threads)


def _train(bags: list[np.ndarray], y: np.ndarray, val_bags: list[np.ndarray], y_val: np.ndarray, labels: list[str],
           backbone: dict[str, Any], spec: dict[str, Any], epochs: int, lr: float, seed: int,
           max_tiles: int) -> SlideModel:
    import torch

    from lepton.tasks.metrics import youden_threshold

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tiles = np.concatenate([b for b in bags if len(b)])
    mean, std = tiles.mean(0), tiles.std(0) + 1e-6
    net = abmil(tiles.shape[1], len(labels))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    model = SlideModel(net, mean.astype(np.float32), std.astype(np.float32), labels, 0.5, backbone, spec)
    best, best_state, history = np.inf, None, []
    for epoch in range(epochs):
        net.train()
        total = 0.0
        for i in rng.permutation(len(bags)):
            bag = bags[i]
            if not len(bag):
                continue
            if len(bag) > max_tiles:
                bag = bag[rng.choice(len(bag), max_tiles, replace=False)]
            logits, _, _ = net(torch.from_numpy((bag - mean) / std).float())
            loss = loss_fn(logits[None], torch.tensor([int(y[i])]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
        probs = np.array([model.predict(b)["probs"] for b in val_bags])
        val_loss = float(np.mean([-np.log(max(p[int(t)], 1e-7)) for p, t in zip(probs, y_val, strict=True)]))
        history.append({"epoch": epoch + 1, "train_loss": total / len(bags), "val_loss": val_loss})
        if val_loss < best:
            best, best_state = val_loss, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    model.history = history
    val_probs = np.array([model.predict(b)["probs"] for b in val_bags])
    model.threshold = _threshold(y_val, val_probs[:, -1], youden_threshold)
    return model


def _threshold(y_val: np.ndarray, p: np.ndarray, youden) -> float:
    """Youden's J on validation, moved halfway down to the next lower validation score: the same J on validation
    (no score lies between), but not on the lowest positive's score itself, which a few validation slides make
    extreme."""
    t = youden(y_val, p)
    below = p[p < t]
    return float((t + below.max()) / 2) if below.size else float(t)


def slide_metrics(y: np.ndarray, probs: np.ndarray, labels: list[str], threshold: float, *,
                  n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Slide-level AUC with a percentile bootstrap CI over slides, accuracy at the threshold, sensitivity and
    specificity, and calibration (ECE with its bins) — the classification metrics of ``lepton.tasks.metrics``."""
    from lepton.tasks.metrics import bootstrap_ci, calibration, classification_metrics

    figures = classification_metrics(y, probs, labels, threshold)
    pred = figures.pop("_pred")
    ci = bootstrap_ci(y, probs, pred, n=n_bootstrap, seed=seed)
    positive = figures["per_class"][labels[-1]]
    return {"slides": len(y), "auc": figures["auc"], "auc_ci95": ci["auc"], "acc": figures["acc"],
            "acc_ci95": ci["acc"], "sensitivity": positive["sensitivity"], "specificity": positive["specificity"],
            "threshold": threshold, "calibration": calibration(y, probs, bins=5),
            "confusion_matrix": figures["confusion_matrix"]}
