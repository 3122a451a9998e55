"""Model adapters: a small class with setup / decode_request / predict / encode_response hooks for one
registered version. What the outputs mean is the version's task's business (``lepton.tasks``); batching,
auth and metrics wrap an adapter and never reach into it."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from lepton.data.readers.io import Frame, read_image_bytes
from lepton.data.transforms.preprocessing import Preprocessing
from lepton.errors import DataError
from lepton.tasks import Task, get_task

#: Largest decoded input accepted by the server, in pixels per image (all frames): 4096 x 4096.
MAX_SERVE_PIXELS = 4096 * 4096


class ModelAdapter:
    """Turns request payloads into the task's outputs (probabilities for classification) for one version."""

    platform = "python"

    #: The numeric precision this version runs in (``lepton.precision``); its checked record, if any.
    precision = "fp32"
    precision_record: dict[str, Any] | None = None
    #: The version's measured inference cost (``lepton.cost``), recorded when it was trained.
    cost: dict[str, Any] | None = None
    #: Whether this backend computes saliency maps (``explain``): the PyTorch one does, ONNX Runtime does not.
    explains = False
    #: Volumes answered whole on their own grid by the task (its "frame_answer": ``answer_frame``, detection's sliding
    #: windows at the scale of training) with the run's code, outside the batchers, as ``lepton predict`` answers them.
    whole_frames = False

    def __init__(self, name: str, version: int, labels: list[str], preprocessing: Preprocessing,
                 threshold: float | None, task: Task):
        self.name, self.version, self.labels = name, version, labels
        self.preprocessing, self.threshold, self.task = preprocessing, threshold, task
        self.info = {"threshold": threshold}  # the decision record the task reads
        #: The task's network slides over each input at its own size (``Task.inferer``): requests are answered on
        #: their own grid (``segment``) through a window batcher, not resized into the fixed-size batcher.
        self.on_grid = task.on_grid
        #: The covariates this version fuses with the image (their fitted schema), or None.
        self.covariates = None
        if preprocessing.options.get("covariates"):
            from lepton.data.readers.covariates import CovariateSchema

            self.covariates = CovariateSchema.from_dict(preprocessing.options["covariates"])

    def use_precision(self, precision: str, record: dict[str, Any] | None) -> None:
        """Run in ``precision`` with the decision threshold selected on val for it."""
        self.precision, self.precision_record = precision, record
        if record is not None and record.get("threshold") is not None:
            self.threshold = record["threshold"]
            self.info = {"threshold": self.threshold}

    def cost_info(self) -> dict[str, Any] | None:
        """The version's cost record with the figures of the precision it is served in (int8: the throughput its
        precision check measured at batch 64)."""
        if not self.cost:
            return None
        served = dict(self.cost.get("precisions", {}).get(self.precision) or {})
        if not served and (self.precision_record or {}).get("images_per_s"):
            served = {"images_per_s_b64": self.precision_record["images_per_s"]}
        return {**self.cost, "served": {"precision": self.precision, "platform": self.platform, **served}}

    @classmethod
    def _fields(cls, v) -> tuple:
        return (v.name, v.version, v.labels, Preprocessing.from_dict(v.preprocessing), v.threshold,
                get_task(v.config.get("task"), v.config.get("task_options")))

    def setup(self) -> None:
        """Load weights and warm up (called once, off the event loop)."""

    @property
    def volumes(self) -> bool:
        """Whether this model takes volumes (C, D, H, W) rather than images (C, H, W)."""
        return self.preprocessing.spatial_dims == 3

    def decode_request(self, payload: bytes, filename: str | None = None) -> np.ndarray | Frame:
        """Decode an uploaded file (sniffed by content) to (C, H, W) in [0, 1]: PNG, JPEG, DICOM, NIfTI, NPY; for a
        volume model (C, D, H, W) from NIfTI, a zip of one DICOM series, or NPY. A model answering on the input's grid
        (``on_grid``) gets the ``Frame`` as read (its geometry kept, the run's steps not yet applied): its answer goes
        back on that grid."""
        name = "upload" + (".nii.gz" if (filename or "").lower().endswith(".nii.gz") else Path(filename or "").suffix)
        own = self.task.read_bytes(payload, name[:20], self.preprocessing)
        if own is not None:  # a task with its own reader (clips)
            return own
        frames = read_image_bytes(payload, name[:20], window=self.preprocessing.window,
                                  slices="volume" if self.volumes else "middle", max_pixels=MAX_SERVE_PIXELS,
                                  steps=None if self.on_grid else self.preprocessing.steps)
        pixels = frames[0].pixels
        if int(np.prod(pixels.shape[1:])) > MAX_SERVE_PIXELS:
            raise DataError(f"upload: {'x'.join(map(str, pixels.shape[1:]))} is over the server's limit of "
                            f"{MAX_SERVE_PIXELS} pixels")
        return frames[0] if self.on_grid or self.whole_frames else pixels

    def decode_array(self, array: Any) -> np.ndarray:
        """A nested list or array in [0, 1]: (H, W) or (C, H, W); for a volume model (D, H, W) or (C, D, H, W)."""
        try:
            arr = np.asarray(array, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise DataError(f"array: not a numeric nested list ({exc})") from exc
        dims = self.preprocessing.spatial_dims
        if arr.ndim == dims:
            arr = arr[None]
        if arr.ndim != dims + 1 or arr.shape[0] not in (1, 3) or min(arr.shape[1:]) < 1:
            wanted = "(D, H, W) or (C, D, H, W)" if dims == 3 else "(H, W) or (C, H, W)"
            raise DataError(f"array: shape {list(arr.shape)} is not {wanted} with C in 1 or 3")
        if int(np.prod(arr.shape[1:])) > MAX_SERVE_PIXELS:
            raise DataError("array: too many pixels")
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise DataError("array: values must be finite and within [0, 1]")
        if self.on_grid:
            if self.preprocessing.steps and self.volumes:
                raise DataError("array: has no voxel geometry for this model's preprocessing steps; send a NIfTI "
                                "file or a zipped DICOM series")
            return Frame(arr, "array", "array")
        return Frame(arr, "array", "array") if self.whole_frames else arr

    def attach(self, pixels: np.ndarray, covariates: dict[str, Any] | None) -> np.ndarray | tuple:
        """A decoded input with the request's covariates encoded beside it, ``(pixels, features)``, for a version
        that fuses them; the pixels alone for one that does not (covariates sent to it are a DataError)."""
        if self.covariates is None:
            if covariates:
                raise DataError(f"covariates: {self.name}@{self.version} takes none (it reads the image alone)")
            return pixels
        return pixels, self.task.side_inputs([covariates], self.preprocessing)[0].numpy()

    def prepare(self, images: list) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Resize, convert channels and normalise a batch: float32 (N, C, H, W); inputs with covariates
        (``attach``) as ``(images, covariate features)``."""
        if images and isinstance(images[0], tuple):
            return (self.preprocessing([p for p, _ in images]).numpy(),
                    np.stack([e for _, e in images]).astype(np.float32))
        return self.preprocessing(images).numpy()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """The task's outputs (N, K) for a prepared batch."""
        raise NotImplementedError

    def label(self, outputs: np.ndarray) -> str | None:
        """The task's short answer for one image's outputs (metrics and logs), if it has one."""
        return self.task.label(outputs, self.labels, self.info)

    def encode_response(self, outputs: np.ndarray) -> dict[str, Any]:
        return self.task.encode(outputs, self.labels, self.info)

    def segment(self, frame: Frame, windows=None, sw_batch_size: int = 2) -> np.ndarray:
        """The task's outputs (K, …) for one decoded frame, on its own grid (sliding windows, the run's steps
        applied and undone). ``windows``: a callable from a batch of normalised windows to their activated outputs
        (the server's window batcher, shared by requests) instead of this adapter's own forward pass."""
        from lepton.runs import segment_image

        model, activate = self._segment_model(), self._segment_activation()
        if windows is not None:
            model, activate = windows, lambda outputs: outputs
        return segment_image(model, self.preprocessing, frame.pixels, frame.affine, activate, tta=self._tta,
                             sw_batch_size=sw_batch_size)

    def prepare_windows(self, windows: list[np.ndarray]) -> np.ndarray:
        """Sliding windows of any number of requests (each (C, …) at the network's size, normalised) as a batch."""
        return np.stack(windows).astype(np.float32, copy=False)

    def predict_windows(self, batch: np.ndarray) -> np.ndarray:
        """The task's activated outputs (N, K, …) for a batch of windows: one forward pass (flip TTA is the
        caller's, as two windows)."""
        import torch

        from lepton.models.layout import fast_layout

        model, activate = self._segment_model(), self._segment_activation()
        if hasattr(model, "eval"):
            model.eval()
        with torch.inference_mode():
            return activate(model(fast_layout(torch.from_numpy(batch)))).float().numpy()

    def segment_response(self, frame: Frame, probs: np.ndarray) -> dict[str, Any]:
        """The answer on the input's grid (``Task.encode_grid``: for segmentation sizes and lesions) with, for a task
        that has them, its label map as a base64 file (``Task.label_map``: NIfTI with the input's affine for volumes,
        a PNG of class indices for images)."""
        import base64

        body = self.task.encode_grid(probs, self.labels, frame.affine)
        if "label_map" in self.task.encodings:
            data, fmt = self.task.label_map(probs, frame.affine)
            body["label_map"] = {"format": fmt, "encoding": "base64", "data": base64.b64encode(data).decode()}
        return body

    def dicom_seg(self, upload: bytes, frame: Frame, probs: np.ndarray) -> bytes:
        """A DICOM SEG of the answer (``Task.dicom_seg``) that references the uploaded series (a zip of one DICOM
        series)."""
        import tempfile

        from lepton.data.readers.archive import unpacked
        from lepton.data.readers.io import sniff_bytes

        if sniff_bytes(upload[:352], "upload.zip") != "zip" or frame.affine is None:
            raise DataError("dicom_seg: a DICOM SEG references its source images; upload the series as a zip")
        with unpacked(io.BytesIO(upload), "upload") as folder, tempfile.TemporaryDirectory() as out:
            path = self.task.dicom_seg(probs, frame.affine, folder, self.labels, Path(out) / "seg.dcm",
                                       algorithm=self.name[:64], version=str(self.version))
            return path.read_bytes()

    _tta = False

    def _segment_model(self):
        raise NotImplementedError

    def _segment_activation(self):
        return self.task.activate


class TorchAdapter(ModelAdapter):
    """A registered PyTorch version, run with the run's own preprocessing and TTA setting."""

    platform = "pytorch"
    explains = True

    def __init__(self, registry, ref: str):
        v = registry.get(ref)
        super().__init__(*self._fields(v))
        self._registry, self._ref, self.run = registry, f"{v.name}@{v.version}", None
        self.cost = v.metrics.get("cost")
        self.whole_frames = self.volumes and "frame_answer" in self.task.capabilities

    def setup(self) -> None:
        self.run = self._registry.load_run(self._ref)
        self.task = self.run.task  # with the version's recalibration, if it has one
        self.predict(self.prepare([np.zeros((self.preprocessing.channels, *self.preprocessing.size), np.float32)]))

    def predict(self, batch: np.ndarray | tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        from lepton.precision import torch_outputs

        if isinstance(batch, tuple):  # images with covariates: the network's second input (fp32)
            import torch

            from lepton.runs import predict_outputs

            x, e = (torch.from_numpy(np.ascontiguousarray(a, np.float32)) for a in batch)
            return predict_outputs(self.run.model, x, self.task.activate, tta=self.run.config.tta, extras=e)
        return torch_outputs(self.run.model, batch, self.task.activate, self.run.config.tta, self.precision)

    def _segment_model(self):
        """The network for sliding windows, in the precision it is served in (bf16: under autocast)."""
        from lepton.models.precision import in_precision

        self._tta = self.run.config.tta
        return in_precision(self.run.model, self.precision)

    def explain(self, pixels: np.ndarray, method: str, class_idx: int) -> dict[str, bytes]:
        """Grad-CAM PNGs for one decoded image — a montage of slices for a volume —: ``overlay`` (blended),
        ``image`` and ``heatmap`` (the layers, for a viewer's own opacity); run outside the batcher, in the caller's
        thread."""
        import torch

        from lepton.explain import layer_pngs, montage_png, overlay_png, saliency_maps

        with torch.enable_grad():  # executor threads may have autograd off
            maps, _ = saliency_maps(self.run, [pixels], method=method, class_idx=class_idx)
        shown = self.preprocessing.resize([pixels]).mean(1).numpy()[0]
        overlay = overlay_png(shown, maps[0]) if maps[0].ndim == 2 else montage_png(shown, maps[0])
        image, heatmap = layer_pngs(shown, maps[0])
        return {"overlay": overlay, "image": image, "heatmap": heatmap}


class OnnxAdapter(ModelAdapter):
    """A registered ONNX version (foreign, or exported by Lepton) run with ONNX Runtime."""

    platform = "onnxruntime_onnx"

    def __init__(self, registry, ref: str, onnx_sha: str | None = None):
        v = registry.get(ref)
        super().__init__(*self._fields(v))
        self._registry, self._sha, self.session = registry, onnx_sha or v.artifacts["onnx"], None
        self._foreign = v.format == "onnx"  # trained elsewhere: its output may be logits or probabilities
        self.cost = v.metrics.get("cost")
        self._tta = bool((v.config or {}).get("tta"))  # dense answers flip as the run did

    def setup(self) -> None:
        import onnxruntime as ort

        data = self._registry.store.get(self._sha, f"{self.name}@{self.version} onnx")
        self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name
        from lepton.export import run_around  # a graph of head maps (detection): the run's code answers around it
        self.run = run_around(self.session, lambda: self._registry.load_run(f"{self.name}@{self.version}"))
        self.whole_frames = self.run is not None and self.volumes and "frame_answer" in self.task.capabilities

    def _segment_model(self):
        import torch

        return lambda x: torch.from_numpy(self.session.run(None, {self._input: np.ascontiguousarray(x.numpy())})[0])

    def _segment_activation(self):
        return lambda outputs: outputs  # exported with the task's activation in the graph

    def predict(self, batch: np.ndarray) -> np.ndarray:
        from lepton.precision import onnx_outputs, torch_outputs

        if self.run is not None:  # the run's decoding (flip TTA included) around the session's head maps
            return torch_outputs(self.run.model, batch, self.task.activate, self.run.config.tta, "fp32")
        if not self._foreign and not self.on_grid:  # Lepton's export: probabilities, the run's flip TTA
            out = onnx_outputs(self.session, batch, self._tta, chunk=len(batch) or 1)
            if out.ndim != 2 or out.shape[1] != self.task.num_outputs(self.labels):
                raise RuntimeError(f"{self.name}@{self.version}: ONNX output shape {out.shape} does not fit the labels")
            return out
        out = self.session.run(None, {self._input: batch.astype(np.float32)})[0]
        grid = self.on_grid and out.ndim == batch.ndim
        if (out.ndim != 2 and not grid) or out.shape[1] != self.task.num_outputs(self.labels):
            raise RuntimeError(f"{self.name}@{self.version}: ONNX output shape {out.shape} does not fit the labels")
        if not self._foreign:  # exported by Lepton with the task's activation in the graph
            return out
        sums = out.sum(1, keepdims=True)
        if np.all(out >= 0) and np.allclose(sums, 1, atol=1e-3):
            return out
        e = np.exp(out - out.max(1, keepdims=True))  # logits → probabilities
        return e / e.sum(1, keepdims=True)


def make_adapter(registry, ref: str, backend: str = "auto", precision: str = "fp32") -> ModelAdapter:
    """The adapter for a version: PyTorch weights, or ONNX (foreign models, or ``backend='onnx'``), in ``precision``
    (fp32, bf16, int8 or auto; a lower one only once checked on the version's val set, see ``lepton.precision``)."""
    v = registry.get(ref)
    if v.format == "onnx":
        if precision not in ("fp32", "auto"):
            raise DataError(f"{v.ref} is a foreign ONNX model: it is served as registered (fp32); drop --precision")
        return OnnxAdapter(registry, ref)
    chosen, record = "fp32", None
    if precision != "fp32":
        from lepton.precision import choose_precision

        chosen, record = choose_precision(registry, ref, precision, backend)
        v = registry.get(ref)  # a first check stored its record (and an int8 graph)
    if chosen == "int8":
        adapter: ModelAdapter = OnnxAdapter(registry, ref, v.artifacts["onnx_int8"])
    elif backend == "onnx":
        if "onnx" not in v.artifacts:
            raise DataError(f"{v.name}@{v.version} has no ONNX artifact; register it with "
                            "`lepton models register RUN --name NAME --onnx` to serve it with --backend onnx")
        adapter = OnnxAdapter(registry, ref, v.artifacts["onnx"])
    else:
        adapter = TorchAdapter(registry, ref)
    adapter.use_precision(chosen, record)
    return adapter
