"""Corrected labels brought back: checked against the run and the labels already given, then recorded as a round.

The file is the ``suggestions.csv`` that ``lepton label suggest`` wrote, corrected (or any CSV with the same
columns): ``path`` (the image: a file, a DICOM series folder, or ``file.npz#i``) and ``label`` (a class name of the
run) for classifiers, or ``mask`` (a label map: NIfTI, PNG/TIFF or DICOM SEG; or a GeoJSON file of polygons, as
QuPath exports them) for segmentation — ``column`` picks another column, such as the ``geojson`` one. A COCO JSON file
(``preannotations.coco.json``, corrected) is read directly: each image's polygons, RLE masks or boxes rasterised onto
the image it names (``lepton.label.shapes``). For a detection run the file is a corrected box CSV or COCO JSON
(``preannotations.csv`` / ``preannotations.coco.json``; ``lepton.label.boxes``). Nothing is recorded
unless every row passes: the label is one of the run's (mask values within its classes, and the names of a
``labels.json`` beside the mask equal to the run's), a mask lies on its image's grid (shape, spacing, orientation,
origin), and no case already labelled — in the run's data or an earlier round — gets a different label without
``overwrite``. Every refusal names the file, the row and the fix.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from lepton.data.readers.unlabelled import pixel_hash
from lepton.errors import DataError
from lepton.label.rounds import open_labels
from lepton.runs import Run, load_run

MAX_PROBLEMS = 20


def read_case(text: str, base: Path, slices: str = "middle", window: str | None = None,
              steps: list[dict] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The pixels (in [0, 1]) and affine of a case named as ``suggest`` names them: a file or series folder
    (relative to ``base``), or ``file.npz#i``."""
    from lepton.data.readers.unlabelled import load_unlabelled

    head, sep, index = text.rpartition("#")
    if sep and head.lower().endswith(".npz") and index.isdigit():
        path = Path(head) if Path(head).is_absolute() else base / head
        pool = load_unlabelled(path)
        if int(index) >= len(pool):
            raise DataError(f"{path}: has {len(pool)} images; there is no #{index}")
        return pool.read(int(index))
    from lepton.data.readers.io import read_image
    from lepton.data.readers.masks import is_volume

    path = Path(text) if Path(text).is_absolute() else base / text
    frames = read_image(path, window=window, slices="volume" if slices == "volume" or is_volume(path) else slices,
                        steps=steps)
    if len(frames) != 1:
        raise DataError(f"{path}: holds {len(frames)} frames; a case is one image or volume")
    return frames[0].pixels, frames[0].affine


def import_labels(run: str | Path | Run, file: str | Path, labels: str | Path, *, round_no: int | None = None,
                  overwrite: bool = False, column: str | None = None) -> dict[str, Any]:
    """Check the corrected labels in ``file`` against ``run`` and record them in the labelling folder ``labels`` as
    round ``round_no`` (default: the next). Returns the round's record with ``added``, ``unchanged`` and
    ``replaced`` counts. Raises DataError listing every refused row and its fix; nothing is recorded then.

    >>> import_labels("runs/cxr", "suggestions/suggestions.csv", "labelling")   # doctest: +SKIP
    """
    from lepton.label.boxes import box_cases, reads_boxes
    from lepton.label.suggest import labelled_set

    run = run if isinstance(run, Run) else load_run(run)
    file = Path(file)
    masks = run.task.annotation == "mask"  # label maps; else class names (boxes: read by the detection readers)
    column = column or ("mask" if masks else "label")
    built: dict[int, Any] = {}
    boxes = reads_boxes(run)
    if boxes:  # a box CSV or COCO file, read by the detection readers
        rows = []
    elif masks and file.suffix.lower() == ".json":  # a COCO file: its images and their shapes
        from lepton.label.shapes import read_coco

        rows = []
        for n, (image_id, name, _, build) in enumerate(read_coco(file, run.label_names), start=1):
            rows.append((n, {"path": name, "case": name, column: f"{file}#image {image_id}"}))
            built[n] = build
    else:
        rows = _rows(file, column)
    known = open_labels(labels)
    _, data = labelled_set(run, None)
    hashes = [pixel_hash(image) for image in data.images]
    own = dict.fromkeys(hashes, "(the run's own boxes)") if boxes else \
        dict.fromkeys(hashes, "(the run's own mask)") if masks else \
        {h: run.label_names[int(y)] for h, y in zip(hashes, data.labels, strict=True)}
    spec = run.preprocessing
    cases, problems = box_cases(run, file) if boxes else ([], [])
    for line, row in rows:
        where = f"{file}: line {line} ({row['path']})"
        try:
            pixels, affine = read_case(row["path"], file.parent, spec.slices, spec.window, spec.steps or None)
        except DataError as exc:
            problems.append(f"{where}: the image cannot be read ({exc}); fix the path column")
            continue
        digest = pixel_hash(pixels)
        if masks:
            label, problem = _check_mask(row[column], file.parent, pixels, affine, run.label_names, where,
                                         built.get(line))
        else:
            label = row[column]
            problem = None if label in run.label_names else (
                f"{where}: label {label!r} is not one of the run's labels ({', '.join(run.label_names)}); "
                "correct the label column")
        if problem:
            problems.append(problem)
            continue
        cases.append((where, row.get("case") or row["path"], digest, label))
    accepted, unchanged, replaced = [], 0, 0
    for where, case, digest, label in cases:
        before = known.rows.get(digest, {}).get("label") or own.get(digest)
        if before is not None and before == label:
            unchanged += 1
            continue
        if before is not None and not overwrite:
            origin = (f"in round {known.rows[digest]['round']}" if digest in known.rows
                      else f"in the run's data ({run.config.data})")
            problems.append(f"{where}: this case was already labelled {before!r} {origin}; give --overwrite to "
                            "replace that label, or drop the row")
            continue
        replaced += before is not None
        accepted.append({"case": case, "sha256": digest, "label": label})
    if problems:
        more = f"\n  (+{len(problems) - MAX_PROBLEMS} more)" if len(problems) > MAX_PROBLEMS else ""
        raise DataError(f"{file}: {len(problems)} row(s) refused, nothing recorded:\n  "
                        + "\n  ".join(problems[:MAX_PROBLEMS]) + more)
    round_no = round_no or known.next_round
    record = known.add_round(accepted, str(file), round_no) if accepted else {"round": round_no, "cases": 0}
    return {**record, "added": len(accepted) - replaced, "unchanged": unchanged, "replaced": replaced}


def _rows(file: Path, column: str) -> list[tuple[int, dict[str, str]]]:
    try:
        with open(file, newline="", encoding="utf-8-sig") as fh:
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in csv.DictReader(fh)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{file}: not a readable CSV ({exc})") from exc
    if not rows or "path" not in rows[0] or column not in rows[0]:
        raise DataError(f"{file}: needs a header with path and {column} columns and at least one row (the "
                        "suggestions.csv of lepton label suggest, corrected)")
    empty = [n for n, r in enumerate(rows, start=2) if not r["path"] or not r[column]]
    if empty:
        raise DataError(f"{file}: line {empty[0]}: empty path or {column}; fill it or drop the row")
    return list(enumerate(rows, start=2))


def _check_mask(text: str, base: Path, pixels: np.ndarray, affine: np.ndarray | None, names: list[str],
                where: str, build=None) -> tuple[str, str | None]:
    """A mask's identity (its content hash) or the reason it is refused. ``build``: a COCO image's shapes, drawn onto
    the image's grid; a ``.geojson`` file's polygons are drawn the same way."""
    from lepton.data.readers.masks import check_geometry, read_mask

    path = Path(text) if Path(text).is_absolute() else base / text
    try:
        if build is not None or path.suffix.lower() == ".geojson":
            from lepton.label.shapes import read_geojson

            grid = tuple(pixels.shape[1:])
            mask = build(grid) if build is not None else read_geojson(path, grid, names)
        else:
            mask, mask_affine = read_mask(path)
            check_geometry(pixels, affine, mask, mask_affine, str(path))
    except DataError as exc:
        return "", f"{where}: {exc}"
    values = sorted(int(v) for v in np.unique(mask))
    unknown = [v for v in values if v >= len(names)]
    if unknown:
        return "", (f"{where}: {path} holds label value(s) {unknown}; the run's labels are "
                    f"{', '.join(f'{k} {n}' for k, n in enumerate(names))}: relabel the mask")
    sidecar = path.parent / "labels.json"
    if sidecar.is_file():
        try:
            given = json.loads(sidecar.read_text())
            given = [given[str(k)] for k in range(len(given))] if isinstance(given, dict) else list(given)
        except (ValueError, KeyError, TypeError) as exc:
            return "", f"{where}: {sidecar} is unreadable ({exc}); fix it or remove it"
        if given[:len(names)] != names or len(given) > len(names):
            return "", (f"{where}: {sidecar} names the labels {given}; the run's are {names}: rename them to the "
                        "run's or train a run with these labels")
    return "mask:" + hashlib.sha256(np.ascontiguousarray(mask).tobytes()).hexdigest()[:16], None
