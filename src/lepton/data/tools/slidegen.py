"""Small real whole-slide images for demos, tests and benchmarks: tissue, background, holes, debris, pen marks and
(on some slides) "tumour" regions, written as tiled, multi-level pyramids with their resolution — a generic pyramidal
TIFF (SubIFDs), an OME-TIFF, an Aperio SVS (its ImageDescription, a thumbnail page) through tifffile, or a DICOM VL
whole-slide image (one instance per level, TILED_FULL) through pydicom — with JPEG or deflate tiles.

A slide is a ``SlidePlan``: smooth random fields on a coarse grid that say where tissue, tumour and pen are. Any
region of any level is rendered from the plan on demand (``render``), so a 40,000 x 40,000 pixel slide is written tile
by tile in bounded memory. Tissue is pink stroma with small nuclei; tumour is crowded, larger, darker nuclei. Each
slide gets its own stain shade, so colour alone does not give the label away.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from lepton.errors import DataError

CONTAINERS = ("tiff", "ome-tiff", "svs", "ndpi", "mrxs", "dicom")
COMPRESSIONS = {"jpeg": "jpeg", "deflate": "zlib"}
SUFFIX = {"tiff": ".tiff", "ome-tiff": ".ome.tiff", "svs": ".svs", "ndpi": ".ndpi", "mrxs": ".mrxs", "dicom": ".dcm"}
#: Texture tiles are this many level-0 pixels a side, and repeat.
TEXTURE = 512
#: Coarse fields are sampled on every STEP-th output pixel and repeated (edges stay smooth at that scale).
STEP = 4
BACKGROUND_RGB = (243, 241, 244)
PEN_RGB = {"blue": (40, 70, 190), "green": (40, 150, 70), "black": (30, 30, 35)}


@dataclass(frozen=True)
class SlidePlan:
    """Where things are on a slide: ``tissue``, ``tumour`` and ``pen`` are fields on a coarse grid of ``cell`` level-0
    pixels (a point is in the region where its field is above 0.5); ``stain`` scales tissue colours."""

    width: int
    height: int
    mpp: float
    cell: float
    tissue: np.ndarray
    tumour: np.ndarray
    pen: np.ndarray
    stain: np.ndarray
    pen_rgb: tuple[int, int, int]
    has_tumour: bool
    variant: int = 0

    def tumour_fraction(self, x: float, y: float, size: float) -> float:
        """Share of the level-0 square (x, y, size) that is tumour (on the coarse grid)."""
        c = self.cell
        ys, xs = slice(int(y // c), max(int(y // c) + 1, int((y + size) // c))), \
            slice(int(x // c), max(int(x // c) + 1, int((x + size) // c)))
        return float(((self.tumour[ys, xs] > 0.5) & (self.tissue[ys, xs] > 0.5)).mean())


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-9)


def plan_slide(width: int, height: int, *, tumour: bool, seed: int, mpp: float = 0.5, pen: bool | None = None,
               tissue_share: float = 0.45) -> SlidePlan:
    """A random slide layout: one to three tissue pieces with holes and debris, tumour blobs inside tissue when
    ``tumour``, and (by default on about half the slides) a pen stroke."""
    from skimage.draw import disk, line

    rng = np.random.default_rng(seed)
    cell = max(width, height) / 192
    gh, gw = max(8, round(height / cell)), max(8, round(width / cell))
    yy, xx = np.mgrid[0:gh, 0:gw]
    # Tissue: a smooth random field, kept away from the edges, thresholded at the share asked for.
    edge = np.minimum.reduce([yy, xx, gh - 1 - yy, gw - 1 - xx]) / (0.08 * max(gh, gw))
    field = _smooth_field(rng, (gh, gw), sigma=max(gh, gw) / 14) - 2.5 * np.clip(1 - edge, 0, 1)
    cut = np.quantile(field, 1 - tissue_share)
    tissue = np.clip((field - cut) * 4 + 0.5, 0, 1)
    for _ in range(rng.integers(8, 20)):  # holes (vessels, fat) inside tissue
        rr, cc = disk((rng.integers(0, gh), rng.integers(0, gw)), rng.uniform(0.6, 1.6), shape=(gh, gw))
        tissue[rr, cc] = np.minimum(tissue[rr, cc], 0.0)
    for _ in range(rng.integers(5, 12)):  # debris: specks of tissue in the background
        rr, cc = disk((rng.integers(0, gh), rng.integers(0, gw)), 0.7, shape=(gh, gw))
        tissue[rr, cc] = np.maximum(tissue[rr, cc], 1.0)
    tumour_field = np.zeros((gh, gw))
    if tumour:
        inside = np.argwhere(tissue > 0.9)
        for _ in range(rng.integers(1, 3)):
            cy, cx = inside[rng.integers(len(inside))]
            r = rng.uniform(0.07, 0.12) * max(gh, gw)
            bump = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
            tumour_field = np.maximum(tumour_field, bump * 1.6)
        tumour_field = tumour_field + 0.15 * _smooth_field(rng, (gh, gw), sigma=3)
    pen_field = np.zeros((gh, gw))
    if pen if pen is not None else rng.random() < 0.5:
        y0, x0, y1, x1 = rng.integers(0, gh), rng.integers(0, gw), rng.integers(0, gh), rng.integers(0, gw)
        rr, cc = line(y0, x0, y1, x1)
        pen_field[rr, cc] = 1.0
        from scipy.ndimage import gaussian_filter

        pen_field = np.clip(gaussian_filter(pen_field, 0.8) * 6, 0, 1)
    stain = rng.uniform(0.9, 1.08, 3)
    pen_rgb = PEN_RGB[("blue", "green", "black")[rng.integers(3)]]
    return SlidePlan(width, height, mpp, cell, tissue.astype(np.float32), tumour_field.astype(np.float32),
                     pen_field.astype(np.float32), stain, pen_rgb, tumour, int(rng.integers(3)))


# -- textures -----------------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _texture(kind: str, variant: int, downsample: float) -> np.ndarray:
    """A repeating texture of ``kind`` (normal or tumour) at a level's downsample, float32 RGB in [0, 255]."""
    from PIL import Image
    from skimage.draw import disk

    rng = np.random.default_rng(1000 * variant + (kind == "tumour"))
    from scipy.ndimage import gaussian_filter

    base = np.array([236.0, 168.0, 198.0]) if kind == "normal" else np.array([214.0, 150.0, 196.0])
    img = np.empty((TEXTURE, TEXTURE, 3), np.float32)
    fibres = gaussian_filter(rng.standard_normal((TEXTURE, TEXTURE)), (1.0, 6.0), mode="wrap")
    img[:] = base
    img += (fibres / (fibres.std() + 1e-9) * 9)[..., None]
    count, radius = (90, (4, 7)) if kind == "normal" else (700, (7, 12))
    nucleus = np.array([95.0, 60.0, 150.0]) if kind == "normal" else np.array([70.0, 38.0, 120.0])
    for _ in range(count):
        cy, cx, r = rng.integers(0, TEXTURE), rng.integers(0, TEXTURE), rng.uniform(*radius)
        for oy in (-TEXTURE, 0, TEXTURE):  # drawn wrapped, so the texture tiles without seams
            for ox in (-TEXTURE, 0, TEXTURE):
                rr, cc = disk((cy + oy, cx + ox), r, shape=(TEXTURE, TEXTURE))
                img[rr, cc] = nucleus + rng.normal(0, 6, 3)
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255)
    side = max(4, round(TEXTURE / downsample))
    if side != TEXTURE:
        img = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((side, side), Image.Resampling.BOX),
                         np.float32)
    return img


def _tiled(tex: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    side = tex.shape[0]
    ys = (np.arange(y, y + h) % side)
    xs = (np.arange(x, x + w) % side)
    return tex[ys[:, None], xs[None, :]]


def render(plan: SlidePlan, downsample: float, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The pixels (h, w, 3) uint8 of the region (x, y, w, h) of the level at ``downsample``."""
    from scipy.ndimage import map_coordinates

    hs, ws = -(-h // STEP), -(-w // STEP)
    gy = ((y + np.arange(hs) * STEP + STEP / 2) * downsample / plan.cell - 0.5)
    gx = ((x + np.arange(ws) * STEP + STEP / 2) * downsample / plan.cell - 0.5)
    coords = np.stack(np.meshgrid(gy, gx, indexing="ij"))

    def sample(field: np.ndarray) -> np.ndarray:
        small = map_coordinates(field, coords, order=1, mode="nearest")
        return np.repeat(np.repeat(small, STEP, 0), STEP, 1)[:h, :w]

    tissue, tumour, pen = sample(plan.tissue) > 0.5, sample(plan.tumour) > 0.5, sample(plan.pen)
    out = np.empty((h, w, 3), np.float32)
    out[:] = BACKGROUND_RGB
    out += np.random.default_rng((x * 7919 + y) % (1 << 32)).normal(0, 2.0, (h, w, 1))
    variant = plan.variant
    if tissue.any():
        normal = _tiled(_texture("normal", variant, downsample), x, y, w, h) * plan.stain
        out[tissue] = normal[tissue]
        sick = tissue & tumour
        if sick.any():
            out[sick] = (_tiled(_texture("tumour", variant, downsample), x, y, w, h) * plan.stain)[sick]
    if pen.any():
        alpha = (pen * 0.85)[..., None]
        out = out * (1 - alpha) + np.asarray(plan.pen_rgb, np.float32) * alpha
    return np.clip(out, 0, 255).astype(np.uint8)


# -- writers ------------------------------------------------------------------------------------------------------
def pyramid_downsamples(width: int, height: int, *, factor: int = 4, smallest: int = 256) -> list[int]:
    """Level downsamples 1, 4, 16, … while the level's longer side stays at least ``smallest`` pixels."""
    out, ds = [1], factor
    while max(width, height) / ds >= smallest:
        out.append(ds)
        ds *= factor
    return out


def _tiles(plan: SlidePlan, ds: int, tile: int) -> Iterator[np.ndarray]:
    w, h = -(-plan.width // ds), -(-plan.height // ds)
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            yield render(plan, ds, tx, ty, tile, tile)


def write_slide(path: str | Path, plan: SlidePlan, *, container: str = "tiff", compression: str = "jpeg",
                tile: int = 256, resolution: bool = True, quality: int = 85) -> Path:
    """Write ``plan`` as a tiled pyramid in ``container`` (``tiff``, ``ome-tiff``, ``svs``, ``ndpi``, ``mrxs`` (both
    JPEG only) or ``dicom``) with JPEG or deflate tiles; ``resolution=False`` leaves the µm/px out (a slide a reader
    must refuse)."""
    if container not in CONTAINERS:
        raise DataError(f"container {container!r}: choose one of {', '.join(CONTAINERS)}")
    if compression not in COMPRESSIONS:
        raise DataError(f"compression {compression!r}: choose one of {', '.join(COMPRESSIONS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = pyramid_downsamples(plan.width, plan.height)
    if container == "dicom":
        from lepton.data.tools.slidedicom import write_dicom_slide

        return write_dicom_slide(path, plan, levels, tile=tile, compression=compression, quality=quality,
                                 resolution=resolution, render_tiles=_tiles)
    if container == "ndpi":  # JPEG strips with restart markers, as Hamamatsu scanners write them
        if compression != "jpeg":
            raise DataError("an NDPI slide is JPEG-compressed: leave --compression at jpeg")
        from lepton.data.tools.slidendpi import write_ndpi_slide

        return write_ndpi_slide(path, plan, levels, quality=quality, resolution=resolution,
                                render_level=lambda p, ds, w, h: render(p, ds, 0, 0, w, h))
    if container == "mrxs":  # MIRAX: a folder of camera images, its index and Slidedat.ini
        if compression != "jpeg":
            raise DataError("a MIRAX slide is JPEG-compressed: leave --compression at jpeg")
        from lepton.data.tools.slidemirax import write_mirax_slide

        return write_mirax_slide(path, plan, tile=tile, quality=quality, resolution=resolution, render=render)
    _write_tiff(path, plan, levels, container, compression, tile, resolution, quality)
    return path


def _write_tiff(path: Path, plan: SlidePlan, levels: list[int], container: str, compression: str, tile: int,
                resolution: bool, quality: int) -> None:
    import tifffile

    codec = {"compression": COMPRESSIONS[compression],
             "compressionargs": {"level": quality} if compression == "jpeg" else {"level": 6}}
    big = plan.width * plan.height * 3 > (1 << 31) - (1 << 26)
    tmp = path.with_name(f".{path.name}.tmp")
    with tifffile.TiffWriter(tmp, bigtiff=big, ome=container == "ome-tiff") as tif:
        for i, ds in enumerate(levels):
            w, h = -(-plan.width // ds), -(-plan.height // ds)
            opts = {"tile": (tile, tile), **codec, "photometric": "rgb", "dtype": np.uint8,
                    "shape": (h, w, 3)}
            if resolution and container != "svs":
                opts.update(resolution=(1e4 / (plan.mpp * ds), 1e4 / (plan.mpp * ds)), resolutionunit="CENTIMETER")
            if container == "svs":
                opts["metadata"] = None  # tifffile's own "shaped" description would hide the Aperio one
                mag = round(10 / plan.mpp)
                desc = (f"Aperio Image Library v12.0.0 \r\n{plan.width}x{plan.height} ({tile}x{tile}) "
                        f"JPEG/RGB Q={quality}")
                if i == 0:
                    desc += f"|AppMag = {mag}" + (f"|MPP = {plan.mpp:.4f}" if resolution else "")
                    tif.write(_tiles(plan, ds, tile), description=desc, **opts)
                    thumb = render(plan, plan.width / 512, 0, 0, 512, round(512 * plan.height / plan.width))
                    tif.write(thumb, description=f"Aperio Image Library v12.0.0 \r\n{plan.width}x{plan.height} -> "
                                                 f"{thumb.shape[1]}x{thumb.shape[0]} - ", photometric="rgb",
                              metadata=None)
                else:
                    tif.write(_tiles(plan, ds, tile), description=desc + f" -> {w}x{h} - ", **opts)
            elif i == 0:
                meta = ({"axes": "YXS", "PhysicalSizeX": plan.mpp, "PhysicalSizeY": plan.mpp,
                         "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"} if container == "ome-tiff" and
                        resolution else ({"axes": "YXS"} if container == "ome-tiff" else None))
                tif.write(_tiles(plan, ds, tile), subifds=len(levels) - 1, metadata=meta, **opts)
            else:
                tif.write(_tiles(plan, ds, tile), subfiletype=1, metadata=None, **opts)
    tmp.replace(path)


def write_slide_set(folder: str | Path, n: int, *, size: int = 3072, mpp: float = 0.5, seed: int = 0,
                    container: str = "tiff", compression: str = "jpeg", slides_per_patient: int = 2) -> Path:
    """``n`` slides (half with tumour) in ``folder`` with ``slides.csv`` (slide, label, patient); a patient's slides
    share a label, as a case's blocks do. Returns the CSV's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    patients = -(-n // slides_per_patient)
    labels = np.array([i % 2 for i in range(patients)])
    rng.shuffle(labels)
    rows = []
    for i in range(n):
        patient = i // slides_per_patient
        label = int(labels[patient])
        side = int(size * rng.uniform(0.85, 1.15))
        plan = plan_slide(side, size, tumour=bool(label), seed=seed * 100_003 + i, mpp=mpp)
        name = f"slide{i:03d}{SUFFIX[container]}"
        write_slide(folder / name, plan, container=container, compression=compression)
        rows.append({"slide": name, "label": "tumour" if label else "normal", "patient": f"P{patient:03d}"})
    manifest = folder / "slides.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["slide", "label", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest
