"""Slide classification end to end: a slide manifest → tiles → cached embeddings → MIL trained on slide labels with
patient-grouped splits → slide-level AUC with CIs and calibration on the test slides → a model folder; and one slide
→ prediction, heatmap, GeoJSON regions and report."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lepton.data.readers.slides import open_slide
from lepton.data.readers.tiling import TileSpec
from lepton.errors import DataError
from lepton.pathology.embed import Backbone, SlideFeatures, embed_slide
from lepton.pathology.mil import SlideModel, grouped_split, slide_metrics, train_mil


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Rows of a slide manifest CSV (``slide``, ``label``, optional ``patient``); slide paths relative to the CSV."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV slide manifest ({exc})") from exc
    if not rows or not {"slide", "label"} <= set(rows[0]):
        raise DataError(f"{path}: a slide manifest needs the columns slide,label (and patient, to keep a patient's "
                        "slides in one split)")
    for i, row in enumerate(rows):
        row["slide"] = str((path.parent / row["slide"]).resolve())
        row["patient"] = row.get("patient") or f"slide{i}"
        if not Path(row["slide"]).exists():
            raise DataError(f"{path}: row {i + 2}: slide {row['slide']} not found")
    return rows


def embed_slides(paths: list[str], spec: TileSpec, backbone: Backbone, *, mpp: float | None = None,
                 cache: Any = None, workers: int | None = None, quiet: bool = False) -> list[SlideFeatures]:
    """Every slide's tile embeddings (cached), with a progress bar over slides."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    out = []
    bar = Progress(TextColumn("embedding slides"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tiles]} "
                   "tiles"), TimeRemainingColumn(), console=console, disable=quiet or not console.is_terminal)
    with bar:
        task = bar.add_task("slides", total=len(paths), tiles=0)
        tiles = 0
        for p in paths:
            with open_slide(p, mpp=mpp) as slide:
                feats = embed_slide(slide, spec, backbone, cache=cache, workers=workers)
            tiles += len(feats.coords)
            out.append(feats)
            bar.update(task, advance=1, tiles=tiles)
    return out


def train_slides(manifest: str | Path, output: str | Path, *, spec: TileSpec = TileSpec(),
                 backbone: Backbone | None = None, epochs: int = 40, seed: int = 0, mpp: float | None = None,
                 cache: Any = None, n_bootstrap: int = 1000, workers: int | None = None,
                 quiet: bool = False) -> dict[str, Any]:
    """Train a slide classifier on a manifest's slides and evaluate it on its held-out patients; write the model
    folder (``slide_model.json``, ``mil.pt``), ``splits.csv`` and ``evaluation.json`` into ``output``."""
    from lepton.utils import atomic_write_json

    started = time.perf_counter()
    rows = read_manifest(manifest)
    labels = sorted({r["label"] for r in rows})
    if len(labels) != 2:
        raise DataError(f"{manifest}: slide labels {labels}: MIL here classifies two labels (e.g. normal, tumour)")
    y = np.array([labels.index(r["label"]) for r in rows])
    splits = grouped_split(y, np.array([r["patient"] for r in rows]), seed=seed)
    backbone = backbone or Backbone.random()
    feats = embed_slides([r["slide"] for r in rows], spec, backbone, mpp=mpp, cache=cache, workers=workers,
                         quiet=quiet)
    bags = [f.features for f in feats]
    part = {name: np.flatnonzero(splits == name) for name in ("train", "val", "test")}
    embedded = time.perf_counter()
    model = train_mil([bags[i] for i in part["train"]], y[part["train"]], [bags[i] for i in part["val"]],
                      y[part["val"]], labels=labels, backbone=backbone.identity, spec=asdict(spec), epochs=epochs,
                      seed=seed)
    probs = np.array([model.predict(bags[i])["probs"] for i in part["test"]])
    evaluation = slide_metrics(y[part["test"]], probs, labels, model.threshold, n_bootstrap=n_bootstrap, seed=seed)
    out = Path(output)
    model.save(out, {"manifest": str(Path(manifest).resolve()), "mpp": mpp})
    with open(out / "splits.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide", "label", "patient", "split", "p_" + labels[-1]])
        test_p = dict(zip(part["test"].tolist(), probs[:, -1].tolist(), strict=True))
        for i, r in enumerate(rows):
            p = f"{test_p[i]:.4f}" if i in test_p else ""
            writer.writerow([r["slide"], r["label"], r["patient"], splits[i], p])
    result = {"model": str(out), "labels": labels, "slides": {k: len(v) for k, v in part.items()},
              "tiles": int(sum(len(b) for b in bags)), "backbone": backbone.identity, "test": evaluation,
              "embed_seconds": round(embedded - started, 1), "train_seconds": round(time.perf_counter() - embedded, 1)}
    atomic_write_json(out / "evaluation.json", result)
    return result


def predict_slide(model: str | Path | SlideModel, slide_path: str | Path, output: str | Path, *,
                  mpp: float | None = None, cache: Any = None, backbone: Backbone | None = None,
                  workers: int | None = None, on_progress: Callable[[int, int], None] | None = None,
                  model_name: str | None = None, model_version: str = "local") -> dict[str, Any]:
    """One slide through a slide model: the prediction, a heatmap PNG over its thumbnail, GeoJSON regions and a
    report (JSON and Markdown) in ``output`` — and, for a DICOM whole-slide image, the report as a DICOM SR that
    references it (``model_name``/``model_version`` name the algorithm there); returns the report.
    ``on_progress(done, total)`` follows the tiles."""
    from lepton.pathology.outputs import geojson, heatmap_png, report_markdown, top_regions
    from lepton.utils import atomic_write_json, atomic_write_text

    if model_name is None:
        model_name = Path(model).name if not isinstance(model, SlideModel) else "slide-model"
    model = model if isinstance(model, SlideModel) else SlideModel.load(model)
    backbone = backbone or Backbone.from_identity(model.backbone)
    spec = TileSpec(**model.spec)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with open_slide(slide_path, mpp=mpp) as slide:
        feats = embed_slide(slide, spec, backbone, cache=cache, workers=workers, on_progress=on_progress)
        if not len(feats.coords):
            w0, h0 = slide.dimensions
            raise DataError(f"{slide.path}: no tile of {spec.size} px at {spec.mpp} µm/px ({feats.size0:.0f} px of "
                            f"the slide's {w0}x{h0}) is at least {spec.min_tissue:.0%} tissue: nothing to classify "
                            "(a slide smaller than a tile, no stained tissue, or a wrong --mpp)")
        answer = model.predict(feats.features)
        thumb, thumb_ds = slide.thumbnail(1024)
        info = slide.describe()
    p = float(answer["probs"][-1])
    label = model.labels[-1] if p >= model.threshold else model.labels[0]
    stem = Path(slide_path).name.split(".")[0]
    regions = top_regions(feats.coords, answer["attention"], answer["tile_scores"], feats.stride0, feats.size0)
    files = {"heatmap": str(out / f"{stem}_heatmap.png"), "geojson": str(out / f"{stem}_regions.geojson"),
             "report": str(out / f"{stem}_report.json"), "markdown": str(out / f"{stem}_report.md")}
    heatmap_png(files["heatmap"], thumb, thumb_ds, feats.coords, answer["attention"], feats.size0,
                title=f"{Path(slide_path).name}: {label} (P={p:.2f})")
    atomic_write_json(Path(files["geojson"]), geojson(regions))
    report = {"slide": info, "labels": model.labels, "spec": model.spec, "tiles": len(feats.coords),
              "prediction": {"label": label, "probability": round(p, 5), "threshold": model.threshold},
              "regions": regions, "files": files}
    if info["container"] == "dicom":
        from lepton.pathology.slide_sr import write_slide_sr

        files["sr"] = str(out / f"{stem}_sr.dcm")
        write_slide_sr(files["sr"], slide_path, report, model=model_name, version=model_version)
    atomic_write_json(Path(files["report"]), report)
    atomic_write_text(Path(files["markdown"]), report_markdown(report))
    return report
