"""Image folders: one sub-folder per class, optionally under train/val/test folders."""

from __future__ import annotations

from pathlib import Path

from lepton.data.index.dataset import SPLITS, ImageSet, from_files
from lepton.errors import DataError


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and _visible(p)
                  and all(_visible(q) for q in p.relative_to(folder).parents if q != Path(".")))


def read_folder(
    root: Path, *, window: str | None = None, slices: str = "middle", skip_bad: bool = False,
    steps: list[dict] | None = None,
) -> ImageSet:
    """Read ``root/<class>/*`` or ``root/<split>/<class>/*`` (PNG, JPEG, BMP, TIFF, DICOM, NIfTI, NPY)."""
    records, label_names = folder_records(root)
    return from_files(str(root), records, label_names, window=window, slices=slices, skip_bad=skip_bad,
                      steps=steps)


def folder_records(root: Path) -> tuple[list[tuple[Path, int, str, None]], list[str]]:
    """The (path, label, split, patient) records of an image folder and its class names, no file read."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    if not subdirs:
        raise DataError(
            f"{root}: expected one sub-folder per class (e.g. {root}/normal, {root}/pneumonia), "
            "or a CSV manifest"
        )
    split_layout = {p.name for p in subdirs} <= set(SPLITS)
    layout = [(p.name, p) for p in subdirs] if split_layout else [("", root)]
    class_names: set[str] = set()
    for _split, base in layout:
        class_names |= {p.name for p in base.iterdir() if p.is_dir() and _visible(p)}
    label_names = sorted(class_names)
    if split_layout and not label_names:
        raise DataError(f"{root}: split folders hold no class sub-folders")
    records = []
    for split, base in layout:
        for label, name in enumerate(label_names):
            folder = base / name
            files = _files(folder) if folder.is_dir() else []
            if not files and split in ("", "train"):
                raise DataError(f"{folder}: class folder '{name}' has no files")
            records.extend((f, label, split, None) for f in files)
    return records, label_names
