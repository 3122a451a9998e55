"""Which whole slides to label next with a slide model (``lepton slides train``), and their QuPath pre-annotations.

Each slide of the source is tiled, embedded and classified one at a time (as ``predict_slide`` does: memory bounded by
one slide's embeddings, cached for a later ``lepton slides predict``), then ranked by ``entropy`` — the binary entropy
of the slide's probability, raised to the power that takes the model's decision threshold to 0.5 (the most uncertain
answer is the one on the threshold, not at P = 0.5) — or ``random`` (seeded). Slides listed in the model folder's
``splits.csv`` (or its recorded manifest) were labelled for training and are never proposed. The first ``n`` get the
regions the model attended to as a GeoJSON FeatureCollection each (QuPath: File → Import objects), named in
``suggestions.csv``'s ``geojson`` column.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from lepton.data.index.layout import SLIDE_SUFFIXES
from lepton.errors import ConfigError, DataError
from lepton.utils import atomic_write_json

#: What ranks slides: tile-level strategies (tta, coreset) have no meaning for one probability per slide.
SLIDE_STRATEGIES = ("entropy", "random")
#: Slide files: the openslide/tiffslide vendor formats and pyramidal TIFF; a folder of ``.dcm`` files is one DICOM
#: whole-slide image.
SLIDE_FILES = (*SLIDE_SUFFIXES, ".tif", ".tiff")

log = logging.getLogger("lepton.label")


def is_slide_model(path: str | Path) -> bool:
    """Whether ``path`` is a ``lepton slides train`` model folder (as ``lepton models register`` tells one)."""
    from lepton.pathology.mil import CONFIG_FILE

    return (Path(path) / CONFIG_FILE).is_file()


def threshold_entropy(p: np.ndarray | float, threshold: float) -> np.ndarray:
    """Binary entropy (nats) of P(positive) raised to the power that takes ``threshold`` to 0.5 (as detection's
    ``uncertainty`` treats box scores), so a slide on the model's decision threshold scores the most (log 2) and a
    certain one 0."""
    t = min(max(float(threshold), 1e-6), 1 - 1e-6)
    q = np.clip(np.clip(np.asarray(p, dtype=float), 0, 1) ** (np.log(0.5) / np.log(t)), 1e-12, 1 - 1e-12)
    return -(q * np.log(q) + (1 - q) * np.log(1 - q))


def list_slides(source: str | Path) -> list[Path]:
    """The slides of ``source``: one slide file, a folder (slide files below it; a folder of ``.dcm`` files counts
    once, as one DICOM slide) or a slide manifest CSV (its ``slide`` column)."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        from lepton.pathology.workflow import read_manifest

        try:
            return [Path(r["slide"]) for r in read_manifest(source)]
        except DataError:
            with open(source, newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh))
            if not rows or "slide" not in rows[0]:
                raise DataError(f"{source}: a slide list needs a slide column (paths relative to the CSV)") from None
            return [(source.parent / r["slide"]).resolve() for r in rows]
    if source.is_file():
        return [source.resolve()]
    if not source.is_dir():
        raise DataError(f"{source}: not found; give a folder of slides, a slide file or a CSV with a slide column")
    found: dict[Path, None] = {}
    for p in sorted(source.rglob("*")):
        if not p.is_file():
            continue
        if p.suffix.lower() == ".dcm":
            found[p.parent.resolve()] = None
        elif p.suffix.lower() in SLIDE_FILES:
            found[p.resolve()] = None
    if not found:
        raise DataError(f"{source}: no slide files ({', '.join(SLIDE_FILES)}, or folders of .dcm files) below it")
    return list(found)


def trained_slides(model_dir: str | Path) -> set[Path] | None:
    """The slides a model was trained, validated or tested on (its ``splits.csv``, else the manifest its
    ``slide_model.json`` records), resolved; ``None`` when the folder records neither."""
    folder = Path(model_dir)
    splits = folder / "splits.csv"
    if splits.is_file():
        with open(splits, newline="", encoding="utf-8") as fh:
            return {Path(r["slide"]).resolve() for r in csv.DictReader(fh) if r.get("slide")}
    config = json.loads((folder / "slide_model.json").read_text())
    manifest = config.get("manifest")
    if manifest and Path(manifest).is_file():
        from lepton.pathology.workflow import read_manifest

        return {Path(r["slide"]).resolve() for r in read_manifest(manifest)}
    return None


def suggest_slides(model_dir: str | Path, source: str | Path, *, n: int = 20, strategy: str = "entropy",
                   output: str | Path = "suggestions", seed: int = 0, mpp: float | None = None, cache: Any = None,
                   workers: int | None = None) -> list[dict[str, Any]]:
    """Rank the slides of ``source`` for labelling with a slide model and write the ``n`` first to ``output``
    (``suggestions.csv``, ``suggest.json``, ``preannotations/<rank>_<slide>.geojson``); returns the rows.

    >>> suggest_slides("models/wsi", "unlabelled_slides/", n=10)   # doctest: +SKIP
    """
    from rich.progress import track

    from lepton.data.readers.slides import open_slide
    from lepton.data.readers.tiling import TileSpec
    from lepton.pathology.embed import Backbone, embed_slide
    from lepton.pathology.mil import SlideModel
    from lepton.pathology.outputs import geojson, top_regions

    if strategy not in SLIDE_STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} does not rank whole slides (one probability each): use "
                          f"{' or '.join(SLIDE_STRATEGIES)}")
    if n < 1:
        raise ConfigError(f"n must be at least 1 (got {n})")
    model = SlideModel.load(model_dir)
    config = json.loads((Path(model_dir) / "slide_model.json").read_text())
    mpp = mpp if mpp is not None else config.get("mpp")
    backbone = Backbone.from_identity(model.backbone)
    spec = TileSpec(**model.spec)
    slides = list_slides(source)
    known = trained_slides(model_dir)
    if known is None:
        log.warning("%s records no training slides (no splits.csv, no manifest): no slide is left out as labelled",
                    model_dir)
    pool = [p for p in slides if known is None or p not in known]
    scored: list[dict[str, Any]] = []
    for path in track(pool, description="scoring slides", transient=True, disable=len(pool) < 4):
        with open_slide(path, mpp=mpp) as slide:
            feats = embed_slide(slide, spec, backbone, cache=cache, workers=workers)
            width, height = slide.dimensions
        if not len(feats.coords):
            log.warning("%s: no tissue tile to classify; left out", path)
            continue
        answer = model.predict(feats.features)
        p = float(answer["probs"][-1])
        regions = top_regions(feats.coords, answer["attention"], answer["tile_scores"], feats.stride0, feats.size0)
        scored.append({"path": path, "p": p, "regions": regions, "size": (width, height),
                       "score": float(threshold_entropy(p, model.threshold))})
    if strategy == "random":
        scored = [scored[k] for k in np.random.default_rng(seed).permutation(len(scored))]
    else:
        scored.sort(key=lambda s: -s["score"])
    out = Path(output)
    rows = []
    name = f"{model.labels[-1]} (attention)"
    for rank, s in enumerate(scored[:n], start=1):
        stem = s["path"].name.split(".")[0] or f"slide{rank}"
        where = out / "preannotations" / f"{rank:04d}_{stem}.geojson"
        atomic_write_json(where, geojson(s["regions"], name=name))
        rows.append({"rank": rank, "case": s["path"].name, "path": str(s["path"]), "score": round(s["score"], 6),
                     "probability": round(s["p"], 5),
                     "label": model.labels[-1] if s["p"] >= model.threshold else model.labels[0],
                     "geojson": str(where.resolve()), "width": s["size"][0], "height": s["size"][1]})
    from lepton.label.suggest import _write_csv

    _write_csv(out / "suggestions.csv", rows)
    atomic_write_json(out / "suggest.json", {
        "model": str(model_dir), "source": str(source), "strategy": strategy, "n": len(rows), "pool": len(slides),
        "labelled_excluded": len(slides) - len(pool), "training_slides_known": known is not None,
        "no_tissue": len(pool) - len(scored), "threshold": model.threshold})
    return rows
