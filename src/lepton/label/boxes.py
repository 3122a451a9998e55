"""Active learning for detection runs: images ranked by how unsure the run is of their boxes, the run's boxes written
as pre-annotations that ``lepton.data.readers.boxes`` reads back, and corrected box files checked on import.

Strategies: ``entropy`` (``Detection.uncertainty``: the candidate box whose score lies nearest the decision threshold),
``tta`` (``Detection.disagreement``: how far the boxes move when the image is mirrored left-right) and ``random``;
``coreset`` ranks by a classifier's pooled features and is refused. 2-D images only.

Pre-annotations, the boxes above the run's threshold in pixels of the image as Lepton reads it: ``preannotations.csv``
(the box CSV: ``path,x0,y0,x1,y1,label,score``, a row without coordinates for an image without boxes) and
``preannotations.coco.json`` (COCO: ``bbox`` as ``[x, y, width, height]``, categories numbered from 1 in the run's
label order). Both name the images by absolute path, so a corrected file trains directly (``lepton train FILE``) and
is imported by ``lepton label import``.
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from lepton.data.readers.unlabelled import UnlabelledSet, pixel_hash
from lepton.errors import ConfigError, DataError
from lepton.runs import Run
from lepton.utils import atomic_write_json, atomic_write_text

STRATEGIES = ("entropy", "tta", "random")
CSV_FIELDS = ("path", "x0", "y0", "x1", "y1", "label", "score")


def reads_boxes(run: Run) -> bool:
    """Whether the run's task learns from box annotations (its layouts include the box CSV)."""
    return "box-manifest" in run.task.layouts


def suggest_boxes(run: Run, pool: UnlabelledSet, known: set[str], n: int, strategy: str, seed: int, out: Path,
                  batch_size: int = 64) -> tuple[list[dict[str, Any]], int]:
    """Rank the pool's unlabelled images for a detection run and write the ``n`` first's boxes to ``out``
    (``preannotations.csv``, ``preannotations.coco.json``); returns the suggestion rows and how many pool images were
    already labelled."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"a detection run ranks by {', '.join(STRATEGIES)}; not {strategy!r} (coreset needs a "
                          "classifier's pooled features)")
    if run.preprocessing.spatial_dims != 2:
        raise ConfigError("box pre-annotations are written for 2-D detection runs; this run detects in volumes")
    if not pool.paths:
        raise DataError(f"{pool.source}: box pre-annotations name image files; give a folder or a CSV of image "
                        "files, not an array file")
    keep: list[int] = []
    scores: list[np.ndarray] = []
    for _, idx, images in pool.unseen(known, batch_size):
        if strategy == "tta":  # each view alone: the run's own flip TTA would fuse them into one answer
            from lepton.runs import predict_outputs

            def detect(views: list[np.ndarray]) -> np.ndarray:
                return predict_outputs(run.model, run.preprocessing(views), run.task.activate, device=run.device)

            flipped = np.array(detect([np.ascontiguousarray(p[..., ::-1]) for p in images]), copy=True)
            flipped[..., 1], flipped[..., 3] = 1 - flipped[..., 3], 1 - flipped[..., 1].copy()  # x0, x1 mirrored back
            scores.append(run.task.disagreement(detect(images), flipped, run.info))
        else:
            scores.append(run.task.uncertainty(run.predict_proba(images), run.info))
        keep += idx
    if not keep:
        return [], len(pool)
    score = np.concatenate(scores)
    order = np.random.default_rng(seed).permutation(len(keep))[:n] if strategy == "random" \
        else np.argsort(-score, kind="stable")[:n]
    rows, boxes = [], []
    for start in range(0, len(order), batch_size):  # only the scores were kept: the chosen images detected again
        chosen = order[start:start + batch_size]
        images = [pool.read(keep[i])[0] for i in chosen]
        decided = run.task.decide(run.predict_proba(images), run.info)
        for i, pixels, kept in zip(chosen, images, decided, strict=True):
            path = str(pool.paths[keep[i]].resolve())
            found = pixel_boxes(kept, pixels.shape[1:], run.label_names)
            boxes.append((path, pixels.shape[1:], found))
            rows.append({"rank": len(rows) + 1, "case": pool.names[keep[i]], "path": path,
                         "score": round(float(score[i]), 6), "boxes": len(found)})
    atomic_write_text(out / "preannotations.csv", box_csv(boxes))
    atomic_write_json(out / "preannotations.coco.json", coco_boxes(boxes, run.label_names))
    return rows, len(pool) - len(keep)


def pixel_boxes(rows: np.ndarray, shape: tuple[int, ...], names: list[str]) -> list[dict[str, Any]]:
    """A 2-D image's decided rows (coordinates as fractions ``y0, x0, y1, x1``, score, class; -1: none) as boxes in
    pixels (``x0, y0, x1, y1``, clipped to the image, highest score first) with their label and score."""
    h, w = shape
    kept = rows[rows[:, -1] >= 0]
    out = []
    for r in kept[np.argsort(-kept[:, -2], kind="stable")]:
        y0, x0, y1, x1 = (round(float(v), 2) for v in np.clip(r[:4], 0, 1) * np.array([h, w, h, w]))
        if x1 > x0 and y1 > y0:
            out.append({"x0": x0, "y0": y0, "x1": x1, "y1": y1, "label": names[int(r[-1])],
                        "score": round(float(r[-2]), 4)})
    return out


def box_csv(cases: list[tuple[str, tuple[int, ...], list[dict[str, Any]]]]) -> str:
    """The box CSV ``lepton.data.readers.boxes.read_box_csv`` reads: a row per box, an empty-coordinate row per image
    without boxes."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for path, _, found in cases:
        writer.writerows([{"path": path, **box} for box in found] or [{"path": path}])
    return buf.getvalue()


def coco_boxes(cases: list[tuple[str, tuple[int, ...], list[dict[str, Any]]]], names: list[str]) -> dict[str, Any]:
    """A COCO detection document (``lepton.data.readers.boxes.read_coco`` reads it) of the cases' boxes."""
    images, annotations = [], []
    for image_id, (path, (h, w), found) in enumerate(cases, start=1):
        images.append({"id": image_id, "file_name": path, "height": int(h), "width": int(w)})
        for box in found:
            bw, bh = round(box["x1"] - box["x0"], 2), round(box["y1"] - box["y0"], 2)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": names.index(box["label"]) + 1,
                                "bbox": [box["x0"], box["y0"], bw, bh], "area": round(bw * bh, 2), "iscrowd": 0,
                                "score": box["score"]})
    return {"info": {"description": "Lepton pre-annotations (lepton label suggest)"}, "images": images,
            "annotations": annotations,
            "categories": [{"id": k + 1, "name": n, "supercategory": "finding"} for k, n in enumerate(names)]}


def box_cases(run: Run, file: Path) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """The images of a corrected box file (a box CSV or COCO JSON, read by ``lepton.data.readers.boxes``; a box
    outside its image, inverted or empty refuses the whole file) as ``(where, case, pixel hash, label identity)``, and
    the problems found: labels that are not the run's."""
    from lepton.data.readers.boxes import load_boxes

    try:
        data = load_boxes(file, window=run.preprocessing.window, skip_bad=False, validate=False)
    except DataError as exc:  # the readers' own message, less training's --skip-bad way out
        raise DataError(str(exc).replace(", or pass --skip-bad to drop them with a warning", "")) from None
    cases, problems = [], []
    for name, pixels, boxes, classes in zip(data.names, data.images, data.boxes, data.classes, strict=True):
        where = f"{file}: image {name}"
        labels = [data.label_names[int(c)] for c in classes]
        unknown = sorted(set(labels) - set(run.label_names))
        if unknown:
            problems.append(f"{where}: label(s) {unknown} are not the run's ({', '.join(run.label_names)}); rename "
                            "them to one of the run's or drop those boxes")
            continue
        found = sorted((tuple(round(float(v), 2) for v in b), lab) for b, lab in zip(boxes, labels, strict=True))
        identity = "boxes:" + hashlib.sha256(repr(found).encode()).hexdigest()[:16]
        cases.append((where, name, pixel_hash(pixels), identity))
    return cases, problems
