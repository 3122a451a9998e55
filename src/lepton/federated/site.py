"""What a site does in a federation, without any Flower type: describe its data (counts, sizes, channel sums — never
an image, a path or an id), train the global weights for some local epochs with Lepton's own ``Trainer``
(FedProx's proximal term added to the task's loss when asked), and score weights on its val split.

``lepton.federated.apps`` wraps these in Flower's ``ClientApp``; the tests call them directly too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lepton.config import FIELDS, TrainConfig, make_config
from lepton.data.transforms.preprocessing import Preprocessing
from lepton.errors import DataError
from lepton.federated import CONFIG_FIELDS
from lepton.tasks import get_task
from lepton.train.data import Prepared, prepare_data
from lepton.train.loop import Trainer, model_spec, seed_epoch

#: Settings a server sends with every round (run config), and their defaults: those of the config fields they are
#: (``CONFIG_FIELDS``), one local epoch a round, the sites' native size, no proximal term.
DEFAULTS: dict[str, Any] = {**{key: FIELDS[name].default for key, name in CONFIG_FIELDS.items()},
                            "local-epochs": 1, "image-size": 0, "proximal-mu": 0.0}

_cache: dict[tuple[str, str], Prepared] = {}


@dataclass
class SiteSettings:
    """The recipe every site trains with (the same for all; the data are each site's own)."""

    model: str = DEFAULTS["model"]
    lr: float = DEFAULTS["lr"]
    batch_size: int = DEFAULTS["batch-size"]
    local_epochs: int = DEFAULTS["local-epochs"]
    augment: str = DEFAULTS["augment"]
    seed: int = DEFAULTS["seed"]
    proximal_mu: float = DEFAULTS["proximal-mu"]
    image_size: int = DEFAULTS["image-size"]

    @classmethod
    def from_config(cls, values: dict[str, Any]) -> SiteSettings:
        from lepton.federated import check_settings

        v = check_settings({**DEFAULTS, **{k: values[k] for k in DEFAULTS if k in values}})
        return cls(str(v["model"]), float(v["lr"]), int(v["batch-size"]), int(v["local-epochs"]), str(v["augment"]),
                   int(v["seed"]), float(v["proximal-mu"]), int(v["image-size"]))

    def train_config(self, data: str) -> TrainConfig:
        return make_config("default", data=data, model=self.model, lr=self.lr, batch_size=self.batch_size,
                           epochs=self.local_epochs, augment=self.augment, seed=self.seed, ema_decay=0.0,
                           schedule="none", warmup_epochs=0.0, precision="fp32",
                           image_size=self.image_size or None)


def _prepared(data: str, settings: SiteSettings, spec: Preprocessing | None) -> Prepared:
    """The site's data through the federation's preprocessing (cached per process: a site loads them once)."""
    key = (data, repr(spec.to_dict()) if spec is not None else "local")
    if key not in _cache:
        _cache[key] = prepare_data(settings.train_config(data), spec, get_task("classification"))
    return _cache[key]


def describe(data: str, settings: SiteSettings) -> dict[str, Any]:
    """The site's data in numbers: label names, input size and channels, images per split and class, and the
    per-channel sums the server turns into one normalisation for all sites."""
    prepared = _prepared(data, settings, None)
    x = prepared.x_train
    axes = (0, *range(2, x.ndim))
    count = x.numel() / x.shape[1]
    return {"label_names": list(prepared.label_names), "size": list(prepared.spec.size),
            "channels": prepared.spec.channels, "train": len(prepared.y_train),
            "val": len(prepared.y_val),
            "train_per_class": np.bincount(prepared.y_train.numpy(), minlength=len(prepared.label_names)).tolist(),
            "sum": x.double().sum(dim=axes).tolist(), "sumsq": (x.double() ** 2).sum(dim=axes).tolist(),
            "count": float(count), "window": prepared.spec.window, "slices": prepared.spec.slices}


def agree(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One preprocessing for the federation from the sites' summaries; DataError naming the site that differs in
    label set, input size or channels."""
    if not summaries:
        raise DataError("no site answered; start the SuperNodes first")
    first_site, first = next(iter(summaries.items()))
    for site, s in summaries.items():
        for key, what in (("label_names", "label set"), ("size", "image size"), ("channels", "channels")):
            if s[key] != first[key]:
                raise DataError(f"site {site} has {what} {s[key]} but site {first_site} has {first[key]}: every "
                                "site needs the same classes and input size (set --image-size for sizes)")
    n = sum(s["count"] for s in summaries.values())
    mean = np.sum([s["sum"] for s in summaries.values()], axis=0) / n
    var = np.sum([s["sumsq"] for s in summaries.values()], axis=0) / n - mean ** 2
    std = np.sqrt(np.clip(var, 1e-6, None))
    spec = Preprocessing(tuple(first["size"]), int(first["channels"]), mean.tolist(),
                         np.maximum(std, 1e-3).tolist(), first["window"], first["slices"])
    return {"spec": spec.to_dict(), "label_names": first["label_names"],
            "train": {site: s["train"] for site, s in summaries.items()}}


def _model(settings: SiteSettings, prepared: Prepared, weights: dict[str, torch.Tensor] | None,
           strict: bool = True) -> Trainer:
    """The site's network with the global ``weights``; with ``strict=False`` only its integer buffers (BatchNorm's
    batch counter, which secure aggregation leaves out) may be missing from them."""
    config = settings.train_config("site")
    trainer = Trainer(config, get_task("classification"), prepared, "cpu")
    if weights is not None:
        result = trainer.module.load_state_dict(weights, strict=strict)
        own = trainer.module.state_dict()
        missing = [k for k in result.missing_keys if own[k].is_floating_point()]
        if missing or result.unexpected_keys:
            raise DataError(f"the global weights do not fit this site's {settings.model}: missing "
                            f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    return trainer


def model_spec_for(settings: SiteSettings, spec: Preprocessing, label_names: list[str]) -> dict[str, Any]:
    """The network's ``create_model`` arguments for the federation's data (the same on server and sites)."""
    empty = torch.empty(0)
    prepared = Prepared(spec, empty, empty, empty, empty, label_names, {})
    return model_spec(settings.train_config("federated"), get_task("classification"), prepared)


def train(data: str, settings: SiteSettings, spec: Preprocessing, weights: dict[str, torch.Tensor],
          server_round: int, strict: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``local_epochs`` of training from the global ``weights``; returns the new weights and the round's figures."""
    prepared = _prepared(data, settings, spec)
    trainer = _model(settings, prepared, weights, strict)
    if settings.proximal_mu > 0:  # FedProx: mu/2 * ||w - w_global||^2 keeps the local model near the global one
        anchor = [p.detach().clone() for p in trainer.module.parameters()]
        base, mu = trainer.loss_fn, settings.proximal_mu

        def proximal(logits, y):
            drift = sum(((p - a) ** 2).sum() for p, a in zip(trainer.module.parameters(), anchor, strict=True))
            return base(logits, y) + 0.5 * mu * drift

        trainer.loss_fn = proximal
    t0, losses = time.perf_counter(), []
    for k in range(settings.local_epochs):
        seed_epoch(settings.seed, server_round * 1000 + k)
        losses.append(trainer.train_epoch(server_round * 1000 + k)["train_loss"])
    state = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
             for k, v in trainer.module.state_dict().items()}
    return state, {"num-examples": len(prepared.y_train), "train_loss": float(np.mean(losses)),
                   "train_seconds": time.perf_counter() - t0}


def evaluate(data: str, settings: SiteSettings, spec: Preprocessing,
             weights: dict[str, torch.Tensor], strict: bool = True) -> dict[str, float]:
    """The task's val figures of ``weights`` on this site's val split (AUC is NaN when it holds one class)."""
    prepared = _prepared(data, settings, spec)
    trainer = _model(settings, prepared, weights, strict)
    metrics = trainer.validate()
    return {"num-examples": len(prepared.y_val), **{k: float(v) for k, v in metrics.items()}}
