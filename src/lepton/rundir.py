"""The run directory's format, owned in one place: its file names, and reading and writing each of them.

A run directory ``runs/<name>/`` holds ``config.yaml`` (the resolved ``TrainConfig``), ``preprocessing.json``,
``labels.json``, ``data.json`` (the data fingerprint), ``best.pt`` (the selected weights and the ``create_model``
arguments that rebuild them), ``last.pt`` (the resumable checkpoint while it trains), ``history.csv``,
``curves.png``, ``val_set.npz`` and ``run.json`` (status, best epoch, the task's decision, cost). Training, federated
learning, recalibration, the registry, the trackers' comparison and serving all read and write it through
``RunDir``, so a change to the format is one change here. Every file is written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton.config import TrainConfig
from lepton.errors import LeptonError, RunError
from lepton.utils import atomic_torch_save, atomic_write_json

if TYPE_CHECKING:
    import torch

    from lepton.data.transforms.preprocessing import Preprocessing

CONFIG = "config.yaml"
INFO = "run.json"
BEST = "best.pt"
LAST = "last.pt"
LABELS = "labels.json"
PREPROCESSING = "preprocessing.json"
DATA = "data.json"
HISTORY = "history.csv"
CURVES = "curves.png"
VAL_SET = "val_set.npz"

#: What a finished run needs to load and predict (``load_run``).
COMPLETE = (CONFIG, BEST, LABELS, PREPROCESSING, INFO)
#: What a registered version stores, by artifact key.
ARTIFACTS = {"weights": BEST, "config": CONFIG, "preprocessing": PREPROCESSING, "labels": LABELS, "run": INFO,
             "data": DATA}
#: What a tracked run stores with it (MLflow: under ``run/``, what ``lepton models register runs:/ID`` registers).
TRACKED = (CONFIG, INFO, BEST, LABELS, PREPROCESSING, DATA, HISTORY, CURVES, VAL_SET)


@dataclass(frozen=True)
class RunDir:
    """One run directory: ``RunDir(path).read_info()``, ``.write_config(config)``, ``.load_model()``…"""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def missing(self, names: tuple[str, ...] = COMPLETE) -> list[str]:
        """The files of ``names`` the directory lacks."""
        return [n for n in names if not self.has(n)]

    def check_complete(self) -> None:
        """RunError naming the directory and what it lacks, unless a finished run is there."""
        if not self.path.is_dir():
            raise RunError(f"{self.path}: run directory not found")
        missing = self.missing()
        if missing:
            hint = " (training has not finished: resume it with `lepton train --resume`)" if self.has(LAST) else ""
            raise RunError(f"{self.path}: not a complete run, missing {', '.join(missing)}{hint}")

    def create(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    # -- run.json ---------------------------------------------------------------------------------------------
    def write_info(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.path / INFO, info)

    def read_info(self, default: dict[str, Any] | None = None) -> dict[str, Any]:
        """``run.json`` as a mapping; ``default`` when it is absent (given), RunError when unreadable."""
        if default is not None and not self.has(INFO):
            return default
        info = self._json(INFO)
        if not isinstance(info, dict):
            raise RunError(f"{self.path / INFO}: expected a JSON object")
        return info

    # -- config.yaml -------------------------------------------------------------------------------------------
    def write_config(self, config: TrainConfig) -> None:
        config.to_yaml(self.path / CONFIG)

    def read_config(self) -> TrainConfig:
        """The run's ``TrainConfig``, from a flat ``config.yaml`` (every version so far) or one grouped by
        concern; ConfigError naming the file and field when it does not read."""
        return TrainConfig.from_yaml(self.path / CONFIG)

    def read_config_values(self) -> dict[str, Any]:
        """``config.yaml``'s fields as one flat mapping of what the file says (groups flattened; fields it leaves
        out absent), for comparing runs without validating them."""
        from lepton.config import flatten_config, read_yaml

        return flatten_config(read_yaml(self.path / CONFIG))

    # -- labels, preprocessing, data fingerprint ------------------------------------------------------------------
    def write_labels(self, names: list[str]) -> None:
        atomic_write_json(self.path / LABELS, list(names))

    def read_labels(self) -> list[str]:
        return list(self._json(LABELS))

    def write_preprocessing(self, spec: Preprocessing | dict[str, Any]) -> None:
        atomic_write_json(self.path / PREPROCESSING, spec if isinstance(spec, dict) else spec.to_dict())

    def read_preprocessing(self) -> Preprocessing:
        from lepton.data.transforms.preprocessing import Preprocessing

        return Preprocessing.from_dict(self._json(PREPROCESSING))

    def read_preprocessing_dict(self) -> dict[str, Any]:
        return self._json(PREPROCESSING)

    def write_data(self, fingerprint: dict[str, Any]) -> None:
        atomic_write_json(self.path / DATA, fingerprint)

    def read_data(self, default: dict[str, Any] | None = None) -> dict[str, Any]:
        """``data.json``, the training data's fingerprint; ``default`` when it is absent (given)."""
        return default if default is not None and not self.has(DATA) else self._json(DATA)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], name: str = BEST) -> None:
        """A checkpoint (``best.pt``: ``model`` state dict, ``spec`` for ``create_model``, ``epoch``, ``val``)."""
        atomic_torch_save(self.path / name, checkpoint)

    def load_checkpoint(self, name: str = BEST, *, full: bool = False) -> dict[str, Any]:
        """A checkpoint read on the CPU; ``full`` unpickles more than tensors (``last.pt``'s optimiser state, a
        file this run wrote itself), otherwise weights only."""
        import torch

        return torch.load(self.path / name, map_location="cpu", weights_only=not full)

    def load_model(self, name: str = BEST, device: str = "cpu") -> torch.nn.Module:
        """The network of a checkpoint, rebuilt and loaded on ``device`` in eval mode."""
        return model_from_checkpoint(self.load_checkpoint(name), device, str(self.path / name))

    def _json(self, name: str) -> Any:
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, ValueError) as exc:
            raise RunError(f"{self.path / name}: cannot read ({exc})") from exc


def model_from_checkpoint(checkpoint: dict[str, Any], device: str = "cpu",
                          where: str = "the checkpoint") -> torch.nn.Module:
    """A network rebuilt from a checkpoint's ``spec`` (``create_model`` arguments) with its ``model`` weights, on
    ``device`` in its fast memory layout and eval mode; RunError naming ``where`` when they do not fit."""
    from lepton.models import create_model
    from lepton.models.layout import model_layout

    try:
        model = create_model(**checkpoint["spec"])
        model.load_state_dict(checkpoint["model"])
    except LeptonError:
        raise
    except (KeyError, TypeError, RuntimeError) as exc:
        raise RunError(f"{where} does not rebuild its network ({type(exc).__name__}: {exc})") from exc
    return model_layout(model.to(device)).eval()
