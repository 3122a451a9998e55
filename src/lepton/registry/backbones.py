"""Pretrained backbones in the registry: the output of ``lepton pretrain`` registered as a version of format
``backbone`` — its ``backbone.pt`` (and ``pretrain.json``) as artifacts, the network, dimensions, channels and input
size it fits in its preprocessing record, how it was pretrained in its config — with a card of its own, promoted,
listed and bundled like any other version. ``lepton train --pretrained NAME@STAGE`` starts from it
(``backbone_file``); whether it fits the network being trained is checked when it is loaded
(``lepton.models.pretrained``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lepton.errors import RegistryError

#: The registry format of a pretrained backbone.
BACKBONE_FORMAT = "backbone"


def _files(path: Path) -> tuple[Path, Path | None]:
    """The backbone file and its ``pretrain.json`` (if any) of a ``lepton pretrain`` folder or a backbone file."""
    if path.is_dir():
        weights = path / "backbone.pt"
        if not weights.is_file():
            raise RegistryError(f"{path}: not a finished pretraining folder (no backbone.pt; `lepton pretrain` writes "
                                "it when the last epoch ends — resume the run to finish it)")
        return weights, (path / "pretrain.json") if (path / "pretrain.json").is_file() else None
    if not path.is_file():
        raise RegistryError(f"{path}: no such backbone file or pretraining folder")
    sidecar = path.parent / "pretrain.json"
    return path, sidecar if sidecar.is_file() else None


def register_backbone(registry, path: str | Path, name: str, *, description: str = ""):
    """Register a ``lepton pretrain`` folder (or its ``backbone.pt``) as the next version of ``name``."""
    from lepton.pretrain import backbone_info

    weights, sidecar = _files(Path(path))
    try:
        info = backbone_info(weights)
    except Exception as exc:  # a file that is not a lepton backbone: torch's own message says why
        raise RegistryError(f"{weights}: not a backbone written by `lepton pretrain` ({exc})") from None
    artifacts = {"backbone": registry.store.put(weights.read_bytes())}
    history: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    if sidecar is not None:
        raw = sidecar.read_bytes()
        artifacts["pretrain"] = registry.store.put(raw)
        record = json.loads(raw)
        history, config = list(record.get("history") or []), dict(record.get("config") or {})
    fields = dict(
        format=BACKBONE_FORMAT, source_run=str(Path(path).resolve()), artifacts=artifacts, labels=[],
        preprocessing={"size": info.get("size"), "channels": info.get("in_channels"),
                       "spatial_dims": info.get("spatial_dims")},
        config={"kind": "backbone", "model": info.get("model"), "method": info.get("method"),
                "epochs": config.get("epochs"), "backbone": info},
        metrics={"final_loss": history[-1]["loss"]} if history else {},
        data_fingerprint={"source": info.get("source") or config.get("source"), "images": info.get("images")},
        threshold=None)
    return registry.add_version(name, fields, description)


def backbone_file(registry, ref: str) -> Path:
    """The verified backbone file of a registered backbone version (``NAME``, ``NAME@3``, ``NAME@production``), for
    ``create_model(pretrained=…)``; a version of another format is refused."""
    v = registry.get(ref)
    if v.format != BACKBONE_FORMAT:
        raise RegistryError(f"{v.ref} is a {v.format} model, not a pretrained backbone: register the output of "
                            "`lepton pretrain` (`lepton models register PRETRAIN_FOLDER --name NAME`) and give that "
                            "name to --pretrained")
    sha = v.artifacts["backbone"]
    registry.store.get(sha, f"{v.ref} backbone")  # verified before use
    return registry.store.path(sha)


def backbone_card(v) -> str:
    """The model card of a backbone version (a ``ModelVersion``)."""
    cfg, pre = v.config, v.preprocessing
    info = cfg.get("backbone") or {}
    dims = pre.get("spatial_dims") or 2
    loss = v.metrics.get("final_loss")
    return "\n".join([
        f"# Model card: {v.name} v{v.version}", "",
        "## Intended use",
        f"A pretrained backbone, not a model that answers: the starting weights of a `{cfg.get('model')}` "
        f"({dims}-D, {pre.get('channels')} channel(s), pretrained at {pre.get('size')} px) for `lepton train "
        f"--model {cfg.get('model')} --pretrained {v.name}@{v.version}`. Its head is left out and trained fresh.", "",
        "## Pretraining",
        f"- Method: {cfg.get('method')} (self-supervised, no labels); epochs: {cfg.get('epochs') or 'n/a'}; "
        f"final loss: {f'{loss:.4f}' if isinstance(loss, float) else 'n/a'}",
        f"- Unlabelled source: {v.data_fingerprint.get('source') or 'n/a'} ({info.get('images', 'n/a')} images)",
        f"- Source: {v.source_run}", "",
        "## Limits",
        "- It fits only the network, dimensions and channels above; `lepton train` refuses it elsewhere, naming "
        "the difference.", ""])
