"""Tile embeddings: every tissue tile of a slide through a frozen CNN of the model factory, cached per slide.

The backbone is a network from ``create_model`` without its head, frozen, in eval mode. Nothing is downloaded:
either a registered network at a fixed seed's random initialisation (``Backbone.random``: a deterministic, untrained
feature map — random convolutions keep stain and texture statistics, which is enough where the signal is cellular
density and colour, and it needs no data) or the network of a run Lepton trained (``Backbone.from_run``, e.g. a tile
classifier trained on PathMNIST tiles with ``lepton train``), with that run's preprocessing.

Embeddings are cached in the case cache under the slide's bytes, the tiling options and the backbone's identity
(the network and seed, or the hash of the run's weights), so training and prediction read a slide's tiles once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lepton.data.readers.slides import Slide
from lepton.data.readers.tiling import TileSpec, iter_tiles, plan_tiles
from lepton.errors import ModelError
from lepton.rundir import BEST, RunDir

EMBED_VERSION = 1
BATCH = 64


@dataclass
class Backbone:
    """A frozen feature extractor: ``module`` maps (N, 3, S, S) inputs in [0, 1] (after ``prepare``) to (N, D)."""

    identity: dict[str, Any]
    module: Any = field(repr=False)
    input_size: int
    dim: int
    prepare: Any = field(repr=False, default=None)

    @classmethod
    def random(cls, name: str = "lepton_cnn", *, seed: int = 0, input_size: int = 64) -> Backbone:
        """``name`` from the model factory at ``seed``'s random initialisation, its head removed."""
        import torch

        from lepton.models import create_model

        torch.manual_seed(seed)
        model = create_model(name, in_channels=3, num_classes=2, image_size=input_size)
        return cls._finish({"kind": "random", "model": name, "seed": seed, "input_size": input_size}, model, name,
                           input_size)

    @classmethod
    def from_run(cls, run_dir: str | Path) -> Backbone:
        """The network of a trained Lepton run (3-channel, 2-D classification), its head removed, with the run's
        preprocessing."""
        from lepton.runs import load_run

        run = load_run(run_dir)
        if run.preprocessing.channels != 3 or run.task.network_kind != ("image", "vector"):
            raise ModelError(f"{run_dir}: a tile backbone must be a 2-D classification run on RGB tiles (this run has "
                             f"{run.preprocessing.channels} channel(s), task {run.task.name})")
        digest = hashlib.sha256(RunDir(run_dir).file(BEST).read_bytes()).hexdigest()[:16]
        size = int(run.preprocessing.size[0])
        backbone = cls._finish({"kind": "run", "run": str(Path(run_dir).resolve()), "weights": digest,
                                "input_size": size}, run.model, run.config.model, size)
        backbone.prepare = run.preprocessing
        return backbone

    @classmethod
    def from_identity(cls, identity: dict[str, Any]) -> Backbone:
        """The backbone a slide model was trained with, rebuilt from its stored identity."""
        if identity.get("kind") == "run":
            backbone = cls.from_run(identity["run"])
            if backbone.identity["weights"] != identity["weights"]:
                raise ModelError(f"{identity['run']}: the run's weights changed since the slide model was trained on "
                                 "its features; retrain the slide model")
            return backbone
        return cls.random(identity["model"], seed=identity["seed"], input_size=identity["input_size"])

    @classmethod
    def _finish(cls, identity: dict[str, Any], model: Any, name: str, size: int) -> Backbone:
        import torch
        from torch import nn

        from lepton.models.factory import model_info

        owner, _, attr = model_info(name).head.rpartition(".")
        parent = model.get_submodule(owner) if owner else model
        if not hasattr(parent, attr):
            raise ModelError(f"{name}: no head {model_info(name).head!r} to remove")
        setattr(parent, attr, nn.Identity())
        model.eval().requires_grad_(False)
        with torch.no_grad():
            dim = int(model(torch.zeros(1, 3, size, size)).shape[1])
        return cls(identity, model, size, dim)

    def __call__(self, tiles: list[np.ndarray]) -> np.ndarray:
        """(N, D) float32 embeddings of RGB uint8 tiles (H, W, 3)."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255.0
        if self.prepare is not None:
            x = self.prepare(list(x.numpy()))
        elif x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="area")
        with torch.no_grad():
            return self.module(x).float().numpy()


@dataclass
class SlideFeatures:
    """A slide's tiles and their embeddings: ``coords`` (N, 2) level-0, ``features`` (N, D), the grid's geometry."""

    coords: np.ndarray
    features: np.ndarray
    size0: float
    stride0: float
    cached: bool = False


def embed_slide(slide: Slide, spec: TileSpec, backbone: Backbone, *, cache: Any = None, workers: int | None = None,
                progress: bool = False, on_progress: Callable[[int, int], None] | None = None) -> SlideFeatures:
    """Every tissue tile of ``slide`` through ``backbone``, streamed in batches; from the cache when done before.
    ``on_progress(done, total)`` is called after each batch of tiles (a server job's progress)."""
    from lepton.data.index.cache import CaseCache, default_cache_dir

    store = None if cache is False else (cache if isinstance(cache, CaseCache) else
                                         CaseCache(cache or default_cache_dir() / "slides"))
    key = None
    if store is not None:
        key = store.key([slide.path], {"kind": "embeddings", "v": EMBED_VERSION, "spec": asdict(spec),
                                       "mpp": slide.mpp, "backbone": backbone.identity})
        entry = store.get(key)
        if entry is not None:
            return SlideFeatures(np.array(entry.array("coords")), np.array(entry.array("features")),
                                 entry.meta["size0"], entry.meta["stride0"], cached=True)
    grid = plan_tiles(slide, spec, cache=store if store is not None else False)
    features = np.zeros((len(grid), backbone.dim), np.float32)
    batch, index = [], []
    for i, tile in iter_tiles(slide, grid, workers=workers, progress=progress and f"embedding {slide.path.name}"):
        batch.append(tile)
        index.append(i)
        if len(batch) == BATCH:
            features[index] = backbone(batch)
            batch, index = [], []
            if on_progress is not None:
                on_progress(i + 1, len(grid))
    if batch:
        features[index] = backbone(batch)
    if on_progress is not None:
        on_progress(len(grid), len(grid))
    out = SlideFeatures(grid.coords, features, grid.size0, grid.stride0)
    if store is not None:
        store.put(key, {"coords": grid.coords, "features": features},
                  {"source": str(slide.path), "kind": "embeddings", "tiles": len(grid), "size0": grid.size0,
                   "stride0": grid.stride0})
    return out
