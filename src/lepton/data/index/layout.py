"""What a source is laid out as, and so which task it is for — read from names, headers and a few files.

``detect_layout`` looks at a source without decoding its images (a handful of files at most, to tell label maps from
images) and answers a ``Layout``: its name, the task it implies and the evidence, for ``lepton train`` and
``lepton data inspect`` to print. Layouts that look like a mistake — images and their label maps laid out as two
"classes", a single class, a class folder that is a data set of its own — are refused here with the fix, before
anything trains on them. Which registered task reads which layout is the tasks' business (``Task.layouts``).
"""

from __future__ import annotations

import csv
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lepton.errors import DataError

#: Folder names that hold images beside their label maps (``lepton.data.readers.masks`` reads these pairs).
IMAGE_LIKE = frozenset({"images", "imagestr", "imagests", "image", "img", "imgs", "volumes"})
MASK_LIKE = frozenset({"masks", "mask", "labels", "labelstr", "labelsts", "segmentations", "segmentation", "seg",
                       "segs", "gt", "groundtruth", "ground_truth", "annotations"})
#: Files that make a folder a data set of its own.
METADATA_FILES = ("dataset.json", "labels.json")
#: Whole-slide image formats (pyramidal TIFF variants, vendor formats).
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".qptiff", ".svslide")
#: Column sets of a box-annotation manifest.
BOX_COLUMNS = ({"x0", "y0", "x1", "y1"}, {"xmin", "ymin", "xmax", "ymax"})
#: A manifest whose first this-many paths are all videos or signal records is a clip manifest (the sequence task's).
CLIP_SAMPLE = 20
#: At most this many files are listed per folder while looking (the readers list them all later).
SCAN_LIMIT = 100_000
#: A label map holds whole numbers and at most this many distinct values.
LABEL_MAP_VALUES = 16
MASK_FIX = ("for segmentation put the images in images/ and the label maps, with the same file names, in masks/ "
            "(or give a Decathlon dataset.json, or a CSV with path,mask columns) and train with --task segmentation")


@dataclass(frozen=True)
class Layout:
    """A source's layout: ``name`` (e.g. ``decathlon``, ``class-folders``), the ``task`` it implies, ``evidence``
    to print, and the label names when they are known without decoding images."""

    name: str
    task: str
    evidence: str
    labels: list[str] = field(default_factory=list)
    cases: int | None = None

    def describe(self) -> str:
        """``task: segmentation — Decathlon layout (dataset.json), 208 cases, labels anterior, posterior``."""
        return f"task: {self.task} — {self.evidence}"


def detect_layout(source: str | Path) -> Layout:
    """The layout of a data source (a folder, a CSV manifest, an ``.npz``, ``medmnist:NAME``, a site manifest, an
    annotation file or a slide). Raises DataError, with the fix, for layouts that look like a mistake."""
    text = str(source)
    if text.startswith("medmnist:"):
        return Layout("medmnist", "classification", f"MedMNIST data set {text.split(':', 1)[1]}")
    path = Path(text).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return _folder(path)
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix == ".npz":
        return _npz(path)
    if suffix in (".csv", ".tsv"):
        return _manifest(path)
    if suffix == ".json":
        return _json_file(path)
    if suffix == ".xml":
        return Layout("voc", "detection", f"a Pascal VOC box annotation file ({path.name})")
    if suffix in SLIDE_SUFFIXES:
        return Layout("slides", "pathology", f"a whole-slide image ({path.name})")
    return Layout("file", "classification", f"a single file ({path.name})")


# -- files ------------------------------------------------------------------------------------------------------
def _npz(path: Path) -> Layout:
    try:
        with zipfile.ZipFile(path) as zf:
            members = set(zf.namelist())
            labels = None
            if "train_labels.npy" in members:
                with zf.open("train_labels.npy") as fh:
                    labels = np.lib.format.read_array(fh, allow_pickle=False)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    classes = len(np.unique(labels)) if labels is not None and labels.size else 0
    return Layout("medmnist", "classification",
                  f"MedMNIST-format arrays (.npz){f', {classes} classes' if classes else ''}")


def _manifest(path: Path) -> Layout:
    paths: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            header = [h.strip().lower() for h in next(reader, [])]
            at = header.index("path") if "path" in header else None
            rows = 0
            for row in reader:
                if any(cell.strip() for cell in row):
                    rows += 1
                    if at is not None and len(paths) < CLIP_SAMPLE and at < len(row):
                        paths.append(row[at].strip())
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable UTF-8 CSV file ({exc})") from exc
    columns = set(header)
    kinds = _clip_kinds(paths)
    if "label" in columns and kinds:
        return Layout("clip-manifest", "sequence", f"a CSV manifest of {' and '.join(kinds)} with a label column, "
                      f"{rows} clips", cases=rows)
    if "mask" in columns:
        return Layout("mask-manifest", "segmentation", f"a CSV manifest with a mask column, {rows} cases", cases=rows)
    if any(box <= columns for box in BOX_COLUMNS):
        return Layout("box-manifest", "detection", f"a CSV manifest of boxes ({', '.join(header)}), {rows} rows",
                      cases=rows)
    if "label" in columns:
        return Layout("label-manifest", "classification", f"a CSV manifest with a label column, {rows} images",
                      cases=rows)
    return Layout("manifest", "classification", f"a CSV manifest ({', '.join(header) or 'no header'})", cases=rows)


def _clip_kinds(paths: list[str]) -> list[str]:
    """What a manifest's first paths name when they are all sequences by their endings: videos, signal records."""
    from lepton.data.readers.video import VIDEO_SUFFIXES

    kinds = set()
    for text in paths:
        suffix = Path(text).suffix.lower()
        if suffix in VIDEO_SUFFIXES:
            kinds.add("videos")
        elif suffix == ".hea":
            kinds.add("WFDB signal records")
        else:
            return []
    return sorted(kinds, reverse=True)


def _json_file(path: Path) -> Layout:
    from lepton.data.index.partition import is_partition

    if is_partition(path):
        return Layout("partition", "classification", f"a site's share of a data set ({path.name})")
    spec = _read_json(path)
    if isinstance(spec, dict) and {"images", "annotations", "categories"} <= set(spec):
        return Layout("coco", "detection", f"COCO annotations ({path.name}, {len(spec['annotations'])} boxes)")
    if isinstance(spec, dict) and "training" in spec and "labels" in spec:
        raise DataError(f"{path}: this is a Decathlon dataset.json; point Lepton at its folder, {path.parent}")
    raise DataError(f"{path}: not a data source Lepton reads (a site manifest from `lepton data partition` or COCO "
                    "annotations)")


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable JSON ({exc})") from exc


# -- folders ----------------------------------------------------------------------------------------------------
def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and _visible(p))


def _stems(folder: Path) -> dict[str, Path]:
    from lepton.data.readers.masks import stem

    out = {}
    for i, p in enumerate(sorted(folder.iterdir())):
        if i >= SCAN_LIMIT:
            break
        if p.is_file() and _visible(p):
            out[stem(p)] = p
    return out


def _folder(root: Path) -> Layout:
    from lepton.data.index.dataset import SPLITS
    from lepton.data.readers.masks import IMAGE_DIRS, MASK_DIRS

    if (root / "dataset.json").is_file():
        return _decathlon(root)
    if (root / "manifest.csv").is_file():
        listed = _manifest(root / "manifest.csv")
        if listed.name == "clip-manifest":
            return listed
    names = {p.name for p in _subdirs(root)}
    image_dir = next((d for d in IMAGE_DIRS if d in names), None)
    mask_dir = next((d for d in MASK_DIRS if d in names), None)
    if image_dir and mask_dir:
        cases = len(_stems(root / image_dir))
        labels = _labels_json(root)
        return Layout("paired-folders", "segmentation",
                      f"paired {image_dir}/ and {mask_dir}/ folders, {cases} cases"
                      + (f", labels {', '.join(labels[1:])}" if labels else ""), labels, cases)
    detection = _box_folder(root)
    if detection is not None:
        return detection
    slides = _slide_files(root)
    if slides:
        return Layout("slides", "pathology", f"{len(slides)} whole-slide image(s) (e.g. {slides[0].name})")
    if not names:
        return Layout("files", "classification", "a folder of files without class sub-folders")
    split_layout = names <= set(SPLITS)
    bases = [root / s for s in sorted(names)] if split_layout else [root]
    classes: dict[str, list[Path]] = {}
    for base in bases:
        for sub in _subdirs(base):
            classes.setdefault(sub.name, []).append(sub)
    _refuse_traps(root, classes)
    counts = {name: sum(len(_stems(f)) for f in folders) for name, folders in classes.items()}
    where = f"{'/'.join(sorted(names))} split folders of " if split_layout else ""
    if _all_videos(classes):
        return Layout("video-folders", "sequence", f"{where}class folders of videos, {sum(counts.values())} "
                      f"videos, classes {', '.join(sorted(classes))}", sorted(classes), sum(counts.values()))
    return Layout("class-folders", "classification",
                  f"{where}class folders, {sum(counts.values())} images, classes {', '.join(sorted(classes))}",
                  sorted(classes), sum(counts.values()))


def _all_videos(classes: dict[str, list[Path]]) -> bool:
    """Whether every class folder's files (the first few of each) are video files."""
    from lepton.data.readers.video import VIDEO_SUFFIXES

    files = [p for folders in classes.values() for f in folders for p in list(_stems(f).values())[:CLIP_SAMPLE]]
    return bool(files) and all(p.suffix.lower() in VIDEO_SUFFIXES for p in files)


def _decathlon(root: Path) -> Layout:
    from lepton.data.readers.masks import label_names

    spec = _read_json(root / "dataset.json")
    where = str(root / "dataset.json")
    if not isinstance(spec, dict):
        raise DataError(f"{where}: needs 'labels' and a 'training' list of {{image, label}} entries")
    training = spec.get("training")
    if not isinstance(training, list) or "labels" not in spec:
        raise DataError(f"{where}: needs 'labels' and a 'training' list of {{image, label}} entries (a Decathlon "
                        "dataset.json); classification folders must not hold one")
    labels = label_names(spec["labels"], where)
    return Layout("decathlon", "segmentation",
                  f"Decathlon layout (dataset.json), {len(training)} cases, labels {', '.join(labels[1:])}",
                  labels, len(training))


def _labels_json(root: Path) -> list[str]:
    from lepton.data.readers.masks import labels_json

    return labels_json(root) or []


def _box_folder(root: Path) -> Layout | None:
    """Pascal VOC (``Annotations/*.xml``, possibly one level down as in BCCD) or COCO JSON beside the images."""
    for base in (root, *_subdirs(root)[:8]):
        ann = base / "Annotations"
        if ann.is_dir():
            xml = [p for p in ann.iterdir() if p.suffix.lower() == ".xml"]
            if xml:
                return Layout("voc", "detection", f"Pascal VOC box annotations ({len(xml)} files in {ann})")
    for candidate in sorted(root.glob("*.json"))[:8]:
        spec = _read_json(candidate)
        if isinstance(spec, dict) and {"images", "annotations", "categories"} <= set(spec):
            return Layout("coco", "detection", f"COCO annotations ({candidate.name})")
    return None


def _slide_files(root: Path) -> list[Path]:
    found = []
    for i, p in enumerate(root.rglob("*")):
        if i >= SCAN_LIMIT:
            break
        if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file():
            found.append(p)
    return found


def _refuse_traps(root: Path, classes: dict[str, list[Path]]) -> None:
    """Class folders that are really images and label maps, a single class, a class that is a data set itself."""
    for folders in classes.values():
        for folder in folders:
            held = [m for m in METADATA_FILES if (folder / m).is_file()]
            if held:
                raise DataError(f"{folder}: this class folder holds {held[0]}, so it is a data set of its own, not "
                                f"a class; point Lepton at {folder} itself")
    lowered = {name.lower(): name for name in classes}
    mask_like = sorted(lowered[n] for n in lowered if n in MASK_LIKE)
    image_like = sorted(lowered[n] for n in lowered if n in IMAGE_LIKE)
    if mask_like:
        raise DataError(f"{root}: the class folder(s) {', '.join(image_like + mask_like)} are named like images and "
                        f"their label maps, not classes; a classifier would learn to tell images from masks. "
                        f"{MASK_FIX[0].upper()}{MASK_FIX[1:]}")
    pair = _label_map_pair(classes)
    if pair is not None:
        images, masks, shared = pair
        raise DataError(f"{root}: class folders {images} and {masks} hold the same {shared} file names and {masks}/ "
                        f"holds label maps (a few whole-number values), so they are images and masks, not two "
                        f"classes; {MASK_FIX}")
    if len(classes) == 1:
        only = next(iter(classes))
        hint = f"; {MASK_FIX}" if only.lower() in IMAGE_LIKE else ""
        raise DataError(f"{root}: only one class folder ({only}); a classifier needs one sub-folder per class, "
                        f"e.g. {root}/normal and {root}/pneumonia{hint}")


def _label_map_pair(classes: dict[str, list[Path]]) -> tuple[str, str, int] | None:
    """Two class folders whose file names mostly match, one of them holding label maps: (images, masks, shared)."""
    stems = {name: set().union(*(_stems(f) for f in folders)) for name, folders in classes.items()}
    names = sorted(stems)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = stems[a] & stems[b]
            if not shared or len(shared) < 0.5 * min(len(stems[a]), len(stems[b])):
                continue
            sample = sorted(shared)[:3]
            for images, masks in ((a, b), (b, a)):
                files = [_find(classes[masks], s) for s in sample]
                if all(f is not None and looks_like_label_map(f) for f in files) and not all(
                        looks_like_label_map(_find(classes[images], s)) for s in sample):
                    return images, masks, len(shared)
    return None


def _find(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        hit = _stems(folder).get(stem)
        if hit is not None:
            return hit
    return None


def looks_like_label_map(path: Path | None) -> bool:
    """Whether a file decodes to whole numbers with at most ``LABEL_MAP_VALUES`` distinct values (a label map, not
    an image). Unreadable files and formats without a cheap raw read answer False."""
    if path is None:
        return False
    from lepton.data.readers.io import sniff_format

    fmt = sniff_format(path)
    try:
        if fmt in ("png", "tiff", "bmp"):
            from PIL import Image

            from lepton.data.base import MAX_PIXELS

            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    return False
                values = np.asarray(img)
        elif fmt == "nifti":
            import nibabel as nib

            values = np.asarray(nib.load(str(path)).dataobj)
        elif fmt == "npy":
            values = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            return False
    except Exception:  # the readers report unreadable files properly later
        return False
    if values.size == 0 or not np.issubdtype(values.dtype, np.number):
        return False
    distinct = np.unique(values)
    return len(distinct) <= LABEL_MAP_VALUES and bool(np.all(np.isfinite(distinct))) and bool(
        np.array_equal(distinct, np.round(distinct)))
