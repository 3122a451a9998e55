"""Which unlabelled cases to label next, and their pre-annotations.

Strategies: ``entropy`` (the predictive entropy of the run's answer; for segmentation the mean over voxels),
``tta`` (epistemic: the mutual information between the answer and random test-time augmentations — 8 light
augmentations for classifiers, flips along each axis for segmentation — as MONAI Label scores by TTA), ``coreset``
(k-center greedy on the network's pooled features: the cases farthest from everything labelled and already chosen;
classifiers) and ``random`` (seeded; the baseline). Cases whose pixels are in the run's data or in the labelling
folder are never proposed.

Pre-annotations: for classifiers ``suggestions.csv`` with the predicted class in its ``label`` column (annotators
correct that column); for segmentation a label map per case in ``preannotations/`` (NIfTI for volumes, PNG for 2-D
images, and a DICOM SEG beside it when the case is a DICOM series folder), named in the CSV's ``mask`` column. 2-D
cases also get their shapes as a GeoJSON file each (QuPath; the CSV's ``geojson`` column) and together as one COCO
JSON file, ``preannotations.coco.json`` (``lepton.label.shapes``). Detection runs rank and write boxes
(``lepton.label.boxes``).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lepton.data.readers.unlabelled import UnlabelledSet, pixel_hash
from lepton.data.transforms.preprocessing import augment_batch, augment_options
from lepton.errors import ConfigError, DataError
from lepton.label.boxes import suggest_boxes
from lepton.label.rounds import open_labels
from lepton.runs import Run, load_run, predict_outputs
from lepton.utils import atomic_write_bytes, atomic_write_json, atomic_write_text

STRATEGIES = ("entropy", "tta", "coreset", "random")
TTA_PASSES = 8


def entropy(probs: np.ndarray, axis: int = 1) -> np.ndarray:
    """Predictive entropy (nats) of probabilities along ``axis``."""
    p = np.clip(probs, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=axis)


def class_scores(run: Run, x01: torch.Tensor, strategy: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A classifier's probabilities (N, K) for preprocessed images in [0, 1] and each one's score (higher: label it
    sooner) under ``entropy`` or ``tta``; ``random`` and ``coreset`` rank elsewhere (score 0)."""
    norm, activate = run.preprocessing.normalize, run.task.activate
    probs = predict_outputs(run.model, norm(x01), activate, tta=run.config.tta, device=run.device)
    if strategy == "entropy":
        return probs, entropy(probs)
    if strategy == "tta":
        gen = torch.Generator().manual_seed(seed)
        opts = augment_options("light")
        draws = np.stack([predict_outputs(run.model, norm(augment_batch(x01, opts, gen)), activate,
                                          device=run.device) for _ in range(TTA_PASSES)])
        return probs, entropy(draws.mean(0)) - entropy(draws, axis=2).mean(0)  # mutual information (BALD)
    return probs, np.zeros(len(probs))


def features(run: Run, x01: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """The network's pooled last feature map (where Grad-CAM looks) for preprocessed images: coreset's space."""
    from lepton.models import model_info

    layer = model_info(run.config.model).cam_layer
    try:
        module = run.model.get_submodule(layer)
    except AttributeError:
        raise ConfigError(f"coreset needs a single network's feature layer {layer!r}; this run's model has none "
                          "(an ensemble?): use entropy or tta") from None
    caught: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda _m, _i, out: caught.append(out.mean(dim=tuple(range(2, out.ndim)))))
    try:
        with torch.no_grad():
            for part in torch.split(x01, batch_size):
                run.model(run.preprocessing.normalize(part).to(run.device))
    finally:
        hook.remove()
    return torch.cat(caught).float().cpu().numpy()


def k_center(pool: np.ndarray, labelled: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-center (Sener & Savarese, 2018): ``n`` pool rows, each the farthest from the labelled rows and those
    chosen before it; returns their indices and distances at the time of choice."""
    def dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum((a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2 * a @ b.T, 0))

    nearest = np.full(len(pool), np.inf)
    for start in range(0, len(labelled), 1024):
        nearest = np.minimum(nearest, dist(pool, labelled[start:start + 1024]).min(1))
    picks, gaps = [], []
    for _ in range(min(n, len(pool))):
        i = int(np.argmax(nearest))
        picks.append(i)
        gaps.append(float(nearest[i]))
        nearest = np.minimum(nearest, dist(pool, pool[i:i + 1])[:, 0])
        nearest[i] = -1.0
    return np.asarray(picks, dtype=int), np.asarray(gaps)


def labelled_set(run: Run, labels_dir: str | Path | None) -> tuple[set[str], Any]:
    """The pixel hashes of every labelled case (the run's data, all splits, and the labelling folder) and the run's
    data set itself."""
    config = run.config
    try:
        data = run.task.load(config.data, window=config.window, slices=config.slices,
                             steps=run.preprocessing.steps or None, skip_bad=True, validate=False)
    except DataError as exc:
        raise DataError(f"{run.path}: its training data {config.data} cannot be read to know which cases are "
                        f"labelled ({exc}); run from the folder the run was trained in") from None
    # the images' pixels alone (a segmentation set's own content hash covers its masks too)
    return {pixel_hash(image) for image in data.images} | set(open_labels(labels_dir).rows), data


def suggest(run: str | Path | Run, source: str | Path, *, n: int = 50, strategy: str = "entropy",
            output: str | Path = "suggestions", labels: str | Path | None = None, seed: int = 0,
            batch_size: int = 64, dicom_seg: bool = True) -> list[dict[str, Any]]:
    """Rank the unlabelled cases of ``source`` for labelling with a trained run and write the ``n`` first with their
    pre-annotations to ``output`` (``suggestions.csv``, ``suggest.json``, ``preannotations/``); returns the rows.

    >>> suggest("runs/cxr", "unlabelled/", n=50, strategy="tta", labels="labelling")   # doctest: +SKIP
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if n < 1:
        raise ConfigError(f"n must be at least 1 (got {n})")
    run = run if isinstance(run, Run) else load_run(run)
    spec = run.preprocessing
    kind = run.task.annotation  # what the person labelling gives: a class name, a label map, boxes
    if kind not in ("class", "mask", "boxes"):
        raise ConfigError(f"suggest ranks cases labelled with a class, a label map or boxes (classification, "
                          f"segmentation and detection); a {run.task.name} run has no labelling rounds")
    if kind == "mask" and strategy == "coreset":
        raise ConfigError("coreset ranks by a classifier's pooled features; for label maps (segmentation) use "
                          "entropy, tta or random")
    pool = run.task.load_unlabelled(source, window=spec.window, slices=spec.slices, steps=spec.steps or None)
    known, data = labelled_set(run, labels)
    out = Path(output)
    if kind == "mask":
        rows, excluded = _suggest_dense(run, pool, known, n, strategy, seed, out, dicom_seg)
    elif kind == "class":
        rows, excluded = _suggest_classes(run, pool, known, data, n, strategy, seed, batch_size)
    else:
        rows, excluded = suggest_boxes(run, pool, known, n, strategy, seed, out, batch_size)
    _write_csv(out / "suggestions.csv", rows)
    atomic_write_json(out / "suggest.json", {
        "run": str(run.path), "source": str(source), "strategy": strategy, "n": len(rows), "pool": len(pool),
        "labelled_excluded": excluded, "round": open_labels(labels).next_round,
        "labels": str(labels) if labels else None})
    return rows


def _suggest_classes(run: Run, pool: UnlabelledSet, known: set[str], data, n: int, strategy: str, seed: int,
                     batch_size: int) -> tuple[list[dict[str, Any]], int]:
    spec, names = run.preprocessing, run.label_names
    keep, probs, scores, feats = [], [], [], []
    for start, idx, images in pool.unseen(known, batch_size):
        x = spec.resize(images)  # in [0, 1]: class_scores and features normalise
        p, s = class_scores(run, x, strategy, seed + start)
        keep += idx
        probs.append(p)
        scores.append(s)
        if strategy == "coreset":
            feats.append(features(run, x))
    if not keep:
        return [], len(pool)
    probs, scores = np.concatenate(probs), np.concatenate(scores)
    if strategy == "coreset":
        labelled = features(run, spec.resize(data.images))
        order, gaps = k_center(np.concatenate(feats), labelled, n)
        scores[order] = gaps
    elif strategy == "random":
        order = np.random.default_rng(seed).permutation(len(keep))[:n]
    else:
        order = np.argsort(-scores, kind="stable")[:n]
    decided = run.decide(probs[order])
    return [{"rank": r + 1, "case": pool.names[keep[i]], "path": _where(pool, keep[i]), "score": round(float(
        scores[i]), 6), "label": names[int(d)], "confidence": round(float(probs[i].max()), 4),
        **{f"p_{name}": round(float(v), 4) for name, v in zip(names, probs[i], strict=True)}}
        for r, (i, d) in enumerate(zip(order, decided, strict=True))], len(pool) - len(keep)


def _suggest_dense(run: Run, pool: UnlabelledSet, known: set[str], n: int, strategy: str, seed: int, out: Path,
                   dicom_seg: bool) -> tuple[list[dict[str, Any]], int]:
    from rich.progress import track

    scored, excluded = [], 0
    for i in track(range(len(pool)), description="scoring cases", transient=True, disable=len(pool) < 8):
        pixels, affine = pool.read(i)
        if pixel_hash(pixels) in known:
            excluded += 1
            continue
        if strategy == "random":
            scored.append((i, 0.0))
            continue
        probs = run.segment(pixels, affine)
        if strategy == "entropy":
            scored.append((i, float(entropy(probs, axis=0).mean())))
        else:  # tta: flips along each spatial axis, each answer flipped back
            draws = [probs] + [np.flip(run.segment(np.ascontiguousarray(np.flip(pixels, axis)), affine), axis)
                               for axis in range(1, pixels.ndim)]
            draws = np.stack(draws)
            scored.append((i, float((entropy(draws.mean(0), axis=0) - entropy(draws, axis=1).mean(0)).mean())))
    if strategy == "random":
        rng = np.random.default_rng(seed)
        scored = [scored[k] for k in rng.permutation(len(scored))]
    else:
        scored.sort(key=lambda t: -t[1])
    rows, flat = [], []
    shapes_ok = _shapes_available()
    for rank, (i, score) in enumerate(scored[:n], start=1):
        pixels, affine = pool.read(i)
        labels = run.segment(pixels, affine).argmax(0).astype(np.uint8)
        stem = Path(pool.names[i]).name.removesuffix(".gz").split(".")[0] or f"case{i}"
        mask = write_label_map(labels, affine, out / "preannotations" / f"{rank:04d}_{stem}_seg")
        row = {"rank": rank, "case": pool.names[i], "path": _where(pool, i), "score": round(score, 6),
               "mask": str(mask.resolve())}
        if labels.ndim == 2 and shapes_ok:  # shapes for the 2-D tools: QuPath's GeoJSON per case, one COCO file
            from lepton.label.shapes import geojson_document

            path = out / "preannotations" / f"{rank:04d}_{stem}_seg.geojson"
            atomic_write_json(path, geojson_document(labels, run.label_names))
            row["geojson"] = str(path.resolve())
            flat.append((row["path"], labels))
        if dicom_seg and pool.paths and pool.paths[i].is_dir():
            from lepton.data.readers.dicomseg import write_seg

            row["dicom_seg"] = str(write_seg(labels, affine, pool.paths[i], run.label_names,
                                             out / "preannotations" / f"{rank:04d}_{stem}_seg.dcm"))
        rows.append(row)
    if flat:
        from lepton.label.shapes import coco_document

        atomic_write_json(out / "preannotations.coco.json", coco_document(flat, run.label_names))
    return rows, excluded


def _shapes_available() -> bool:
    """Whether COCO/GeoJSON shapes can be traced (scikit-image, the ``label`` extra); warns once when not."""
    import importlib.util

    if importlib.util.find_spec("skimage") is not None:
        return True
    logging.getLogger("lepton.label").warning("COCO and GeoJSON pre-annotations need scikit-image (pip install "
                                              "'lepton[label]'); writing label maps only")
    return False


def write_label_map(labels: np.ndarray, affine: np.ndarray | None, stem: Path) -> Path:
    """A pre-annotation: a NIfTI label map (volumes, with the image's affine) or an 8-bit PNG (2-D images)."""
    import gzip

    if labels.ndim == 3:
        import nibabel as nib

        img = nib.Nifti1Image(labels, affine if affine is not None else np.eye(4))
        img.header.set_xyzt_units("mm")
        path = stem.with_name(stem.name + ".nii.gz")
        atomic_write_bytes(path, gzip.compress(img.to_bytes(), mtime=0))
        return path
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(labels, mode="L").save(buf, format="PNG")
    path = stem.with_name(stem.name + ".png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _where(pool: UnlabelledSet, i: int) -> str:
    """Where case ``i`` is read from again (``lepton label import``): its file, or ``file.npz#i``."""
    return str(pool.paths[i].resolve()) if pool.paths else f"{Path(pool.source).resolve()}#{i}"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    fields = list(rows[0]) if rows else ["rank", "case", "path", "score"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
