"""Slide models in the registry: a ``lepton slides train`` folder (gated-attention MIL over frozen tile embeddings)
registered as a version of format ``slide-mil`` — its two files as artifacts (and its evaluation), its labels,
threshold, tile spec and backbone, the test figures in its metrics — with a model card of its own, promoted, listed,
bundled and served (as slide jobs) like any other version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lepton.errors import RegistryError

#: The registry format of a slide model.
SLIDE_FORMAT = "slide-mil"
#: Artifact key → file of a slide model folder (``lepton.pathology.mil``); evaluation.json is optional.
_FILES = {"weights": "mil.pt", "config": "slide_model.json"}


def register_slide_model(registry, folder: str | Path, name: str, *, description: str = ""):
    """Register a slide model folder as the next version of ``name``; returns the ``ModelVersion``."""
    from lepton.pathology.mil import SlideModel

    folder = Path(folder)
    missing = [f for f in _FILES.values() if not (folder / f).is_file()]
    if missing:
        raise RegistryError(f"{folder}: not a slide model folder (missing {', '.join(missing)}; make one with "
                            "`lepton slides train`)")
    blobs = {key: (folder / f).read_bytes() for key, f in _FILES.items()}
    try:
        SlideModel.from_bytes(blobs["config"], blobs["weights"])  # refuse what the server could not load
    except Exception as exc:
        raise RegistryError(f"{folder}: the slide model does not load ({exc})") from exc
    config = json.loads(blobs["config"])
    artifacts = {key: registry.store.put(data) for key, data in blobs.items()}
    evaluation: dict[str, Any] = {}
    if (folder / "evaluation.json").is_file():
        raw = (folder / "evaluation.json").read_bytes()
        artifacts["evaluation"] = registry.store.put(raw)
        evaluation = json.loads(raw)
    test = evaluation.get("test") or {}
    metrics = {"test_auc": test.get("auc"), "test_auc_ci95": test.get("auc_ci95"), "test_acc": test.get("acc"),
               "sensitivity": test.get("sensitivity"), "specificity": test.get("specificity"),
               "ece": (test.get("calibration") or {}).get("ece"), "test_slides": test.get("slides")}
    fields = dict(
        format=SLIDE_FORMAT, source_run=str(folder.resolve()), artifacts=artifacts, labels=list(config["labels"]),
        preprocessing={"tile": config["spec"], "backbone": config["backbone"], "mpp": config.get("mpp")},
        config={"task": "slide-classification", "model": "abmil", "backbone": config["backbone"].get("model"),
                "manifest": config.get("manifest")},
        metrics={k: v for k, v in metrics.items() if v is not None},
        data_fingerprint={"source": config.get("manifest"), "slides": evaluation.get("slides"),
                          "tiles": evaluation.get("tiles")},
        threshold=float(config["threshold"]))
    return registry.add_version(name, fields, description)  # the card: render_card → slide_card


def load_slide_model(registry, ref: str):
    """A registered slide model as a ``SlideModel`` (artifact hashes verified)."""
    from lepton.pathology.mil import SlideModel

    v = registry.get(ref)
    if v.format != SLIDE_FORMAT:
        raise RegistryError(f"{v.ref} is a {v.format} model, not a slide model")
    blobs = {k: registry.store.get(v.artifacts[k], f"{v.ref} {k}") for k in _FILES}
    return SlideModel.from_bytes(blobs["config"], blobs["weights"])


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ("n/a" if x is None else str(x))


def slide_card(v) -> str:
    """The model card of a slide model version (a ``ModelVersion``)."""
    pre, m, fp = v.preprocessing, v.metrics, v.data_fingerprint
    labels, tile, backbone = v.labels, pre["tile"], pre["backbone"]
    ci = m.get("test_auc_ci95") or [None, None]
    embedder = (f"`{backbone.get('model')}` at seed {backbone.get('seed')}'s random initialisation (untrained, "
                "frozen)" if backbone.get("kind") == "random" else
                f"the network of run `{backbone.get('run')}` (weights `{backbone.get('weights')}`, frozen; the run "
                "must be present where the model is served)")
    lines = [f"# Model card: {v.name} v{v.version}", "", "## Intended use",
             f"Classifies whole-slide images (pathology) into {', '.join(labels)} from the slide's tissue tiles. "
             "Decision support for trained pathologists only: not a diagnosis, and not validated for stains, "
             "scanners, sites or specimens unlike the training slides.", "", "## Model",
             f"- Format: {v.format}; gated-attention MIL (ABMIL) over frozen tile embeddings",
             f"- Tiles: {tile.get('size')} px at {tile.get('mpp')} µm/px, overlap {tile.get('overlap', 0)} px, at "
             f"least {tile.get('min_tissue', 0.5):.0%} tissue; embedded by {embedder}",
             f"- Decision threshold on P({labels[-1]}): {_num(v.threshold)} (Youden's J on validation slides)",
             f"- Source: {v.source_run}", "", "## Training data",
             f"- Slide manifest `{fp.get('source')}`; slides per split {fp.get('slides')}, {fp.get('tiles')} tiles; "
             "splits grouped by patient", "", "## Metrics"]
    if m.get("test_auc") is not None:
        lines += [f"- Test slides: {m.get('test_slides')}; slide AUC {_num(m['test_auc'])} (95 % CI "
                  f"{_num(ci[0])}–{_num(ci[1])}), accuracy {_num(m.get('test_acc'))}, sensitivity "
                  f"{_num(m.get('sensitivity'))}, specificity {_num(m.get('specificity'))}, ECE {_num(m.get('ece'))}"]
    else:
        lines.append("- No evaluation recorded (no evaluation.json in the model folder).")
    lines += ["", "## Limitations",
              "- Figures are on held-out patients of the same source; expect lower figures on other sites and "
              "scanners.",
              "- The heatmap shows attention (which tiles weighed in the decision), not a segmentation of disease.", ""]
    return "\n".join(lines)
