"""Tiles of a whole-slide image: a tissue mask on a low level, a grid of tiles at a requested µm/px, size and overlap
kept where there is tissue, the grid cached on disk, and the tiles streamed.

The mask (``tissue_mask``) is Otsu's threshold on HSV saturation at about 8 µm/px (what TIAToolbox and CLAM do at
1.25x): stained tissue is saturated, glass is not. Pen ink is saturated too, so pixels whose hue is far from H&E's
pinks and purples (green and blue ink) or that are nearly black are taken out first, with a margin; objects smaller
than ``min_object_um2`` (dust, debris) are dropped and holes smaller than ``max_hole_um2`` (vessels, fat) are filled.

The grid (``plan_tiles``) is cached in the content-addressed case cache (``lepton.data.index.cache``) under the slide's
bytes and the tiling options, so a second run over a slide reads the coordinates instead of computing the mask.

``iter_tiles`` reads a row of adjacent tiles as one band (each stored tile of the file decoded once, not once per
tile that overlaps it) on worker threads — the codecs release the GIL — with at most a few bands in flight, and yields
the tiles in grid order: memory stays at a few bands whatever the slide's size.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lepton.data.readers.slides import Slide
from lepton.errors import ConfigError, DataError

TILING_VERSION = 1
#: The longest run of adjacent tiles read as one band.
MAX_RUN = 32
#: Stain hues (degrees): H&E's purples and pinks from hematoxylin to eosin, wrapping through red to IHC's DAB brown.
#: Saturated pixels outside (green and blue ink) are pen.
HE_HUES = (250.0, 50.0)


@dataclass(frozen=True)
class TileSpec:
    """What to cut: ``size``-pixel square tiles at ``mpp`` µm/px, neighbours sharing ``overlap`` pixels, kept when at
    least ``min_tissue`` of the tile is tissue; the mask at ``mask_mpp`` µm/px."""

    mpp: float = 0.5
    size: int = 256
    overlap: int = 0
    min_tissue: float = 0.5
    mask_mpp: float = 8.0
    min_object_um2: float = 20_000.0
    max_hole_um2: float = 10_000.0

    def check(self) -> TileSpec:
        if not 0.05 <= self.mpp <= 100:
            raise ConfigError(f"tile mpp {self.mpp}: give microns per pixel between 0.05 and 100 (0.5 is 20x)")
        if not 8 <= self.size <= 4096:
            raise ConfigError(f"tile size {self.size}: give 8 to 4096 pixels")
        if not 0 <= self.overlap < self.size:
            raise ConfigError(f"overlap {self.overlap}: give 0 to size - 1 ({self.size - 1}) pixels")
        if not 0 <= self.min_tissue <= 1:
            raise ConfigError(f"min_tissue {self.min_tissue}: give a share between 0 and 1")
        return self


@dataclass
class TissueMask:
    """A slide's tissue mask: ``mask`` (bool) at ``downsample`` level-0 pixels per mask pixel, with Otsu's saturation
    threshold and the share of the slide taken as pen."""

    mask: np.ndarray
    downsample: float
    threshold: float
    pen_share: float


@dataclass
class TileGrid:
    """Tiles kept on a slide: ``coords`` (N, 2) level-0 top-left x, y; read from ``level`` as ``read_size`` squares
    and resized to ``spec.size``; ``stride0`` is the step in level-0 pixels; ``cached``: whether it came from disk."""

    coords: np.ndarray
    spec: TileSpec
    level: int
    read_size: int
    stride0: float
    size0: float
    mask: np.ndarray
    mask_downsample: float
    cached: bool = False

    def __len__(self) -> int:
        return len(self.coords)


def tissue_mask(slide: Slide, spec: TileSpec = TileSpec()) -> TissueMask:
    """The tissue mask of a brightfield slide at about ``spec.mask_mpp`` µm/px (see the module's notes)."""
    from PIL import Image
    from scipy.ndimage import binary_dilation
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    if not slide.brightfield:
        raise DataError(f"{slide.path}: a {slide.channels} image, not an RGB brightfield scan: the tissue detector "
                        "(stain saturation) and the slide models read H&E or IHC brightfield slides only")
    w0, h0 = slide.dimensions
    mask_mpp = max(spec.mask_mpp, slide.mpp)
    size = (max(1, round(w0 * slide.mpp / mask_mpp)), max(1, round(h0 * slide.mpp / mask_mpp)))
    level = slide.best_level(mask_mpp)
    lv = slide.levels[level]
    pixels = slide.read(level, 0, 0, lv.width, lv.height)
    if (lv.width, lv.height) != size:
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))
    hsv = rgb2hsv(pixels)
    hue, sat, val = hsv[..., 0] * 360, hsv[..., 1], hsv[..., 2]
    he = (hue >= HE_HUES[0]) | (hue <= HE_HUES[1])
    pen = ((sat > 0.25) & ~he) | (val < 0.25)
    pen = binary_dilation(pen, iterations=2) if pen.any() else pen
    usable = sat[~pen]
    threshold = float(threshold_otsu(usable)) if usable.size and np.ptp(usable) > 0 else 1.0
    threshold = max(threshold, 0.04)  # glass alone: no threshold below faint noise
    tissue = (sat > threshold) & ~pen
    px_um2 = mask_mpp * mask_mpp
    tissue = remove_small_objects(tissue, max_size=max(1, int(spec.min_object_um2 / px_um2)))
    tissue = remove_small_holes(tissue, max_size=max(1, int(spec.max_hole_um2 / px_um2))) & ~pen
    return TissueMask(tissue, w0 / size[0], threshold, float(pen.mean()))


def grid_coords(slide: Slide, spec: TileSpec, mask: TissueMask) -> tuple[np.ndarray, float, float]:
    """Level-0 top-left corners of the tiles whose share of tissue is at least ``spec.min_tissue``; also the tile
    side and stride in level-0 pixels."""
    w0, h0 = slide.dimensions
    size0 = spec.size * spec.mpp / slide.mpp
    stride0 = (spec.size - spec.overlap) * spec.mpp / slide.mpp
    if size0 > min(w0, h0):
        return np.zeros((0, 2), np.int64), size0, stride0
    xs = np.arange(0, w0 - size0 + 1, stride0)
    ys = np.arange(0, h0 - size0 + 1, stride0)
    # Tissue share of each tile from a summed-area table of the mask.
    m = mask.mask.astype(np.float64)
    sat = np.zeros((m.shape[0] + 1, m.shape[1] + 1))
    sat[1:, 1:] = m.cumsum(0).cumsum(1)
    ds = mask.downsample

    def edges(v: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        a = np.clip(np.floor(v / ds).astype(int), 0, limit)
        b = np.clip(np.ceil((v + size0) / ds).astype(int), 0, limit)
        return a, np.maximum(b, a + 1).clip(max=limit)

    x0, x1 = edges(xs, m.shape[1])
    y0, y1 = edges(ys, m.shape[0])
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    total = sat[y1][:, x1] - sat[y0][:, x1] - sat[y1][:, x0] + sat[y0][:, x0]
    share = np.where(area > 0, total / np.maximum(area, 1), 0)
    iy, ix = np.nonzero(share >= max(spec.min_tissue, 1e-9))
    coords = np.stack([np.round(xs[ix]), np.round(ys[iy])], axis=1).astype(np.int64)
    return coords, size0, stride0


def plan_tiles(slide: Slide, spec: TileSpec = TileSpec(), *, cache: Any = None) -> TileGrid:
    """The tile grid of a slide, from the case cache when this slide's bytes were tiled so before (``cache``: a
    ``CaseCache``, a folder, or False for none; default the cache under ``default_cache_dir()/slides``)."""
    from lepton.data.index.cache import CaseCache, default_cache_dir

    spec = spec.check()
    level = slide.best_level(spec.mpp)
    read_size = max(1, round(spec.size * spec.mpp / slide.levels[level].mpp))
    store = None if cache is False else (cache if isinstance(cache, CaseCache) else
                                         CaseCache(cache or default_cache_dir() / "slides"))
    key = None
    if store is not None:
        options = {"kind": "tiles", "v": TILING_VERSION, "spec": asdict(spec), "mpp": slide.mpp}
        key = store.key([slide.path], options)
        entry = store.get(key)
        if entry is not None:
            return TileGrid(np.array(entry.array("coords")), spec, level, read_size, entry.meta["stride0"],
                            entry.meta["size0"], np.array(entry.array("mask")).astype(bool),
                            entry.meta["mask_downsample"], cached=True)
    mask = tissue_mask(slide, spec)
    coords, size0, stride0 = grid_coords(slide, spec, mask)
    grid = TileGrid(coords, spec, level, read_size, stride0, size0, mask.mask, mask.downsample)
    if store is not None:
        store.put(key, {"coords": coords, "mask": mask.mask.astype(np.uint8)},
                  {"source": str(slide.path), "kind": "tiles", "tiles": len(coords), "stride0": stride0,
                   "size0": size0, "mask_downsample": mask.downsample, "threshold": mask.threshold,
                   "pen_share": mask.pen_share})
    return grid


# -- streaming ----------------------------------------------------------------------------------------------------
def _runs(grid: TileGrid) -> list[np.ndarray]:
    """Indices of tiles grouped into runs: same row, adjacent on the grid, at most ``MAX_RUN`` long."""
    coords = grid.coords
    if not len(coords):
        return []
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    runs, current = [], [order[0]]
    for i in order[1:]:
        prev = coords[current[-1]]
        adjacent = coords[i, 1] == prev[1] and coords[i, 0] - prev[0] <= grid.stride0 + 1
        if adjacent and len(current) < MAX_RUN:
            current.append(i)
        else:
            runs.append(np.array(current))
            current = [i]
    runs.append(np.array(current))
    return runs


def _read_run(slide: Slide, grid: TileGrid, run: np.ndarray) -> list[np.ndarray]:
    from PIL import Image

    lv = slide.levels[grid.level]
    xs = np.round(grid.coords[run, 0] / lv.downsample).astype(int)
    y = round(float(grid.coords[run[0], 1]) / lv.downsample)
    band = slide.read(grid.level, int(xs[0]), y, int(xs[-1] - xs[0]) + grid.read_size, grid.read_size)
    out = []
    for x in xs:
        tile = band[:, x - xs[0]:x - xs[0] + grid.read_size]
        if grid.read_size != grid.spec.size:
            tile = np.asarray(Image.fromarray(tile).resize((grid.spec.size, grid.spec.size),
                                                           Image.Resampling.BILINEAR, reducing_gap=2.0))
        out.append(tile)  # a view of the band: the band lives as long as its tiles
    return out


def default_workers() -> int:
    """Threads reading tiles: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def iter_tiles(slide: Slide, grid: TileGrid, *, workers: int | None = None,
               progress: bool | str = False) -> Iterator[tuple[int, np.ndarray]]:
    """(index into ``grid.coords``, tile (size, size, 3) uint8) for every tile, in row order; ``workers`` threads read
    bands ahead (default: the usable cores), at most ``2 x workers`` bands in flight. ``progress`` shows a rich bar
    with tiles/s (a string names it)."""
    runs = _runs(grid)
    workers = workers or default_workers()
    bar = _TileBar(len(grid), progress if isinstance(progress, str) else f"tiling {slide.path.name}") \
        if progress else None
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lepton-tiles") as pool:
            pending: deque = deque()
            it = iter(runs)
            for run in it:
                pending.append((run, pool.submit(_read_run, slide, grid, run)))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                run, future = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(_read_run, slide, grid, nxt)))
                for index, tile in zip(run, future.result(), strict=True):
                    yield int(index), tile
                if bar:
                    bar.advance(len(run))
    finally:
        if bar:
            bar.close()


class _TileBar:
    """A rich progress bar with tiles/s, on a terminal only."""

    def __init__(self, total: int, label: str):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self.bar = None
        if console.is_terminal:
            self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]} tiles/s"),
                                TimeRemainingColumn(), console=console)
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, rate="-")

    def advance(self, n: int) -> None:
        if self.bar:
            self.bar.update(self.task, advance=n)
            speed = self.bar.tasks[0].speed
            self.bar.update(self.task, rate=f"{speed:.0f}" if speed else "-")

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def tile_slide(path: str | Path, spec: TileSpec = TileSpec(), *, mpp: float | None = None,
               output: str | Path | None = None, cache: Any = None, workers: int | None = None,
               progress: bool = False) -> dict[str, Any]:
    """Tile one slide: its grid (from the cache when tiled so before), then every tile read, streamed — written as
    ``x{X}_y{Y}.png`` files (level-0 corner) with ``tiles.csv`` into ``output`` when given. Returns what was done:
    tiles, kept share of the grid, tiles/s."""
    import csv
    import time

    from PIL import Image

    from lepton.data.readers.slides import open_slide

    with open_slide(path, mpp=mpp) as slide:
        started = time.perf_counter()
        grid = plan_tiles(slide, spec, cache=cache)
        planned = time.perf_counter()
        folder = Path(output) if output else None
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
        count = 0
        for i, tile in iter_tiles(slide, grid, workers=workers, progress=progress):
            if folder:
                x, y = grid.coords[i]
                Image.fromarray(tile).save(folder / f"x{x}_y{y}.png", compress_level=1)
            count += 1
        done = time.perf_counter()
        if folder:
            with open(folder / "tiles.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["file", "x", "y", "size0"])
                writer.writerows([f"x{x}_y{y}.png", x, y, round(grid.size0, 2)] for x, y in grid.coords)
        w0, h0 = slide.dimensions
        possible = max(1, int((w0 - grid.size0) // grid.stride0 + 1) * int((h0 - grid.size0) // grid.stride0 + 1))
        return {"slide": str(slide.path), "tiles": count, "grid_share": round(count / possible, 4),
                "level": grid.level, "read_size": grid.read_size, "grid_cached": grid.cached,
                "mask_seconds": round(planned - started, 3), "read_seconds": round(done - planned, 3),
                "tiles_per_s": round(count / max(done - planned, 1e-9), 1), "output": str(folder) if folder else None}
