"""``lepton demo --task pathology``: generated pyramidal slides (tissue, pen marks, half with tumour; two slides per
patient) → tiles → frozen-CNN embeddings → gated-attention MIL on slide labels → slide AUC with its CI on held-out
patients → heatmaps, QuPath GeoJSON and reports for a tumour and a normal test slide. No network, no files needed."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any


def run_pathology_demo(output_dir: str | Path = "runs", *, quick: bool = False, seed: int = 0,
                       quiet: bool = False) -> dict[str, Any]:
    """Generate the slides, train and evaluate the slide model, and predict two test slides; return the paths and
    headline figures."""
    from lepton.data.readers.tiling import TileSpec
    from lepton.data.tools.slidegen import write_slide_set
    from lepton.pathology.embed import Backbone
    from lepton.pathology.workflow import predict_slide, train_slides

    started = time.perf_counter()
    out = Path(output_dir)
    n, size = (24, 2048) if quick else (40, 3072)
    folder = out / "demo-pathology" / f"slides_{n}_{size}"
    manifest = folder / "slides.csv"
    if not manifest.is_file():
        write_slide_set(folder, n, size=size, seed=seed)
    generated = time.perf_counter()
    spec = TileSpec(mpp=0.5, size=256)
    model_dir = out / "demo-pathology" / "slide-model"
    cache = out / "demo-pathology" / "cache"
    result = train_slides(manifest, model_dir, spec=spec, backbone=Backbone.random("lepton_cnn", seed=seed),
                          epochs=30 if quick else 40, seed=seed, cache=cache, n_bootstrap=200 if quick else 1000,
                          quiet=quiet)
    with open(model_dir / "splits.csv", newline="") as fh:
        test = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    predictions = []
    for label in ("tumour", "normal"):
        row = next((r for r in test if r["label"] == label), None)
        if row is not None:
            report = predict_slide(model_dir, row["slide"], model_dir / "predictions", cache=cache)
            predictions.append({"slide": Path(row["slide"]).name, "truth": label, **report["prediction"],
                                "regions": len(report["regions"]), **report["files"]})
    evaluation = result["test"]
    return {"model": result["model"], "slides": str(manifest), "split": result["slides"], "tiles": result["tiles"],
            "backbone": result["backbone"], "test_auc": evaluation["auc"], "auc_ci95": evaluation["auc_ci95"],
            "test_acc": evaluation["acc"], "ece": evaluation["calibration"]["ece"],
            "threshold": evaluation["threshold"], "predictions": predictions,
            "generate_seconds": round(generated - started, 1), "embed_seconds": result["embed_seconds"],
            "train_seconds": result["train_seconds"], "wall_seconds": round(time.perf_counter() - started, 1)}
