"""CSV manifests: ``path,label[,patient_id][,split][,series_uid]`` with a header row; ``path`` may also be a
DICOMweb source (``dicomweb+http://HOST/dicom-web?StudyInstanceUID=…&SeriesInstanceUID=…``) selecting one series."""

from __future__ import annotations

import csv
from pathlib import Path

from lepton.data.base import pseudonymize
from lepton.data.index.dataset import SPLITS, ImageSet, from_files
from lepton.data.readers.covariates import CovariateSchema, check_table
from lepton.errors import DataError

MAX_ROWS = 2_000_000


def read_rows(path: Path, max_rows: int = MAX_ROWS) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV file's header and rows, names and values stripped; at most ``max_rows`` rows, UTF-8 (a BOM allowed)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = []
            for i, row in enumerate(reader):
                if i >= max_rows:
                    raise DataError(f"{path}: more than {max_rows} rows")
                rows.append({(k or "").strip(): (v or "").strip() for k, v in row.items()})
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 CSV file ({exc})") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from exc
    return header, rows


def read_manifest(
    path: Path, *, window: str | None = None, slices: str = "middle", skip_bad: bool = False,
    steps: list[dict] | None = None, covariates: CovariateSchema | None = None,
) -> ImageSet:
    """Read the images a CSV manifest lists; relative paths are taken from the CSV's folder. ``covariates`` declares
    other columns as clinical covariates (``lepton.data.readers.covariates``), checked before any image is read and kept
    beside each image.

    ``path`` may name a folder of DICOM files; when it holds several series, ``series_uid`` picks one by its
    SeriesInstanceUID, or ``*`` takes each series as its own case (same label, split and patient).

    Patient ids are pseudonymised on read and used only to keep each patient in one split.
    """
    records, raw_labels, table = manifest_records(path, covariates)
    return from_files(str(path), records, raw_labels, window=window, slices=slices, skip_bad=skip_bad,
                      steps=steps, covariates=table)


def manifest_records(path: Path, covariates: CovariateSchema | None = None):
    """A manifest checked and listed without reading an image: its (path, label, split, patient, series) records,
    label names, and the covariate table (None without ``covariates``)."""
    header, rows = read_rows(path)
    missing = {"path", "label"} - set(header)
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(sorted(missing))}; the header must be "
            f"path,label[,patient_id][,split] (found: {', '.join(header) or 'no header'})"
        )
    if not rows:
        raise DataError(f"{path}: the manifest lists no images")
    problems = []
    for line, row in enumerate(rows, start=2):
        if not row.get("path"):
            problems.append(f"line {line}: empty path")
        if not row.get("label"):
            problems.append(f"line {line}: empty label")
        split = row.get("split", "")
        if split and split not in SPLITS:
            problems.append(f"line {line}: split {split!r} is not one of {', '.join(SPLITS)}")
    if "split" in header:
        filled = sum(bool(r.get("split")) for r in rows)
        if 0 < filled < len(rows):
            problems.append("the split column must be filled on every row or on none")
    if problems:
        raise DataError(f"{path}: invalid manifest:\n  " + "\n  ".join(problems[:50]))
    raw_labels = sorted({r["label"] for r in rows})
    if all(x.lstrip("-").isdigit() for x in raw_labels):
        raw_labels = sorted(raw_labels, key=int)
    table = check_table(covariates, header, rows, str(path)) if covariates is not None else None
    index = {name: i for i, name in enumerate(raw_labels)}
    records = [
        (
            _resolve(path, r["path"], line),
            index[r["label"]],
            r.get("split", ""),
            pseudonymize(r["patient_id"]) if r.get("patient_id") else None,
            r.get("series_uid") or None,
        )
        for line, r in enumerate(rows, start=2)
    ]
    return records, raw_labels, table


def _resolve(manifest: Path, text: str, line: int) -> Path:
    """A row's image: a path (relative to the CSV's folder), or a DICOMweb source selecting one series, fetched
    into the local cache (``lepton.hospital.dicomweb``)."""
    from lepton.hospital import dicomweb

    if dicomweb.is_source(text):
        folders = dicomweb.fetch(dicomweb.Source.parse(text))
        if len(folders) != 1:
            raise DataError(f"{manifest}: line {line}: the DICOMweb source selects {len(folders)} series; a row "
                            "takes one (add SeriesInstanceUID=… to the URL)")
        return folders[0]
    return (manifest.parent / text) if not Path(text).is_absolute() else Path(text)
