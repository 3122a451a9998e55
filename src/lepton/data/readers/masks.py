"""Image + mask pairs for segmentation: Decathlon folders, paired folders and CSV manifests.

Images are read by the ordinary readers (volumes whole, in network order with their affine); masks are label maps
of class indices (0 = background) as PNG/TIFF/BMP, NIfTI or DICOM SEG. An image and its mask must agree in shape
and — for volumes — in voxel geometry (spacing, orientation, position): a mismatch is an error naming the case.
Volume preprocessing steps (``lepton.data.transforms.pipeline``) move image and mask together (nearest neighbour for
masks).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lepton.data.base import pseudonymize
from lepton.data.index.dataset import SPLITS, report_bad
from lepton.errors import DataError

log = logging.getLogger("lepton.data")

#: Most classes a label map may hold (background included).
MAX_CLASSES = 64
#: Folder names of paired layouts: images beside masks.
IMAGE_DIRS = ("images", "imagesTr")
MASK_DIRS = ("masks", "labels", "labelsTr")


@dataclass
class MaskSet:
    """Images with their label maps, in memory.

    ``images[i]`` is float32 (C, H, W) or (C, D, H, W) in [0, 1]; ``masks[i]`` uint8 (1, …) of class indices on the
    same grid; ``affines[i]`` maps a volume's voxel (d, h, w) to RAS mm (None for 2-D images). ``label_names[0]`` is
    the background. ``labels`` is a per-case stratum for splitting (1 when the case has any foreground).
    """

    images: list[np.ndarray]
    masks: list[np.ndarray]
    affines: list[np.ndarray | None]
    label_names: list[str]
    splits: np.ndarray
    groups: np.ndarray
    names: list[str]
    modalities: list[str]
    source: str
    has_patient_ids: bool = False
    bad_files: list[tuple[str, str]] = field(default_factory=list)
    #: The hashes of the decoded cases when the images are a stored copy of them (``CaseStore.to_memory``: uint16
    #: steps, within 7.7e-6), so that splits, fingerprints and leakage checks key on the source's decoding.
    known_content_hashes: list[str] | None = None
    known_image_hashes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> np.ndarray:
        return np.array([int(m.any()) for m in self.masks], dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Each image's shape (C, …)."""
        return [tuple(np.shape(im)) for im in self.images]

    @property
    def spatial_dims(self) -> int:
        return int(np.ndim(self.images[0])) - 1 if self.images else 2

    def subset(self, mask: np.ndarray) -> MaskSet:
        idx = np.flatnonzero(mask)
        known = {k: None if v is None else [v[i] for i in idx]
                 for k, v in (("known_content_hashes", self.known_content_hashes),
                              ("known_image_hashes", self.known_image_hashes))}
        return MaskSet([self.images[i] for i in idx], [self.masks[i] for i in idx], [self.affines[i] for i in idx],
                       self.label_names, self.splits[idx], self.groups[idx], [self.names[i] for i in idx],
                       [self.modalities[i] for i in idx], self.source, self.has_patient_ids, **known)

    def content_hashes(self) -> list[str]:
        """SHA-256 of each case's decoded image and mask."""
        if self.known_content_hashes is not None:
            return list(self.known_content_hashes)
        return [hashlib.sha256(str(im.shape).encode() + np.ascontiguousarray(im, np.float32).tobytes()
                               + np.ascontiguousarray(m, np.uint8).tobytes()).hexdigest()
                for im, m in zip(self.images, self.masks, strict=True)]

    def image_hashes(self) -> list[str]:
        """SHA-256 of each case's decoded image alone (the key an unlabelled pool is checked by)."""
        if self.known_image_hashes is not None:
            return list(self.known_image_hashes)
        return [hashlib.sha256(str(im.shape).encode() + np.ascontiguousarray(im, np.float32).tobytes()).hexdigest()
                for im in self.images]

    def missing_classes(self, chosen: np.ndarray) -> list[str]:
        """Foreground classes that no chosen case shows (a network cannot learn them)."""
        seen = np.zeros(self.num_classes, bool)
        for i in np.flatnonzero(chosen):
            seen[np.unique(self.masks[i])] = True
        return [self.label_names[k] for k in range(1, self.num_classes) if not seen[k]]

    def validate(self) -> MaskSet:
        check_cases(self.source, len(self), self.label_names, {np.ndim(im) for im in self.images},
                    self.missing_classes(np.ones(len(self), bool)), self.splits)
        return self


def check_cases(source: str, n: int, label_names: list[str], ndims: set[int], missing: list[str],
                splits: np.ndarray) -> None:
    """Raise DataError for no cases, fewer than two labels, mixed 2-D and 3-D cases, a class no mask holds or an
    unknown split name (for in-memory and cached cases alike)."""
    if not n:
        raise DataError(f"{source}: no image and mask pairs were found")
    if len(label_names) < 2:
        raise DataError(f"{source}: a segmentation needs a background and at least one class")
    if len(ndims) > 1:
        raise DataError(f"{source}: mixes 2-D images and volumes")
    if missing:
        raise DataError(f"{source}: no mask holds class(es) {', '.join(missing)}")
    bad_splits = sorted(set(splits.tolist()) - {"", *SPLITS})
    if bad_splits:
        raise DataError(f"{source}: unknown split name(s) {bad_splits}; use train, val, test")


def read_mask(path: str | Path, label: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A label map file as uint8 (1, H, W) or (1, D, H, W) class indices, with the affine of a volume (network
    order, as the volume readers give images) or None for 2-D. PNG/TIFF/BMP, NIfTI, or DICOM SEG (highdicom)."""
    from lepton.data.readers.io import sniff_format

    path = Path(path)
    label = label or str(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise DataError(f"{label}: mask file missing or empty")
    fmt = sniff_format(path)
    if fmt == "nifti":
        return _nifti_mask(path, label)
    if fmt == "dicom":
        from lepton.data.readers.dicomseg import read_seg

        return read_seg(path, label)
    if fmt in ("png", "tiff", "bmp"):
        return _raster_mask(path, label), None
    raise DataError(f"{label}: a mask must be a PNG, TIFF or BMP label image, a NIfTI label map or a DICOM SEG "
                    f"(found {fmt or 'unrecognised content'}); JPEG is lossy and cannot hold labels")


def _as_labels(data: np.ndarray, label: str) -> np.ndarray:
    if data.size == 0 or not np.isfinite(data).all():
        raise DataError(f"{label}: the mask is empty or holds NaN or infinite values")
    if (data < 0).any() or not np.array_equal(data, np.round(data)):
        raise DataError(f"{label}: mask values must be whole class indices 0, 1, 2, … (found "
                        f"{float(data.min()):g}..{float(data.max()):g} with fractions); save label maps, "
                        "not probabilities")
    if data.max() >= MAX_CLASSES:
        raise DataError(f"{label}: class index {int(data.max())} is over the limit of {MAX_CLASSES - 1}")
    return data.astype(np.uint8)


def _raster_mask(path: Path, label: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    from lepton.data.base import MAX_PIXELS

    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise DataError(f"{label}: {img.width}x{img.height} is over the limit of {MAX_PIXELS} pixels")
            if img.mode in ("RGB", "RGBA"):
                rgb = np.asarray(img.convert("RGB"))
                if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                    raise DataError(f"{label}: a colour mask is ambiguous; save class indices as a grey-level or "
                                    "palette PNG")
                data = rgb[..., 0]
            else:  # P (palette indices), L, I, 1
                data = np.asarray(img if img.mode != "1" else img.convert("L"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{label}: unreadable mask image ({exc})") from exc
    data = np.asarray(data, dtype=np.float64)
    if set(np.unique(data).tolist()) <= {0.0, 255.0}:  # a binary mask saved as black and white
        data = data / 255.0
    return _as_labels(data, label)[None]


def _nifti_mask(path: Path, label: str) -> tuple[np.ndarray, np.ndarray | None]:
    import nibabel as nib

    from lepton.data.readers.nifti import read_nifti_volume
    from lepton.data.readers.volume import network_affine, network_order

    try:
        shape = nib.load(str(path)).shape
    except Exception as exc:
        raise DataError(f"{label}: corrupt or unreadable NIfTI file ({exc})") from exc
    if len(shape) == 2:
        data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
        return _as_labels(np.flipud(data.T), label)[None].copy(), None
    volume = read_nifti_volume(path, label=label)
    data = _as_labels(volume.data, label)
    return network_order(data)[None], network_affine(volume.affine, volume.shape)


def check_geometry(image: np.ndarray, image_affine: np.ndarray | None, mask: np.ndarray,
                   mask_affine: np.ndarray | None, case: str) -> None:
    """Raise DataError naming ``case`` unless the image and mask share their grid (shape, spacing, orientation and
    position within half a voxel)."""
    if image.shape[1:] != mask.shape[1:]:
        raise DataError(f"{case}: image and mask shapes differ ({'x'.join(map(str, image.shape[1:]))} against "
                        f"{'x'.join(map(str, mask.shape[1:]))}); the mask must be drawn on the image's grid")
    if image_affine is None or mask_affine is None:
        return
    import nibabel as nib

    spacing = np.linalg.norm(image_affine[:3, :3], axis=0)
    mask_spacing = np.linalg.norm(mask_affine[:3, :3], axis=0)
    problems = []
    if not np.allclose(spacing, mask_spacing, rtol=1e-3, atol=1e-3):
        problems.append(f"spacing {np.round(spacing, 3).tolist()} against {np.round(mask_spacing, 3).tolist()} mm")
    if nib.aff2axcodes(image_affine) != nib.aff2axcodes(mask_affine):
        problems.append(f"orientation {''.join(nib.aff2axcodes(image_affine))} against "
                        f"{''.join(nib.aff2axcodes(mask_affine))}")
    shift = float(np.linalg.norm(image_affine[:3, 3] - mask_affine[:3, 3]))
    if not problems and shift > 0.5 * spacing.min():
        problems.append(f"origins {shift:.2f} mm apart")
    if problems:
        raise DataError(f"{case}: image and mask geometry differ ({'; '.join(problems)}); resample the mask onto "
                        "the image's grid")


def read_pair(image_path: Path, mask_path: Path, *, window: str | None, steps: list[dict] | None,
              case: str | None = None):
    """One case: (image, mask, affine, modality, patient) on one grid, after the steps."""
    from lepton.data.readers.io import read_image
    from lepton.data.transforms.pipeline import apply_steps

    case = case or str(image_path)
    frames = read_image(image_path, window=window, slices="volume" if is_volume(image_path) else "middle")
    if len(frames) != 1:
        raise DataError(f"{case}: the image holds {len(frames)} frames; give one image per mask")
    frame = frames[0]
    mask, mask_affine = read_mask(mask_path)
    check_geometry(frame.pixels, frame.affine, mask, mask_affine, case)
    pixels, affine = frame.pixels, frame.affine
    if steps:
        pixels, affine, mask = apply_steps(pixels, affine, steps, case, mask=mask)
    return pixels, mask, affine, frame.modality, frame.patient


def is_volume(path: Path) -> bool:
    """Whether an image path holds a volume (a NIfTI of 3+ dimensions, a series folder, a 3-D array)."""
    if path.is_dir():
        return True
    from lepton.data.readers.io import sniff_format

    fmt = sniff_format(path)
    if fmt == "nifti":
        import nibabel as nib

        try:
            return len(nib.load(str(path)).shape) >= 3
        except Exception:
            return False
    if fmt == "npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False).ndim == 3
        except Exception:
            return False
    return False


def load_segmentation(source: str | Path, *, window: str | None = None, steps: list[dict] | None = None,
                      skip_bad: bool = False, validate: bool = True) -> MaskSet:
    """Image + mask pairs from a Decathlon folder (``dataset.json`` with ``imagesTr/``, ``labelsTr/``), a folder
    with ``images/`` and ``masks/`` (or ``labels/``) matched by file name, or a CSV manifest
    ``path,mask[,patient_id][,split]``. Label names come from ``dataset.json``, a ``labels.json`` beside the
    folders (``["background", "lesion"]``), or are numbered."""
    path, records, names = segmentation_records(source)
    images, masks, affines, splits, groups, case_names, modalities = [], [], [], [], [], [], []
    bad: list[tuple[str, str]] = []
    has_patient = False
    for image_path, mask_path, split, patient in records:
        try:
            pixels, mask, affine, modality, found_patient = read_pair(image_path, mask_path, window=window,
                                                                      steps=steps)
        except DataError as exc:
            bad.append((str(image_path), str(exc).removeprefix(f"{image_path}: ")))
            continue
        group = patient or found_patient
        has_patient = has_patient or group is not None
        images.append(pixels)
        masks.append(mask)
        affines.append(affine)
        splits.append(split)
        groups.append(group or f"file:{image_path}")
        case_names.append(str(image_path))
        modalities.append(modality)
    report_bad(str(path), bad, skip_bad)
    top = max((int(m.max()) for m in masks), default=0)
    if names is None:
        names = ["background", *[f"class {k}" for k in range(1, top + 1)]] if top > 1 else ["background", "foreground"]
    if top >= len(names):
        raise DataError(f"{path}: masks hold class {top} but only {len(names)} label names are given "
                        f"({', '.join(names)})")
    data = MaskSet(images, masks, affines, names, np.asarray(splits, dtype=object), np.asarray(groups, dtype=object),
                   case_names, modalities, str(path), has_patient, bad)
    return data.validate() if validate else data


def segmentation_records(source: str | Path) -> tuple[Path, list[tuple[Path, Path, str, str | None]],
                                                      list[str] | None]:
    """The cases of a segmentation source without reading them: the source's path, ``(image, mask, split,
    patient pseudonym)`` per case, and the label names when the source gives them."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv"):
        records, names = _manifest(path)
    elif path.is_dir() and (path / "dataset.json").is_file():
        records, names = _decathlon(path)
    elif path.is_dir():
        records, names = _paired(path)
    else:
        raise DataError(f"{path}: a segmentation source is a Decathlon folder (dataset.json, imagesTr/, labelsTr/), a "
                        "folder with images/ and masks/, or a CSV manifest with path and mask columns")
    return path, records, names


def label_names(values: object, where: str) -> list[str]:
    """``{"0": "background", "1": "x"}`` or ``["background", "x"]`` as a list indexed by class."""
    if isinstance(values, dict):
        try:
            table = {int(k): str(v) for k, v in values.items()}
        except ValueError:
            raise DataError(f"{where}: label keys must be class indices 0, 1, …") from None
        if sorted(table) != list(range(len(table))):
            raise DataError(f"{where}: labels must be numbered 0..{len(table) - 1} without gaps")
        return [table[k] for k in range(len(table))]
    if isinstance(values, list) and all(isinstance(v, str) for v in values):
        return list(values)
    raise DataError(f"{where}: labels must be a list of names or a mapping from class index to name")


def _decathlon(root: Path):
    where = str(root / "dataset.json")
    try:
        spec = json.loads((root / "dataset.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{where}: unreadable ({exc})") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("training"), list) or "labels" not in spec:
        raise DataError(f"{where}: needs 'labels' and a 'training' list of {{image, label}} entries")
    names = label_names(spec["labels"], where)
    records = []
    for i, item in enumerate(spec["training"]):
        if not (isinstance(item, dict) and isinstance(item.get("image"), str) and isinstance(item.get("label"), str)):
            raise DataError(f"{where}: training[{i}] needs 'image' and 'label' paths")
        records.append((_inside(root, item["image"], where), _inside(root, item["label"], where), "", None))
    return records, names


def _inside(root: Path, relative: str, where: str) -> Path:
    """``relative`` under ``root``, refusing ``..`` and absolute paths that leave it (links inside are followed)."""
    import os

    path = Path(os.path.normpath(root.absolute() / relative))
    if Path(relative).is_absolute() or not path.is_relative_to(Path(os.path.normpath(root.absolute()))):
        raise DataError(f"{where}: {relative!r} points outside the data folder")
    return path


def stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".png", ".tif", ".tiff", ".bmp", ".dcm", ".npy", ".jpg", ".jpeg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _paired(root: Path):
    image_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), None)
    mask_dir = next((root / d for d in MASK_DIRS if (root / d).is_dir()), None)
    if image_dir is None or mask_dir is None:
        raise DataError(f"{root}: expected images/ and masks/ (or labels/) folders with files of matching names, a "
                        "dataset.json (Decathlon layout), or a CSV manifest")
    images = {stem(p): p for p in sorted(image_dir.iterdir()) if not p.name.startswith(".")}
    masks = {stem(p): p for p in sorted(mask_dir.iterdir()) if not p.name.startswith(".")}
    unmatched = sorted(set(images) ^ set(masks))
    if unmatched:
        raise DataError(f"{root}: {len(unmatched)} file(s) without a partner in {image_dir.name}/ and "
                        f"{mask_dir.name}/ (e.g. {unmatched[0]}); every image needs a mask of the same name")
    return [(images[k], masks[k], "", None) for k in sorted(images)], labels_json(root)


def _manifest(path: Path):
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(fh)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable UTF-8 CSV file ({exc})") from exc
    if not rows or not {"path", "mask"} <= set(rows[0]):
        raise DataError(f"{path}: a segmentation manifest needs a header path,mask[,patient_id][,split] and rows")
    base = path.parent
    records = []
    for line, row in enumerate(rows, start=2):
        if not row.get("path") or not row.get("mask"):
            raise DataError(f"{path}: line {line}: empty path or mask")
        split = row.get("split", "")
        if split and split not in SPLITS:
            raise DataError(f"{path}: line {line}: split {split!r} is not one of {', '.join(SPLITS)}")
        records.append((base / row["path"], base / row["mask"], split,
                        pseudonymize(row["patient_id"]) if row.get("patient_id") else None))
    return records, labels_json(base)


def labels_json(folder: Path) -> list[str] | None:
    """Label names from ``folder/labels.json`` when there is one."""
    path = folder / "labels.json"
    if not path.is_file():
        return None
    try:
        return label_names(json.loads(path.read_text()), str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from exc
