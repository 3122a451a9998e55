"""Self-supervised pretraining on unlabelled images: a backbone of any registered network (2-D or 3-D) learns from
images alone, and ``lepton train --pretrained OUT/backbone.pt`` starts from it.

Two methods. ``contrastive`` (SimCLR): two augmented views of each image, the backbone's pooled features through a
projection head, NT-Xent (``nt_xent``: MONAI's ``ContrastiveLoss`` as a matrix product) pulling the two views
together and pushing the batch's other images away. ``masked`` (masked-image modelling): a random 60 % of patches
blanked, a light decoder reconstructs them from the backbone's features, mean squared error on the blanked pixels
only.

The source is read through ``lepton.data.readers.unlabelled`` and decoded batch by batch (folders and manifests stream).
Every epoch's order and every step's augmentation derive from (seed, epoch, step), and ``last.pt`` is written
atomically at each epoch's end and every ``checkpoint_s`` seconds within one, so a run killed at any point resumes
where its last checkpoint left it with the same draws.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lepton.data.readers.unlabelled import UnlabelledSet, load_unlabelled
from lepton.data.transforms.preprocessing import AUGMENT_PRESETS, Preprocessing, augment_batch
from lepton.errors import ConfigError, RunError
from lepton.models import create_model, model_info
from lepton.models.pretrained import BACKBONE_KEY
from lepton.utils import atomic_torch_save, atomic_write_json, atomic_write_text

log = logging.getLogger("lepton.pretrain")
METHODS = ("contrastive", "masked")
#: SimCLR's views: strong geometry and exposure changes, wider crops (scale) than supervised training uses.
VIEW_AUGMENT = {**AUGMENT_PRESETS["strong"], "scale": 0.3, "translate": 0.15}
PROJECTION = 128


@dataclass
class PretrainConfig:
    """What a pretraining run is; saved in ``pretrain.json`` and checked on resume."""

    source: str
    model: str = "lepton_cnn"
    method: str = "contrastive"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    image_size: int | None = None
    channels: int = 1
    slices: str = "middle"
    window: str | None = None
    temperature: float = 0.2
    mask_ratio: float = 0.6
    seed: int = 0

    def validate(self) -> PretrainConfig:
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not one of {', '.join(METHODS)}")
        if self.epochs < 1 or self.batch_size < 4 or self.lr <= 0:
            raise ConfigError("pretraining needs epochs >= 1, batch_size >= 4 (contrastive pairs need negatives) "
                              "and lr > 0")
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3 (got {self.channels})")
        if not 0.1 <= self.mask_ratio <= 0.9:
            raise ConfigError(f"mask_ratio must be in [0.1, 0.9] (got {self.mask_ratio})")
        model_info(self.model)
        return self


class _Pretext(nn.Module):
    """The backbone with what its pretext task adds: a projection head (contrastive) or a decoder (masked)."""

    def __init__(self, net: nn.Module, info, method: str, channels: int, dims: int, example: torch.Tensor):
        super().__init__()
        # an encoder-decoder answers a map on the input's grid: its own output is the feature map
        self.net, self.method, self.maps = net, method, info.output == "map"
        self._features: torch.Tensor | None = None
        if not self.maps:  # a classifier's last spatial feature map, caught where Grad-CAM looks
            net.get_submodule(info.cam_layer).register_forward_hook(self._catch)
        with torch.no_grad():
            width = self.features(example).shape[1]
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        if method == "contrastive":
            self.extra = nn.Sequential(nn.Linear(width, 256), nn.ReLU(inplace=True), nn.Linear(256, PROJECTION))
        elif self.maps:  # an encoder-decoder reconstructs through its own output layer
            self.extra = nn.Identity()
        else:
            self.extra = nn.Sequential(conv(width, 64, 3, padding=1), nn.ReLU(inplace=True), conv(64, channels, 1))

    def _catch(self, _module, _inputs, output) -> None:
        self._features = output

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out if self.maps else self._features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        if self.method == "contrastive":
            return self.extra(f.mean(dim=tuple(range(2, f.ndim))))
        out = self.extra(f)
        if out.shape[2:] != x.shape[2:]:
            out = nn.functional.interpolate(out, size=x.shape[2:], mode="bilinear" if x.ndim == 4 else "trilinear",
                                            align_corners=False)
        return out


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over two views' projections (N, F): each view's partner is its positive, the other 2N - 2
    its negatives. The same value as MONAI's ``ContrastiveLoss`` (tested), as one matrix product and a cross-entropy
    instead of MONAI's (2N, 2N, F) broadcast, whose backward pass dominated a CPU step."""
    z = nn.functional.normalize(torch.cat([a, b]).float(), dim=1)
    n = len(a)
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return nn.functional.cross_entropy(sim, partner)


def patch_mask(shape: tuple[int, ...], ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(N, 1, …) of 1 where a patch is blanked: a grid of 8 patches per axis (at least 2 px each), ``ratio`` of
    them drawn per image."""
    n, spatial = shape[0], shape[2:]
    grid = [max(1, min(8, s // 2)) for s in spatial]
    cells = torch.rand(n, 1, *grid, generator=generator) < ratio
    return nn.functional.interpolate(cells.float(), size=spatial, mode="nearest")


def _native_size(data: UnlabelledSet) -> tuple[int, ...]:
    first = data.read(0)[0]
    if first.ndim == 3:
        side = int(min(224, max(first.shape[1:])))
        return side, side
    return tuple(int(min(128, s)) for s in first.shape[1:])


def _round(size: tuple[int, ...], divisor: int) -> tuple[int, ...]:
    return tuple(max(divisor, -(-s // divisor) * divisor) for s in size)


def pretrain(source: str | Path, output: str | Path, *, quiet: bool = False, checkpoint_s: float = 30.0,
             device: str = "cpu", threads: int | None = None, **options: Any) -> Path:
    """Pretrain a backbone on an unlabelled ``source`` into folder ``output``; returns ``output/backbone.pt``.

    ``options`` are ``PretrainConfig`` fields (``model``, ``method``, ``epochs``…). When ``output`` holds an
    unfinished run (``last.pt``) of the same configuration it resumes there; another configuration is refused.
    ``threads`` sets PyTorch's CPU threads (one is fastest on a crowded machine).

    >>> pretrain("unlabelled/", "ssl", model="resnet18", method="contrastive", epochs=20)   # doctest: +SKIP
    """
    config = PretrainConfig(source=str(source), **options).validate()
    if threads:
        torch.set_num_threads(threads)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    state = _resume_state(out, config)
    data = load_unlabelled(source, window=config.window, slices=config.slices)
    if len(data) < 2 * 2:
        raise RunError(f"{source}: {len(data)} image(s); pretraining needs at least 4")
    info = model_info(config.model)
    dims = 3 if config.slices == "volume" or (data.arrays is not None and data.arrays.ndim == 5) else 2
    if dims not in info.spatial_dims:
        raise ConfigError(f"{config.model} has no {dims}-D version; see `lepton models available`")
    size = (state["size"] if state else
            _round((config.image_size,) * dims if config.image_size else _native_size(data),
                   info.divisor))
    spec = Preprocessing(tuple(size), config.channels, [0.5] * config.channels, [0.5] * config.channels,
                         config.window, config.slices)
    torch.manual_seed(config.seed)
    outputs = config.channels if config.method == "masked" and info.output == "map" else \
        32 if info.output == "map" else 1
    net = create_model(config.model, in_channels=config.channels, num_classes=outputs, image_size=size[-1],
                       spatial_dims=dims)
    model = _Pretext(net, info, config.method, config.channels, dims,
                     torch.zeros(2, config.channels, *size)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    steps = len(data) // config.batch_size or 1
    total = steps * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / max(1, steps)) * 0.5 * (1 + math.cos(math.pi * min(k, total) / total)))
    history: list[dict[str, Any]] = []
    epoch, step = 1, 0
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        epoch, step, history = state["epoch"], state["step"], state["history"]
        log.info("resuming %s at epoch %d, step %d", out, epoch, step)
    meta = {"model": config.model, "spatial_dims": dims, "in_channels": config.channels, "image_size": size[-1],
            "size": list(size), "method": config.method, "source": str(source), "images": len(data),
            "normalize": {"mean": spec.mean, "std": spec.std}}
    saved = time.monotonic()

    def checkpoint(at_epoch: int, at_step: int, loss_sum: float, seen: int) -> None:
        atomic_torch_save(out / "last.pt", {
            "config": asdict(config), "size": list(size), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "epoch": at_epoch,
            "step": at_step, "history": history, "partial": (loss_sum, seen)})

    progress = _progress(quiet)
    with progress:
        task = progress.add_task("pretraining", total=total, completed=(epoch - 1) * steps + step, loss=float("nan"))
        while epoch <= config.epochs:
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed * 7919 + epoch))
            loss_sum, seen = state["partial"] if state and step else (0.0, 0)
            state = None
            t0 = time.perf_counter()
            model.train()
            while step < steps:
                idx = order[step * config.batch_size:(step + 1) * config.batch_size]
                seed = (config.seed * 1_000_003 + epoch) * 100_003 + step
                gen = torch.Generator().manual_seed(seed)
                torch.manual_seed(seed)  # dropout: the same draws whether or not the run was resumed
                x = data.batch(idx.numpy(), spec)
                loss = _loss(model, config, spec, x, gen, device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                loss_sum, seen = loss_sum + loss.item() * len(idx), seen + len(idx)
                progress.update(task, advance=1, loss=loss.item())
                if time.monotonic() - saved > checkpoint_s and step < steps:
                    checkpoint(epoch, step, loss_sum, seen)
                    saved = time.monotonic()
            seconds = time.perf_counter() - t0
            history.append({"epoch": epoch, "loss": loss_sum / max(1, seen), "seconds": round(seconds, 3),
                            "images_per_s": round(seen / max(seconds, 1e-9), 1)})
            epoch, step = epoch + 1, 0
            checkpoint(epoch, 0, 0.0, 0)
            saved = time.monotonic()
            _write_history(out, history)
    head = info.head + "."
    backbone = {k: v.detach().cpu() for k, v in model.net.state_dict().items() if not k.startswith(head)}
    path = out / "backbone.pt"
    atomic_torch_save(path, {BACKBONE_KEY: meta, "model": backbone})
    atomic_write_json(out / "pretrain.json", {"config": asdict(config), "backbone": meta, "history": history,
                                              "status": "complete"})
    return path


def _loss(model: _Pretext, config: PretrainConfig, spec: Preprocessing, x: torch.Tensor, gen: torch.Generator,
          device: str) -> torch.Tensor:
    if config.method == "contrastive":
        a = spec.normalize(augment_batch(x, VIEW_AUGMENT, gen)).to(device)
        b = spec.normalize(augment_batch(x, VIEW_AUGMENT, gen)).to(device)
        return nt_xent(model(a), model(b), config.temperature)
    target = spec.normalize(augment_batch(x, AUGMENT_PRESETS["light"], gen)).to(device)
    mask = patch_mask(tuple(target.shape), config.mask_ratio, gen).to(device)
    recon = model(target * (1 - mask))
    return (((recon - target) ** 2) * mask).sum() / (mask.sum() * target.shape[1]).clamp_min(1.0)


def _resume_state(out: Path, config: PretrainConfig) -> dict[str, Any] | None:
    """``last.pt`` of an unfinished run of this configuration, None for a fresh start; another configuration in the
    same folder is refused (its checkpoint is not overwritten)."""
    last = out / "last.pt"
    if not last.is_file():
        return None
    try:
        state = torch.load(last, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise RunError(f"{last}: unreadable checkpoint ({exc}); delete it to start again") from exc
    if state.get("config") != asdict(config):
        differ = sorted(k for k, v in asdict(config).items() if state.get("config", {}).get(k) != v)
        raise RunError(f"{out}: holds a pretraining run with other settings ({', '.join(differ)}); resume it with "
                       "the same options, or choose another --output")
    if state["epoch"] > config.epochs:
        log.info("%s: already finished; writing its backbone again", out)
    return state


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(out / "history.csv", buf.getvalue())


def _progress(quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), disable=quiet, transient=True)


def backbone_info(path: str | Path) -> dict[str, Any]:
    """The description a backbone file carries (network, dimensions, channels, size, method, source)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or BACKBONE_KEY not in state:
        raise RunError(f"{path}: not a backbone written by lepton pretrain")
    return dict(state[BACKBONE_KEY])

