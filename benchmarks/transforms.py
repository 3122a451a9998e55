"""Lepton's batched transforms against MONAI's on the same batches, on CPU (issue #32).

Four pieces, each timed the way Lepton runs it and the ways MONAI offers, on the same tensors in the same process:

1. **Affine augmentation** (flips, rotation, shear, scale, shift; the image bilinear, its mask nearest): the
   hand-written version before #32 (matrices in ``grid_sample`` coordinates, one ``affine_grid``, the reference);
   ``augment_batch`` now (batched matrices in voxel units, MONAI's ``to_norm_affine``, one grid for image and mask);
   the same with the matrices built by MONAI's ``create_*`` helpers one sample at a time; MONAI's batched
   ``AffineTransform`` layer (a grid per call: image and mask); MONAI's dictionary transforms ``RandFlipd`` +
   ``RandAffined`` in a ``Compose``, per sample (they take one channel-first sample).
2. **Centre pad / crop**: ``pad_or_crop`` (one ``F.pad``) against MONAI's ``ResizeWithPadOrCrop`` on the batch
   folded into its channel axis, on a batch and on one mask.
3. **Foreground-oversampled patches from cases in memory**: the segmentation task's ``batch`` (a third of the
   patches centred on a foreground voxel, the rest anywhere) against ``RandCropByPosNegLabeld`` (``pos=1, neg=2``)
   per case.
4. **The same from the case cache**: ``CaseStore.patches`` (reads only the patch's region of each memory-mapped case,
   foreground coordinates stored at caching) against reading each case and cropping with ``RandCropByPosNegLabeld``.

Shapes: 2-D 64 × 64² (cases of 96² for the patch samplers) and 3-D 2 × 96³ (cases of 128³). The variants of a row
run interleaved, one call each per round, ``--repeats`` rounds after a warm-up; each figure is a median time, and the
ratio in brackets the median over rounds of (its time / the row's first variant's time in that round). ``--quick``
uses 3-D 48³ and 3 rounds. The load average is printed beside the figures: other processes make them noisy, the
paired ratios less so. ``--threads 1`` avoids the stalls of a thread pool on a loaded machine. Peak RSS (MB) is the
process's, so it only grows from row to row.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from machine import cpu_summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

#: The geometric options of the ``strong`` preset (intensity changes are the same code either way).
GEOMETRY_2D = {"hflip": 0.5, "vflip": 0.5, "rotate": 25.0, "translate": 0.10, "scale": 0.20, "shear": 8.0}
GEOMETRY_3D = {"hflip": 0.5, "vflip": 0.5, "rotate": 25.0, "translate": 0.10, "scale": 0.20}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def row(piece: str, shape: str, variants: dict[str, Callable[[], object]], repeats: int) -> None:
    """Time the variants interleaved (one call of each per round, after a warm-up round) and print each one's median
    time and its median ratio to the first variant's time in the same round: load that comes and goes hits all."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    first = next(iter(times.values()))
    cells = []
    for name, values in times.items():
        ratio = statistics.median(v / f for v, f in zip(values, first, strict=True))
        cells.append(f"{name} {statistics.median(values) * 1e3:.2f} ms" + ("" if values is first else
                                                                          f" ({ratio:.2f}x)"))
    print(f"| {piece} | {shape} | {' | '.join(cells)} | {os.getloadavg()[0]:.1f} | {peak_rss_mb():.0f} |", flush=True)


def handwritten_affine(x: torch.Tensor, opts: dict[str, float], gen: torch.Generator, masks: torch.Tensor):
    """The geometric part of ``augment_batch`` as it was before #32 (the reference): matrices written out in
    ``grid_sample``'s normalised coordinates, one ``affine_grid`` for image and mask."""
    import torch.nn.functional as F

    n, dims = x.shape[0], x.ndim - 2

    def uniform(mag: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen) * 2 - 1) * mag

    def sign(p: float) -> torch.Tensor:
        return torch.where(torch.rand(n, generator=gen) < p, -1.0, 1.0)

    angle = torch.deg2rad(uniform(opts.get("rotate", 0.0)))
    cos, sin, zero, one = torch.cos(angle), torch.sin(angle), torch.zeros(n), torch.ones(n)
    if dims == 2:
        tan = torch.tan(torch.deg2rad(uniform(opts.get("shear", 0.0))))
        scale = 1.0 + uniform(opts.get("scale", 0.0))
        sx, sy = scale * sign(opts.get("hflip", 0.0)), scale * sign(opts.get("vflip", 0.0))
        shift = torch.stack([uniform(opts.get("translate", 0.0)) * 2 for _ in range(2)], 1)
        rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
        shr = torch.stack([torch.stack([one, tan], 1), torch.stack([zero, one], 1)], 1)
        linear = rot @ shr @ torch.diag_embed(torch.stack([1 / sx, 1 / sy], 1))
    else:
        scale = 1.0 + uniform(opts.get("scale", 0.0))
        flips = (sign(opts.get("hflip", 0.0)), sign(opts.get("vflip", 0.0)), sign(opts.get("vflip", 0.0)))
        shift = torch.stack([uniform(opts.get("translate", 0.0)) * 2 for _ in range(3)], 1)
        rot = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1),
                           torch.stack([zero, zero, one], 1)], 1)
        linear = rot @ torch.diag_embed(torch.stack([f / scale for f in flips], 1))
    theta = torch.cat([linear, shift[:, :, None]], 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return moved, F.grid_sample(masks.float(), grid, mode="nearest", align_corners=False).to(masks.dtype)


def monai_matrices(x: torch.Tensor, opts: dict[str, float], gen: torch.Generator, masks: torch.Tensor):
    """``augment_batch``'s geometry with its matrices built by MONAI's ``create_*`` helpers, one sample at a time, then
    Lepton's one shared grid."""
    import torch.nn.functional as F
    from monai.transforms.utils import create_rotate, create_scale, create_shear, create_translate

    from lepton.data.transforms.preprocessing import affine_grid, random_affine

    n, dims = x.shape[0], x.ndim - 2
    params = random_affine(x, opts, gen)  # the draws; MONAI builds each matrix (timing only: arbitrary angles)
    mats = []
    for i in range(n):
        angle, shift = float(np.random.default_rng(i).uniform(-0.4, 0.4)), params[i, :dims, dims].tolist()
        mats.append(create_translate(dims, shift) @ create_rotate(dims, angle if dims == 2 else (angle, 0.0, 0.0))
                    @ create_shear(dims, (0.0, 0.1) if dims == 2 else 0.0) @ create_scale(dims, (1.1,) * dims))
    grid = affine_grid(torch.as_tensor(np.stack(mats), dtype=x.dtype), x.shape)
    moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return moved, F.grid_sample(masks.float(), grid, mode="nearest", align_corners=False).to(masks.dtype)


def monai_affine(dims: int, size: int, opts: dict[str, float]):
    """MONAI's dictionary transforms with the same option meanings, as closely as they allow (MONAI draws the scale
    per axis; Lepton's is isotropic)."""
    from monai.transforms import Compose, RandAffined, RandFlipd

    keys = ["image", "label"]
    rotate = math.radians(opts["rotate"])
    flips = [RandFlipd(keys, prob=opts["hflip"], spatial_axis=dims - 1),
             RandFlipd(keys, prob=opts["vflip"], spatial_axis=list(range(dims - 1)))]
    shear = (math.tan(math.radians(opts["shear"])),) * 2 if dims == 2 and opts.get("shear") else None
    affine = RandAffined(keys, prob=1.0, rotate_range=(rotate,) if dims == 2 else (rotate, 0.0, 0.0),
                         shear_range=shear, translate_range=(opts["translate"] * size,) * dims,
                         scale_range=(opts["scale"],) * dims, mode=("bilinear", "nearest"),
                         padding_mode=("border", "zeros"))
    return Compose([*flips, affine]).set_random_state(0)


def bench_affine(dims: int, n: int, size: int, repeats: int) -> None:
    from monai.networks.layers import AffineTransform

    from lepton.data.transforms.preprocessing import augment_batch, random_affine

    opts = GEOMETRY_2D if dims == 2 else GEOMETRY_3D
    shape = (n, 1, *[size] * dims)
    x = torch.rand(shape)
    masks = (torch.rand(shape) > 0.5).long()
    gen = torch.Generator().manual_seed(0)
    warp = {"normalized": False, "zero_centered": True, "align_corners": False}
    image_layer = AffineTransform(mode="bilinear", padding_mode="border", **warp)
    mask_layer = AffineTransform(mode="nearest", padding_mode="zeros", **warp)

    def layer():
        theta = random_affine(x, opts, gen)
        return image_layer(x, theta), mask_layer(masks.float(), theta).long()

    compose = monai_affine(dims, size, opts)
    row(f"affine augmentation {dims}-D", "x".join(map(str, shape)), {
        "hand-written": lambda: handwritten_affine(x, opts, gen, masks),
        "augment_batch now (batched voxel matrices, to_norm_affine, one grid)":
            lambda: augment_batch(x, opts, gen, masks=masks),
        "MONAI create_* matrices per sample, one grid": lambda: monai_matrices(x, opts, gen, masks),
        "AffineTransform layer (grid per call)": layer,
        "RandFlipd+RandAffined per sample": lambda: [compose({"image": x[i], "label": masks[i]}) for i in range(n)],
    }, repeats)


def bench_pad(dims: int, n: int, size: int, repeats: int) -> None:
    from monai.transforms import ResizeWithPadOrCrop
    from monai.utils import convert_to_tensor

    from lepton.data.transforms.preprocessing import pad_or_crop

    want = (size,) * dims
    resize = ResizeWithPadOrCrop(want)

    def monai(x: torch.Tensor) -> torch.Tensor:  # the batch folded into MONAI's channel axis
        return convert_to_tensor(resize(x.reshape(-1, *x.shape[2:])), track_meta=False).reshape(*x.shape[:2], *want)

    for have, label in ((size * 3 // 4 + 1, "pad"), (size * 5 // 4 + 1, "crop")):
        x = torch.rand(n, 1, *[have] * dims)
        assert torch.equal(monai(x), pad_or_crop(x, want))
        row(f"{label} {dims}-D", f"{n}x1x{have}^{dims}->{size}", {
            "pad_or_crop": lambda x=x: pad_or_crop(x, want), "ResizeWithPadOrCrop": lambda x=x: monai(x)}, repeats)
        one = torch.zeros(1, 1, *[have] * dims, dtype=torch.int64)  # one mask, as the segmentation task pads them
        row(f"{label} {dims}-D, one mask", f"1x{have}^{dims}->{size}", {
            "pad_or_crop": lambda one=one: pad_or_crop(one, want), "ResizeWithPadOrCrop": lambda one=one: monai(one)},
            repeats)


def cases(dims: int, n: int, side: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` cases of ``side`` per axis: noise with one bright ball whose mask is class 1."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(side)] * dims, indexing="ij"))
    x = rng.random((n, 1, *[side] * dims), dtype=np.float32) * 0.3
    y = np.zeros((n, 1, *[side] * dims), np.int64)
    for i in range(n):
        centre = rng.integers(side // 5, side - side // 5, dims).reshape(dims, *[1] * dims)
        ball = ((grid - centre) ** 2).sum(0) < (side / 8) ** 2
        x[i, 0][ball] += 0.6
        y[i, 0][ball] = 1
    return torch.from_numpy(x), torch.from_numpy(y)


def monai_patches(size: tuple[int, ...]):
    from monai.transforms import RandCropByPosNegLabeld

    return RandCropByPosNegLabeld(["image", "label"], "label", spatial_size=size, pos=1, neg=2,
                                  num_samples=1).set_random_state(0)


def bench_patches(dims: int, n: int, side: int, size: int, repeats: int) -> None:
    from lepton.data.transforms.preprocessing import Preprocessing
    from lepton.tasks.segmentation import Segmentation

    x, y = cases(dims, n, side)
    patch = (size,) * dims
    spec = Preprocessing(patch, 1, [0.5], [0.25])
    task, gen = Segmentation(), torch.Generator().manual_seed(0)
    crop = monai_patches(patch)

    def monai():
        out = [crop({"image": x[i], "label": y[i]})[0] for i in range(n)]
        return torch.stack([o["image"] for o in out]), torch.stack([o["label"] for o in out])

    row(f"patches in memory {dims}-D", f"{n}x{side}^{dims}->{size}", {
        "Segmentation.batch": lambda: task.batch(x, y, spec, gen), "RandCropByPosNegLabeld": monai}, repeats)
    bench_cached(dims, x, y, patch, repeats)


def bench_cached(dims: int, x: torch.Tensor, y: torch.Tensor, patch: tuple[int, ...], repeats: int) -> None:
    from lepton.data.index.cache import CaseCache
    from lepton.data.index.cases import CaseStore

    with tempfile.TemporaryDirectory() as tmp:
        cache, entries = CaseCache(tmp), []
        for i in range(len(x)):
            image, mask = x[i].numpy(), y[i].numpy().astype(np.uint8)
            fg = np.argwhere(mask[0] > 0).astype(np.int32)
            entries.append(cache.put(f"case{i:04d}", {"image": image, "mask": mask, "fg": fg},
                                     {"shape": list(image.shape)}))
        n = len(entries)
        store = CaseStore(entries, ["background", "ball"], np.array(["train"] * n, dtype=object),
                          np.array([f"c{i}" for i in range(n)], dtype=object), tmp)
        gen = torch.Generator().manual_seed(0)
        crop = monai_patches(patch)

        def monai():
            out = [crop({"image": torch.from_numpy(store.image(i)),
                         "label": torch.from_numpy(store.mask(i).astype(np.int64))})[0] for i in range(n)]
            return torch.stack([o["image"] for o in out]), torch.stack([o["label"] for o in out])

        row(f"patches from cache {dims}-D", f"{n}x{x.shape[-1]}^{dims}->{patch[0]}", {
            "CaseStore.patches": lambda: store.patches(patch, gen), "read + RandCropByPosNegLabeld": monai}, repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3-D at 48^3 and 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9; 3 quick)")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads (default 2)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 9)
    torch.set_num_threads(args.threads)
    import monai

    side3 = 48 if args.quick else 96
    print(f"CPU: {cpu_summary()}")
    print(f"torch {torch.__version__} ({args.threads} threads), MONAI {monai.__version__}; {repeats} rounds; "
          f"load average at start {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| piece | batch | reference, then the others (median ratio to the reference) | load | peak RSS MB |")
    bench_affine(2, 64, 64, repeats)
    bench_affine(3, 2, side3, repeats)
    bench_pad(2, 64, 64, repeats)
    bench_pad(3, 2, side3, repeats)
    bench_patches(2, 64, 96, 64, repeats)
    bench_patches(3, 2, side3 * 4 // 3, side3, repeats)
    print(f"load average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
