"""Runs as registry versions: a finished run directory registered with its artifacts and model card (and an ONNX
export on request), an ONNX model trained elsewhere registered with its input spec, and a PyTorch version loaded back
as a ``Run`` after every artifact's hash is checked. ``Registry`` takes these methods from ``RunsMixin``."""

from __future__ import annotations

import io
import json
from pathlib import Path

from lepton.errors import RegistryError
from lepton.rundir import ARTIFACTS, VAL_SET, RunDir

#: Artifact key → file of a run directory that a registered version stores (``lepton.rundir``).
RUN_ARTIFACTS = ARTIFACTS


class RunsMixin:
    """Registering runs and ONNX models, and loading a version back as a run (mixed into ``Registry``)."""

    def register_run(self, run_dir: str | Path, name: str, *, description: str = "",
                     onnx: bool = False, source: str | None = None):
        """Register a finished run directory as the next version of ``name``, with a model card.

        ``onnx=True`` also stores an ONNX export, so the server can run it with ONNX Runtime. ``source`` names where
        the run came from when not from its folder (an MLflow ``runs:/ID``). A run tracked to MLflow is linked both
        ways: the version's ``mlflow_run`` (in its metrics record), and the card and a tag on the MLflow run.
        """
        run_dir = Path(run_dir)
        files = RunDir(run_dir)
        missing = files.missing(tuple(RUN_ARTIFACTS.values()))
        if missing:
            raise RegistryError(f"{run_dir}: not a complete run (missing {', '.join(missing)})")
        artifacts = {key: self.store.put((run_dir / f).read_bytes()) for key, f in RUN_ARTIFACTS.items()}
        if files.has(VAL_SET):  # for checking lower serving precisions (lepton.precision)
            artifacts["val_set"] = self.store.put(files.file(VAL_SET).read_bytes())
        from lepton.tasks import get_task

        run_config = files.read_config()
        task = get_task(run_config.task, run_config.task_options)
        if onnx:
            import tempfile

            from lepton.export import export_onnx
            from lepton.runs import load_run

            run = load_run(run_dir)
            with tempfile.TemporaryDirectory() as tmp:
                path = export_onnx(run.model, (run.preprocessing.channels, *run.preprocessing.size),
                                   Path(tmp) / "model.onnx", activate=run.task.activate,
                                   spatial_axes=task.on_grid,
                                   output_name=task.oip_outputs(run.label_names)[0]["name"])
                artifacts["onnx"] = self.store.put(path.read_bytes())
        info = files.read_info()
        reports = {r.parent.name: json.loads(r.read_text()) for r in sorted(run_dir.glob("eval/*/report.json"))}
        metrics = task.card_metrics(info, reports)
        for key in ("cost", "teacher"):  # what an answer costs (measured at training's end); a student's teacher
            if info.get(key):
                metrics[key] = info[key]
        from lepton.tracking.mlflow_tracker import mlflow_link, note_registration

        link = mlflow_link(run_dir)
        if link:
            metrics["mlflow_run"] = link
        fields = dict(
            format="pytorch", source_run=source or str(run_dir.resolve()), artifacts=artifacts,
            labels=files.read_labels(), preprocessing=files.read_preprocessing_dict(),
            config=files.read_config_values(), metrics=metrics,
            data_fingerprint=files.read_data(), threshold=info.get("threshold"),
        )
        version = self.add_version(name, fields, description)
        if link:
            note_registration(run_dir, version.ref, self.card(version.ref))
        return version

    def register_onnx(
        self, path: str | Path, name: str, *, labels: list[str], image_size: int, channels: int = 1,
        mean: list[float] | None = None, std: list[float] | None = None, threshold: float | None = None,
        description: str = "",
    ):
        """Register an ONNX model trained elsewhere with its input spec and labels, so it serves like
        a native one. The graph must take (N, channels, size, size) float input and give (N, classes)."""
        path = Path(path)
        data = path.read_bytes() if path.is_file() else b""
        if not data:
            raise RegistryError(f"{path}: ONNX file not found or empty")
        _check_onnx(path, data, len(labels), channels)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise RegistryError(f"labels must be 2 or more distinct names (got {labels})")
        spec = {"size": [image_size, image_size], "channels": channels, "mean": mean or [0.5] * channels,
                "std": std or [0.5] * channels, "window": None, "slices": "middle"}
        fields = dict(format="onnx", source_run=str(path.resolve()), artifacts={"onnx": self.store.put(data)},
                      labels=list(labels), preprocessing=spec, config={}, metrics={}, data_fingerprint={},
                      threshold=threshold)
        return self.add_version(name, fields, description)

    def load_run(self, ref: str, device: str = "cpu"):
        """Materialise a PyTorch version as a ``lepton.runs.Run`` after verifying every artifact hash."""
        import torch
        import yaml

        from lepton.config import TrainConfig
        from lepton.data.transforms.preprocessing import Preprocessing
        from lepton.rundir import model_from_checkpoint
        from lepton.runs import Run

        v = self.get(ref)
        if v.format == "slide-mil":
            raise RegistryError(f"{v.ref} is a slide model: load it with lepton.registry.slides.load_slide_model")
        if v.format != "pytorch":
            raise RegistryError(f"{v.ref} is an {v.format} model; load it with an ONNX runtime")
        blobs = {k: self.store.get(sha, f"{v.ref} {k}") for k, sha in v.artifacts.items()}
        ckpt = torch.load(io.BytesIO(blobs["weights"]), map_location="cpu", weights_only=True)
        model = model_from_checkpoint(ckpt, device, f"{v.ref} weights")
        config = TrainConfig.from_dict(yaml.safe_load(blobs["config"]))
        info = json.loads(blobs["run"])
        return Run(Path(v.source_run or v.ref), config, Preprocessing.from_dict(v.preprocessing), v.labels,
                   info, model, device)  # the task comes from the config


def _check_onnx(path: Path, data: bytes, num_classes: int, channels: int) -> None:
    try:
        import onnx
    except ModuleNotFoundError:  # pragma: no cover - onnx is a dependency
        return
    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise RegistryError(f"{path}: not a valid ONNX model ({exc})") from exc
    inputs = [i for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]
    if len(inputs) != 1 or len(model.graph.output) < 1:
        raise RegistryError(f"{path}: expected one image input and a class-score output")
    dims = [d.dim_value or None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] not in (None, channels):
        raise RegistryError(f"{path}: input shape {dims} is not (N, {channels}, H, W)")
    out_dims = [d.dim_value or None for d in model.graph.output[0].type.tensor_type.shape.dim]
    if len(out_dims) != 2 or out_dims[1] not in (None, num_classes):
        raise RegistryError(f"{path}: output shape {out_dims} does not match {num_classes} labels")
