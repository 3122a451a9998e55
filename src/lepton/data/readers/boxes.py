"""Box annotations for detection: COCO JSON, Pascal VOC XML and box CSV manifests, 2-D images and 3-D volumes.

Every box is checked against its image — outside it, inverted or of zero size is a DataError naming the file and the
row or object, with the fix (``skip_bad`` drops such boxes with a warning instead). Images without findings are kept
as negatives. Boxes are held in the image's axis order, ``(y0, x0, y1, x1)`` for (C, H, W) images and
``(z0, y0, x0, z1, y1, x1)`` for (C, D, H, W) volumes, in pixel units with continuous coordinates (a box covering
pixel columns 10…19 is ``x0 = 10, x1 = 20``); ``normalized_targets`` gives them as fractions of each axis.

Coordinate conventions of the formats: COCO ``bbox`` is ``[x, y, width, height]`` in continuous pixels; VOC
``xmin…ymax`` are 1-based inclusive pixel indices (``x0 = xmin - 1``, ``x1 = xmax``); a CSV's ``x0,y0,x1,y1``
(and ``z0,z1`` for volumes) are 0-based continuous pixel coordinates of the image as Lepton reads it (for a volume:
``z`` the slice axis, the array's first axis for ``.npy`` files). A CSV row with empty coordinates is an image
without findings. A CSV may give volume boxes in world coordinates instead: a ``space`` column of ``ras`` (mm, the
NIfTI convention) or ``lps`` (mm, DICOM patient coordinates) per row, converted through the volume's affine to the
voxel box that holds the world box (``world_to_voxel_boxes``; ``voxel_to_world_boxes`` goes back).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lepton.data.index.dataset import SPLITS, report_bad
from lepton.errors import DataError

log = logging.getLogger("lepton.data")

#: The label of a CSV without a label column.
DEFAULT_LABEL = "lesion"
BOX_FIX = "fix the coordinates (they must lie inside the image, with x0 < x1, y0 < y1, z0 < z1) or drop the box"


@dataclass
class BoxSet:
    """Images with their boxes, in memory.

    ``images[i]`` is float32 (C, H, W) or (C, D, H, W) in [0, 1]; ``boxes[i]`` float32 (n, 2·dims) in the image's
    axis order and pixels; ``classes[i]`` int64 (n,) indices into ``label_names`` (no background entry). ``labels``
    is a per-image stratum for splitting (1 when the image has a finding).
    """

    images: list[np.ndarray]
    boxes: list[np.ndarray]
    classes: list[np.ndarray]
    label_names: list[str]
    splits: np.ndarray
    groups: np.ndarray
    names: list[str]
    source: str
    has_patient_ids: bool = False
    partial_labels: bool = False
    bad_files: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> np.ndarray:
        return np.array([int(len(b) > 0) for b in self.boxes], dtype=np.int64)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(np.shape(im)) for im in self.images]

    @property
    def spatial_dims(self) -> int:
        return int(np.ndim(self.images[0])) - 1 if self.images else 2

    def subset(self, mask: np.ndarray) -> BoxSet:
        idx = np.flatnonzero(mask)
        return BoxSet([self.images[i] for i in idx], [self.boxes[i] for i in idx], [self.classes[i] for i in idx],
                      self.label_names, self.splits[idx], self.groups[idx], [self.names[i] for i in idx],
                      self.source, self.has_patient_ids)

    def content_hashes(self) -> list[str]:
        """SHA-256 of each image with its boxes and classes."""
        return [hashlib.sha256(str(im.shape).encode() + np.ascontiguousarray(im, np.float32).tobytes()
                               + np.ascontiguousarray(b, np.float32).tobytes()
                               + np.ascontiguousarray(c, np.int64).tobytes()).hexdigest()
                for im, b, c in zip(self.images, self.boxes, self.classes, strict=True)]

    def missing_classes(self, chosen: np.ndarray) -> list[str]:
        """Classes that no box of the chosen images has."""
        seen = set()
        for i in np.flatnonzero(chosen):
            seen.update(self.classes[i].tolist())
        return [name for k, name in enumerate(self.label_names) if k not in seen]

    def validate(self) -> BoxSet:
        if not len(self):
            raise DataError(f"{self.source}: no annotated images were found")
        if len({np.ndim(im) for im in self.images}) > 1:
            raise DataError(f"{self.source}: mixes 2-D images and volumes")
        if not any(len(b) for b in self.boxes):
            raise DataError(f"{self.source}: no image has a box; a detector needs findings to learn from")
        bad_splits = sorted(set(self.splits.tolist()) - {"", *SPLITS})
        if bad_splits:
            raise DataError(f"{self.source}: unknown split name(s) {bad_splits}; use train, val, test")
        return self

    def normalized_targets(self) -> np.ndarray:
        """All boxes as one padded float32 array (N, M, 2·dims + 1): coordinates as fractions of each axis, then the
        class index; rows past an image's boxes hold class -1 (M is at least 1)."""
        dims = self.spatial_dims
        width = max([len(b) for b in self.boxes] + [1])
        out = np.zeros((len(self), width, 2 * dims + 1), np.float32)
        out[:, :, -1] = -1
        for i, (im, b, c) in enumerate(zip(self.images, self.boxes, self.classes, strict=True)):
            if len(b):
                size = np.asarray(np.shape(im)[1:], np.float32)
                out[i, :len(b), :2 * dims] = b / np.concatenate([size, size])
                out[i, :len(b), -1] = c
        return out


# -- world coordinates ----------------------------------------------------------------------------------------------
#: World coordinate systems a box may be given in: the sign of (x, y, z) that takes it to RAS.
SPACES = {"ras": (1.0, 1.0, 1.0), "lps": (-1.0, -1.0, 1.0)}


def _corners(boxes: np.ndarray) -> np.ndarray:
    """The 8 corners (n, 8, 3) of 3-D boxes (n, 6) given as (lo…, hi…)."""
    lo, hi = boxes[:, None, :3], boxes[:, None, 3:]
    pick = np.array([[(k >> a) & 1 for a in range(3)] for k in range(8)], bool)[None]
    return np.where(pick, hi, lo)


def voxel_to_world_boxes(boxes: np.ndarray, affine: np.ndarray, space: str = "ras") -> np.ndarray:
    """Volume boxes (n, 6) in continuous voxel coordinates, ``(z0, y0, x0, z1, y1, x1)`` of the array's (d, h, w)
    axes, as world boxes (n, 6) ``(x0, y0, z0, x1, y1, z1)`` in mm (``space``: ``ras`` or ``lps``): the axis-aligned
    box around the voxel box's corners, through ``affine`` (voxel index (d, h, w) → RAS mm; a voxel's centre is its
    index + 0.5 in continuous coordinates). Exact for volumes whose axes lie along the world's."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 6)
    corners = _corners(boxes) - 0.5
    world = corners @ np.asarray(affine, np.float64)[:3, :3].T + np.asarray(affine, np.float64)[:3, 3]
    world = world * np.asarray(SPACES[space])
    return np.concatenate([world.min(1), world.max(1)], axis=1)


def world_to_voxel_boxes(boxes: np.ndarray, affine: np.ndarray, space: str = "ras") -> np.ndarray:
    """World boxes (n, 6) ``(x0, y0, z0, x1, y1, z1)`` in mm as the voxel boxes (n, 6) ``(z0, y0, x0, z1, y1, x1)``
    that hold them (the inverse of ``voxel_to_world_boxes``)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 6)
    corners = _corners(boxes) * np.asarray(SPACES[space])
    inv = np.linalg.inv(np.asarray(affine, np.float64))
    voxel = corners @ inv[:3, :3].T + inv[:3, 3] + 0.5
    return np.concatenate([voxel.min(1), voxel.max(1)], axis=1)


# -- one annotated image ------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    path: Path
    boxes: list[tuple[float, ...]]  # image axis order, pixels; world (x0, y0, z0, x1, y1, z1) where spaces says so
    labels: list[str]
    where: list[str]  # "row 7", "object 3" per box, for errors
    split: str = ""
    spaces: list[str] = field(default_factory=list)  # per box: "" (pixels) or a key of SPACES


def check_box(box: tuple[float, ...], shape: tuple[int, ...], where: str) -> str | None:
    """Why a box (image axis order, pixels) does not fit an image of spatial ``shape``, or None when it does."""
    dims = len(shape)
    names = ("z", "y", "x")[-dims:]
    lo, hi = box[:dims], box[dims:]
    for axis, (a, b, n, name) in enumerate(zip(lo, hi, shape, names, strict=True)):
        if not (np.isfinite(a) and np.isfinite(b)):
            return f"{where}: {name} coordinates are not numbers"
        if b < a:
            return f"{where}: inverted box ({name}0 = {a:g} > {name}1 = {b:g})"
        if b == a:
            return f"{where}: zero-size box ({name}0 = {name}1 = {a:g})"
        if a < 0 or b > n:
            return f"{where}: box outside the image ({name} {a:g}…{b:g}, the image spans 0…{n} on axis {axis})"
    return None


def _build(entries: list[_Entry], source: str, *, window: str | None, skip_bad: bool,
           label_names: list[str] | None = None) -> BoxSet:
    from lepton.data.readers.io import read_image
    from lepton.data.readers.masks import is_volume

    names = label_names or sorted({lab for e in entries for lab in e.labels})
    index = {n: k for k, n in enumerate(names)}
    images, boxes, classes, splits, kept, bad, bad_boxes = [], [], [], [], [], [], []
    for e in entries:
        try:
            volume = is_volume(e.path)
            frames = read_image(e.path, window=window, slices="volume" if volume else "middle")
        except DataError as exc:
            bad.append((str(e.path), str(exc)))
            continue
        if len(frames) != 1:
            bad.append((str(e.path), f"holds {len(frames)} frames; a detection image is one image or volume"))
            continue
        pixels = frames[0].pixels
        shape = tuple(pixels.shape[1:])
        good_boxes, good_classes = [], []
        spaces = e.spaces or [""] * len(e.boxes)
        for box, label, where, space in zip(e.boxes, e.labels, e.where, spaces, strict=True):
            if space:
                box, why = _from_world(box, space, frames[0].affine, len(shape), where)
                if why is not None:
                    bad_boxes.append(f"{e.path}: {why}")
                    continue
            if len(box) != 2 * len(shape):
                why = (f"{where}: a {len(box) // 2}-D box on a {len(shape)}-D image"
                       + (" (give z0,z1 for volumes)" if len(shape) == 3 else " (drop z0,z1 for 2-D images)"))
            else:
                why = check_box(box, shape, where)
            if why is not None:
                bad_boxes.append(f"{e.path}: {why}")
                continue
            good_boxes.append(box)
            good_classes.append(index[label])
        images.append(pixels)
        boxes.append(np.asarray(good_boxes, np.float32).reshape(-1, 2 * len(shape)))
        classes.append(np.asarray(good_classes, np.int64))
        splits.append(e.split)
        kept.append(str(e.path))
    if bad_boxes:
        listing = "\n".join(f"  {line}" for line in bad_boxes[:50])
        more = f"\n  … and {len(bad_boxes) - 50} more" if len(bad_boxes) > 50 else ""
        if not skip_bad:
            raise DataError(f"{source}: {len(bad_boxes)} bad box(es):\n{listing}{more}\n{BOX_FIX[0].upper()}"
                            f"{BOX_FIX[1:]}, or pass --skip-bad to drop them with a warning.")
        log.warning("%s: dropping %d bad box(es):\n%s%s", source, len(bad_boxes), listing, more)
    report_bad(source, bad, skip_bad)
    groups = np.array([hashlib.sha256(p.encode()).hexdigest()[:16] for p in kept], dtype=object)
    data = BoxSet(images, boxes, classes, names, np.array(splits, dtype=object), groups, kept, source,
                  bad_files=bad)
    return data


def _from_world(box: tuple[float, ...], space: str, affine: np.ndarray | None, dims: int,
                where: str) -> tuple[tuple[float, ...], str | None]:
    """A world box ``(x0, y0, z0, x1, y1, z1)`` as the voxel box holding it, or why it cannot be."""
    if dims != 3 or affine is None:
        return box, f"{where}: {space} (world) coordinates need a volume with a geometry (NIfTI or a DICOM series)"
    for name, a, b in zip("xyz", box[:3], box[3:], strict=True):
        if not b > a:
            return box, f"{where}: world box with {name}1 ≤ {name}0 ({a:g} ≥ {b:g} mm)"
    voxel = world_to_voxel_boxes(np.asarray(box), affine, space)[0]
    return tuple(float(v) for v in np.round(voxel, 4)), None


# -- formats --------------------------------------------------------------------------------------------------
def _number(value: str, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {value!r} is not a number; {BOX_FIX}") from None


def read_box_csv(path: Path) -> list[_Entry]:
    """Rows ``path,x0,y0,x1,y1[,z0,z1][,label][,split]`` (or ``xmin,ymin,xmax,ymax``); one row per box, a row with
    empty coordinates for an image without findings. Paths are relative to the CSV's folder."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable UTF-8 CSV file ({exc})") from exc
    if not rows:
        raise DataError(f"{path}: no rows")
    header = {h.strip().lower(): h for h in rows[0]}
    keys = next((k for k in (("x0", "y0", "x1", "y1"), ("xmin", "ymin", "xmax", "ymax"))
                 if all(c in header for c in k)), None)
    if keys is None or "path" not in header:
        raise DataError(f"{path}: a box CSV needs the columns path,x0,y0,x1,y1 (label, z0,z1 and split optional)")
    zkeys = next((k for k in (("z0", "z1"), ("zmin", "zmax")) if all(c in header for c in k)), None)
    entries: dict[str, _Entry] = {}
    for n, row in enumerate(rows, start=2):
        def cell(key: str, row=row) -> str:
            return (row.get(header[key]) or "").strip() if key in header else ""

        where = f"{path.name} row {n}"
        ref = cell("path")
        if not ref:
            raise DataError(f"{where}: empty path")
        target = Path(ref) if Path(ref).is_absolute() else path.parent / ref
        entry = entries.setdefault(str(target), _Entry(target, [], [], [], cell("split").lower()))
        coords = [cell(k) for k in keys] + ([cell(k) for k in zkeys] if zkeys else [])
        if not any(coords):
            continue  # an image without findings
        if not all(coords[:4]):
            raise DataError(f"{where}: some box coordinates are empty; give all of {', '.join(keys)} or none "
                            "(an image without findings)")
        x0, y0, x1, y1 = (_number(v, where) for v in coords[:4])
        space = cell("space").lower()
        if space in ("pixel", "voxel"):
            space = ""
        if space and space not in SPACES:
            raise DataError(f"{where}: space {space!r} is not one of voxel, {', '.join(SPACES)} (world mm)")
        if zkeys and all(coords[4:]):
            z0, z1 = (_number(v, where) for v in coords[4:])
            box: tuple[float, ...] = (x0, y0, z0, x1, y1, z1) if space else (z0, y0, x0, z1, y1, x1)
        elif space:
            raise DataError(f"{where}: world ({space}) boxes are 3-D; give z0,z1 in mm too")
        else:
            box = (y0, x0, y1, x1)
        entry.spaces.append(space)
        entry.boxes.append(box)
        entry.labels.append(cell("label") or DEFAULT_LABEL)
        entry.where.append(f"{path.name} row {n}")
    return list(entries.values())


def read_coco(path: Path) -> tuple[list[_Entry], list[str]]:
    """COCO detection JSON: ``images`` (``id``, ``file_name``), ``annotations`` (``image_id``, ``bbox`` as
    ``[x, y, w, h]``, ``category_id``) and ``categories``; images without annotations are negatives. File names are
    relative to the JSON's folder (or its ``images/`` sub-folder)."""
    from lepton.data.index.layout import _read_json

    spec = _read_json(path)
    if not isinstance(spec, dict) or not {"images", "annotations", "categories"} <= set(spec):
        raise DataError(f"{path}: COCO annotations need images, annotations and categories")
    try:
        cats = {int(c["id"]): str(c["name"]) for c in spec["categories"]}
        images = {int(im["id"]): str(im["file_name"]) for im in spec["images"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: every category needs id and name, every image id and file_name ({exc})") from exc
    entries: dict[int, _Entry] = {}
    for image_id, name in images.items():
        target = path.parent / name
        if not target.exists() and (path.parent / "images" / name).exists():
            target = path.parent / "images" / name
        entries[image_id] = _Entry(target, [], [], [])
    for n, ann in enumerate(spec["annotations"]):
        where = f"{path.name} annotation {n} (id {ann.get('id', '?') if isinstance(ann, dict) else '?'})"
        if not isinstance(ann, dict) or "bbox" not in ann or "image_id" not in ann:
            raise DataError(f"{where}: needs image_id and bbox")
        try:
            image_id, cat = int(ann["image_id"]), int(ann.get("category_id", -1))
        except (TypeError, ValueError):
            raise DataError(f"{where}: image_id and category_id must be integers") from None
        if image_id not in entries:
            raise DataError(f"{where}: image_id {image_id} is not in images")
        if cat not in cats:
            raise DataError(f"{where}: category_id {cat} is not in categories ({sorted(cats)})")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise DataError(f"{where}: bbox must be [x, y, width, height]")
        x, y, w, h = (_number(v, where) for v in bbox)
        entries[image_id].boxes.append((y, x, y + h, x + w))
        entries[image_id].labels.append(cats[cat])
        entries[image_id].where.append(f"annotation {n}")
    return list(entries.values()), [cats[k] for k in sorted(cats)]


def _voc_file(xml: Path, images: Path) -> _Entry:
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError) as exc:
        raise DataError(f"{xml}: not readable Pascal VOC XML ({exc})") from exc
    name = (root.findtext("filename") or "").strip()
    target = images / name if name else images / (xml.stem + ".jpg")
    entry = _Entry(target, [], [], [])
    for n, obj in enumerate(root.iter("object"), start=1):
        where = f"{xml.name} object {n}"
        box = obj.find("bndbox")
        label = (obj.findtext("name") or "").strip()
        if box is None or not label:
            raise DataError(f"{where}: needs a name and a bndbox")
        xmin, ymin, xmax, ymax = (_number(box.findtext(k) or "", f"{where} {k}")
                                  for k in ("xmin", "ymin", "xmax", "ymax"))
        entry.boxes.append((ymin - 1, xmin - 1, ymax, xmax))  # 1-based inclusive → continuous
        entry.labels.append(label)
        entry.where.append(f"object {n} ({label})")
    return entry


def read_voc(root: Path) -> list[_Entry]:
    """A Pascal VOC folder (``Annotations/*.xml`` beside ``JPEGImages/``, possibly one level down) or one XML file;
    ``ImageSets/Main/{train,val,test}.txt`` set the splits when present."""
    if root.is_file():
        return [_voc_file(root, root.parent)]
    base = next((b for b in (root, *sorted(p for p in root.iterdir() if p.is_dir()))
                 if (b / "Annotations").is_dir()), None)
    if base is None:
        raise DataError(f"{root}: no Annotations/ folder of Pascal VOC XML files")
    images = base / "JPEGImages" if (base / "JPEGImages").is_dir() else base / "Annotations"
    split_of: dict[str, str] = {}
    for split in ("train", "val", "test"):
        listing = base / "ImageSets" / "Main" / f"{split}.txt"
        if listing.is_file():
            for line in listing.read_text(encoding="utf-8").split():
                split_of.setdefault(line.strip(), split)
    entries = []
    for xml in sorted((base / "Annotations").glob("*.xml")):
        entry = _voc_file(xml, images)
        entry.split = split_of.get(xml.stem, "") if split_of else ""
        entries.append(entry)
    if split_of and any(not e.split for e in entries):
        missing = [e.path.name for e in entries if not e.split][:3]
        raise DataError(f"{base}/ImageSets/Main lists splits but not {', '.join(missing)}…; list every image in "
                        "train.txt, val.txt or test.txt, or remove the lists")
    return entries


def load_boxes(source: str | Path, *, window: str | None = None, skip_bad: bool = False,
               validate: bool = True) -> BoxSet:
    """A box-annotated data set from a COCO JSON (or a folder holding one), a Pascal VOC folder or XML file, or a box
    CSV manifest (``lepton.data.index.layout`` tells them apart)."""
    from lepton.data.index.layout import detect_layout

    path = Path(source).expanduser()
    layout = detect_layout(path)
    labels = None
    if layout.name == "coco":
        file = path if path.is_file() else next(p for p in sorted(path.glob("*.json"))
                                                if "annotations" in json.loads(p.read_text(encoding="utf-8")))
        entries, labels = read_coco(file)
    elif layout.name == "voc":
        entries = read_voc(path)
    elif layout.name == "box-manifest":
        entries = read_box_csv(path)
    else:
        raise DataError(f"{source} holds {layout.evidence}, not box annotations; give a COCO JSON, a Pascal VOC "
                        "folder or a CSV with path,x0,y0,x1,y1[,label] columns")
    data = _build(entries, str(source), window=window, skip_bad=skip_bad, label_names=labels)
    return data.validate() if validate else data
