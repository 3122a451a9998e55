"""Training data: a source loaded, split, fingerprinted and preprocessed into tensors once per run."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lepton.config import TrainConfig
from lepton.data import ImageSet
from lepton.data.index.cases import CaseStore
from lepton.data.index.imagecache import CachedImages, ImageStore, channel_stats, chunk_size
from lepton.data.index.splits import assign_splits
from lepton.data.transforms.pipeline import check_steps
from lepton.data.transforms.preprocessing import Preprocessing
from lepton.errors import ConfigError, DataError
from lepton.tasks import Task, get_task
from lepton.utils import sha256_bytes


@dataclass
class Prepared:
    """Tensors and metadata of a loaded, split, preprocessed dataset: images in [0, 1] and the task's targets."""

    spec: Preprocessing
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    label_names: list[str]
    fingerprint: dict[str, Any]
    #: Per-sample inputs beside the images (``Task.side_inputs``: covariates), or None.
    e_train: torch.Tensor | None = None
    e_val: torch.Tensor | None = None
    #: Semi-supervised training: the unlabelled pool (``lepton.data.readers.unlabelled.UnlabelledSet``), checked to
    #: share no image and no patient with val/test; decoded batch by batch as the steps draw it.
    unlabelled: Any = None


log = logging.getLogger("lepton.train")
#: Bytes per voxel the in-memory path holds for a padded case: the float32 image twice (read, padded), int64 targets
#: and the uint8 mask, plus a normalised copy for BatchNorm recalibration (measured ~18 B/voxel, issue #27).
IN_MEMORY_BYTES_PER_VOXEL = 21


def data_fingerprint(data: ImageSet, splits: np.ndarray) -> dict[str, Any]:
    """A content hash of every image, label and split assignment, plus counts (no paths, no ids)."""
    rows = sorted(f"{h}:{int(y)}:{s}" for h, y, s in
                  zip(data.content_hashes(), data.labels, splits, strict=True))
    per_case = not isinstance(data, (ImageSet, ImageStore))  # segmentation: every case holds several classes
    counts = {
        split: {"cases": int((splits == split).sum())} if per_case else
        {name: int(((splits == split) & (data.labels == k)).sum()) for k, name in enumerate(data.label_names)}
        for split in ("train", "val", "test") if (splits == split).any()
    }
    return {"source": data.source, "sha256": sha256_bytes("\n".join(rows).encode()),
            "images": len(data), "counts": counts, "patient_grouped": data.has_patient_ids}


def intensity_stats(x) -> dict[str, float]:
    """Mean intensity of preprocessed training images and the spread of per-image means (drift reference)."""
    if isinstance(x, CaseStore):
        means = torch.from_numpy(x.padded_means(x.pad_to))
    elif isinstance(x, CachedImages):
        means = torch.from_numpy(x.image_means())
    else:
        means = x.mean(dim=tuple(range(1, x.ndim)))
    return {"mean": float(means.mean()), "std_of_image_means": float(means.std().clamp_min(1e-6))}


def choose_engine(config: TrainConfig, task: Task, quiet: bool = False):
    """The task's data through the case cache (``Task.load_cases``), then held in memory or read from the cache as
    the config's ``data_engine`` says — ``auto``: memory while the data (the padded tensors, or the decoded and
    resized images) fit in ``memory_limit_gb``; a task that can tell beforehand (``Task.memory_estimate``) is not
    cached at all when they do. Returns ``(data, engine, reason)``; tasks without a cached path load into memory."""
    steps = check_steps(config.preprocess)
    store = None
    if config.data_engine == "auto":
        estimate = task.memory_estimate(config.data, window=config.window, slices=config.slices, steps=steps,
                                        image_size=config.image_size)
        if estimate is not None and estimate <= config.memory_limit_gb:
            data = task.load(config.data, window=config.window, slices=config.slices, steps=steps,
                             skip_bad=config.skip_bad)
            return data, "memory", (f"the images take about {estimate:.2f} GB in memory (limit "
                                    f"{config.memory_limit_gb:g} GB)")
    if config.data_engine != "memory":
        store = task.load_cases(config.data, window=config.window, steps=steps, skip_bad=config.skip_bad,
                                cache_dir=config.cache_dir, workers=config.workers, quiet=quiet,
                                slices=config.slices, image_size=config.image_size)
    if store is None:
        if config.data_engine == "cache":
            raise ConfigError(f"the {task.name} task reads {config.data} into memory; data_engine=cache is for "
                              "sources the task reads through the case cache (segmentation cases; image folders "
                              "and CSV manifests without covariates for classification)")
        data = task.load(config.data, window=config.window, slices=config.slices, steps=steps,
                         skip_bad=config.skip_bad)
        return data, "memory", ("data_engine=memory" if config.data_engine == "memory"
                                else f"the {task.name} task reads its data into memory")
    if isinstance(store, ImageStore):
        need, what = store.in_memory_gb(config.image_size), "the images"
    else:
        largest = np.max([s for s in store.shapes], axis=0)
        padded = [-(-int(n) // 16) * 16 for n in largest[1:]]
        need = len(store) * int(largest[0]) * int(np.prod(padded)) * IN_MEMORY_BYTES_PER_VOXEL / 2 ** 30
        what = "padded tensors"
    if config.data_engine == "cache" or need > config.memory_limit_gb:
        return store, "cache", (f"{what} would take about {need:.2f} GB (limit {config.memory_limit_gb:g} "
                                "GB)" if config.data_engine == "auto" else "data_engine=cache")
    return store.to_memory(), "memory", f"{what} take about {need:.2f} GB (limit {config.memory_limit_gb:g} GB)"


def prepare_data(config: TrainConfig, spec: Preprocessing | None = None, task: Task | None = None,
                 quiet: bool = False) -> Prepared:
    """Load, split and preprocess the data a config names (``spec`` fixed when resuming); data, input size and
    targets from ``task`` (the config's task when not given). Cases that would not fit in memory stay in the case
    cache (``choose_engine``): then ``x_train``/``y_train`` (and val) are one ``CaseStore`` each."""
    task = task or get_task(config.task, config.task_options)
    steps = spec.steps if spec is not None else check_steps(config.preprocess)
    if spec is not None and steps != check_steps(config.preprocess):
        config = TrainConfig.from_dict({**config.to_dict(), "task": config.task, "preprocess": steps})
    data, engine, reason = choose_engine(config, task, quiet)
    log.info("data engine: %s (%s)", engine, reason)
    splits = assign_splits(data, val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                           seed=config.seed)
    train, val = data.subset(splits == "train"), data.subset(splits == "val")
    if len(val) == 0:
        raise DataError(f"{config.data}: the val split is empty; set val_fraction > 0 or add val data")
    fresh = spec is None
    if spec is None:
        dims = train.spatial_dims
        size = task.input_size(train, config) or \
            ((config.image_size,) * dims if config.image_size else _native_size(train))
        channels = config.channels or (3 if all(s[0] == 3 for s in _shapes(train)) else 1)
        spec = Preprocessing(size, channels, [0.5] * channels, [0.5] * channels, config.window, config.slices,
                             steps, task.input_fit)
    if fresh:
        task.fit_inputs(train, spec)
    x, y = task.tensors(train, spec)
    if fresh and config.normalize == "dataset":
        if isinstance(x, CaseStore):
            mean, std = x.padded_stats(x.pad_to)
        else:  # in float64, in chunks as read from the cache: both paths normalise alike to the last bit
            mean, std = channel_stats(x.chunks() if isinstance(x, CachedImages)
                                      else torch.split(x, chunk_size(int(np.prod(x.shape[1:])))))
        spec.mean, spec.std = mean, [max(v, 1e-3) for v in std]
    fingerprint = data_fingerprint(data, splits) | {"intensity": intensity_stats(x), "engine": engine}
    pool = None
    if config.unlabelled:
        pool, fingerprint["unlabelled"] = unlabelled_pool(config, task, data, splits, steps, quiet)
    x_val, y_val = task.tensors(val, spec)
    return Prepared(spec=spec, x_train=x, y_train=y, x_val=x_val, y_val=y_val, label_names=data.label_names,
                    fingerprint=fingerprint, e_train=task.side_inputs(train, spec), e_val=task.side_inputs(val, spec),
                    unlabelled=pool)


def unlabelled_pool(config: TrainConfig, task: Task, data, splits: np.ndarray, steps: list[dict],
                    quiet: bool = False):
    """The config's unlabelled source, listed, read once for its pixel hashes and refused when it shares an image or
    a patient with the labelled source's val or test split (``check_pool``); returns it with its fingerprint."""
    from lepton.data.readers.unlabelled import check_pool

    if not task.semi_supervised:
        raise ConfigError(f"semi-supervised training (unlabelled, semi) is built for classification and "
                          f"segmentation; the {task.name} task trains on labelled cases only")
    pool = task.load_unlabelled(config.unlabelled, window=config.window, slices=config.slices, steps=steps)
    hashes = pool.scan(progress=not quiet)
    check_pool(pool, hashes, data, splits)
    digest = sha256_bytes("\n".join(sorted(hashes)).encode())
    return pool, {"source": pool.source, "images": len(pool), "sha256": digest}


def _shapes(data) -> list[tuple[int, ...]]:
    return [np.shape(im) for im in data.images] if isinstance(data, ImageSet) else data.shapes


def _native_size(data: ImageSet) -> tuple[int, ...]:
    """Images: a square of the median longest side (at most 224); volumes: the median size per axis (at most 128)."""
    shapes = [s[1:] for s in _shapes(data)] if not isinstance(getattr(data, "images", None), np.ndarray) \
        else [data.images.shape[2:]]
    if data.spatial_dims == 2:
        side = int(min(224, np.median([max(s) for s in shapes])))
        return side, side
    return tuple(int(min(128, np.median([s[i] for s in shapes]))) for i in range(3))


def val_targets(y) -> np.ndarray | Iterator[np.ndarray]:
    """The val targets as the task's metrics read them: an array, or each cached case's mask in turn."""
    if isinstance(y, CaseStore):
        return (y.mask(i) for i in range(len(y)))
    return y.numpy()


def case_outputs(model, store: CaseStore, spec: Preprocessing, activate, *, tta: bool, device: str,
                 indices: Iterable[int] | None = None) -> Iterator[np.ndarray]:
    """A dense task's outputs for cached cases, one case at a time, by sliding windows over each whole case."""
    from lepton.runs import network_input, segment_probs

    def probs(i: int) -> np.ndarray:  # the memory map and the network input are let go when it returns
        stored, scale = store.image_source(i)
        x = network_input(spec, stored, scale=scale)
        del stored
        return segment_probs(model, spec, x, activate, tta=tta, device=device)

    for i in range(len(store)) if indices is None else indices:
        yield probs(i)


def val_outputs(model, prepared: Prepared, activate, *, tta: bool, device: str, batch_size: int):
    """The task's outputs on the val split: an array (N, K, …) predicted in chunks of ``batch_size`` (the training
    batch, which fits with gradients: memory does not grow with val), or a generator over cached cases."""
    from lepton.runs import predict_outputs

    if isinstance(prepared.x_val, CaseStore):
        return case_outputs(model, prepared.x_val, prepared.spec, activate, tta=tta, device=device)
    return predict_outputs(model, normalized(prepared.x_val, prepared.spec), activate, tta=tta, device=device,
                           extras=prepared.e_val, batch_size=batch_size)


def normalized(x, spec: Preprocessing):
    """Inputs as the network takes them: a tensor normalised now, cached images normalised batch by batch as they
    are read (``CachedImages``), cached cases as they are (windows are normalised as they are cut)."""
    if isinstance(x, CachedImages):
        return x.normalized(spec)
    return x if isinstance(x, CaseStore) else spec.normalize(x)


def bn_sample(prepared: Prepared, seed: int, batch: int, limit: int = 2048) -> Iterator[torch.Tensor]:
    """A fixed, un-augmented slice of the training inputs in [0, 1] for BatchNorm recalibration, in batches: up to
    ``limit`` images (in batches of 256), or one patch from each of up to 32 cached cases (in training batches of
    ``batch``). Read anew at each call (the same slice, by ``seed``), so nothing of it is held between evaluations:
    32 patches of 128³ are 268 MB, which used to stay in memory for the whole run."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(prepared.y_train), generator=gen)
    if isinstance(prepared.x_train, CaseStore):
        chosen = order[:32].numpy()
        size = tuple(prepared.spec.size)
        for start in range(0, len(chosen), batch):
            yield prepared.x_train[chosen[start:start + batch]].patches(size, gen)[0]
        return
    if isinstance(prepared.x_train, CachedImages):  # read from the cache: a bounded sample whatever the set's size
        limit = min(limit, 256)
    chosen = order[:limit]
    for start in range(0, len(chosen), 256):
        yield prepared.x_train[chosen[start:start + 256]]


class PatchSteps(torch.utils.data.Dataset):
    """The training steps of an epoch over cached cases, for a ``DataLoader``: an item is ``(case indices, seed)``
    and yields that step's patches, drawn from a generator of its own seed — so the patches are the same whichever
    worker reads them, and whether workers read at all."""

    def __init__(self, store: CaseStore, size: tuple[int, ...]):
        self.store, self.size = store, size

    def __getitem__(self, item: tuple[list[int], int]) -> tuple[torch.Tensor, torch.Tensor]:
        indices, seed = item
        return self.store[np.asarray(indices)].patches(self.size, torch.Generator().manual_seed(seed))


class StepPlan(torch.utils.data.Sampler):
    """The items of the coming epoch, set before each pass (persistent workers keep their processes)."""

    def __init__(self) -> None:
        self.items: list[tuple[list[int], int]] = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class ImageSteps(torch.utils.data.Dataset):
    """The training steps of an epoch over cached images, for a ``DataLoader``: an item is ``(indices, seed)`` and
    yields those images (read from the cache) with their targets; augmentation follows in the training process, as
    it does for images in memory, so both paths draw the same random numbers."""

    def __init__(self, images: CachedImages, targets: torch.Tensor):
        self.images, self.targets = images, targets

    def __getitem__(self, item: tuple[list[int], int]) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.as_tensor(item[0], dtype=torch.long)
        return self.images[indices], self.targets[indices]


def patch_loader(store: CaseStore | CachedImages, size: tuple[int, ...], workers: int, device: str,
                 targets: torch.Tensor | None = None):
    """A ``DataLoader`` that reads the planned steps' patches (cached cases) or images (cached images, with their
    ``targets``) ahead of the training step: ``workers`` processes (persistent, two steps prefetched each; pinned
    memory on CUDA), or the training process itself with 0."""
    plan = StepPlan()
    extra = {"persistent_workers": True, "prefetch_factor": 2} if workers else {}
    steps = ImageSteps(store, targets) if isinstance(store, CachedImages) else PatchSteps(store, size)
    # a generator of its own: starting an epoch's iterator then draws no number from the global stream, which the
    # in-memory path leaves to dropout (the items carry their own seeds, so the workers' seeds do not matter)
    loader = torch.utils.data.DataLoader(steps, batch_size=None, sampler=plan, num_workers=workers,
                                         pin_memory=device.startswith("cuda"), generator=torch.Generator(), **extra)
    return loader, plan
