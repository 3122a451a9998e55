"""The task contract: everything that differs between tasks, and the table of tasks by name.

A task turns a data set into training targets, network outputs into predictions, and predictions into
metrics, reports, response payloads, Open Inference Protocol tensors and model-card lines. The training
loop, evaluation, the run directory, the registry and the server call these hooks and assume nothing
else about the task. A new task is one module with a ``@register_task`` subclass (see
``lepton.tasks.classification``); it needs no edit anywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from lepton.errors import ConfigError
from lepton.tasks.serving import TaskServing

if TYPE_CHECKING:
    import torch

    from lepton.data.index.dataset import ImageSet
    from lepton.data.index.layout import Layout

Loss = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


class Task(TaskServing):
    """Base class of a task. Subclasses set ``name`` and the selection metric and override the hooks.

    ``outputs`` below are always the task's activated network outputs as float arrays (N, K) — for
    classification the class probabilities — and ``info`` is the run's decision record (``run.json``:
    whatever ``fit_decision`` stored, e.g. a threshold). Inference and serving members (the inferer, encodings,
    capabilities, batch rows) come from ``TaskServing`` (``lepton.tasks.serving``).
    """

    name: ClassVar[str] = ""
    def __init__(self) -> None:
        #: The run's task options (``TrainConfig.task_options``), set by ``get_task``.
        self.options: dict[str, Any] = {}

    #: The validation metric (a key of ``val_metrics``) that picks the best epoch, and its direction.
    selection_metric: ClassVar[str] = "val_loss"
    higher_is_better: ClassVar[bool] = False
    #: The source layouts this task reads (``lepton.data.index.layout``): a source laid out so picks this task when no
    #: task is given, and any other task given for it is refused.
    layouts: ClassVar[tuple[str, ...]] = ()
    #: The kind of registered network this task trains, as ``ModelInfo.kind``: what it takes ("image": 2-D images or
    #: 3-D volumes; "clip": frames over time, or signals) and what it answers ("vector": a row per input; "map": a row
    #: per pixel on the input's grid; "boxes": detector rows).
    network_kind: ClassVar[tuple[str, str]] = ("image", "vector")
    #: Lower serving precisions (bf16, int8; ``lepton.precision``) are checked against fp32 on this validation metric
    #: (a key of ``val_metrics``, higher is better) and refused when it falls more than ``precision_tolerance`` below
    #: fp32's on the version's stored val set (``precision_val_set``); None: versions of this task serve in fp32 only.
    precision_metric: ClassVar[str | None] = None
    precision_tolerance: ClassVar[float] = 0.0
    #: Whether the task learns from unlabelled cases beside labelled ones (``--semi``): its outputs are class scores
    #: along axis 1, so a teacher's answer on one view can guide the network on another (``unlabelled_views``,
    #: ``consistency``).
    semi_supervised: ClassVar[bool] = False

    # -- data -----------------------------------------------------------------------------------------------
    def load(self, source: str | Path, *, window: str | None, slices: str, steps: list[dict] | None,
             skip_bad: bool, validate: bool = True):
        """The task's data set from a source (for classification a labelled ``ImageSet``)."""
        from lepton.data import load_dataset

        return load_dataset(source, window=window, slices=slices, steps=steps, skip_bad=skip_bad,
                            validate=validate)

    def load_cases(self, source: str | Path, *, window: str | None, steps: list[dict] | None, skip_bad: bool,
                   cache_dir: str | None = None, workers: int = 0, quiet: bool = False, slices: str = "middle",
                   image_size: int | None = None):
        """The task's data decoded into the on-disk case cache and held by metadata (``lepton.data.index.cases``,
        ``lepton.data.index.imagecache``), or None when the task reads this source into memory (``load``).
        ``image_size`` (when the run fixes it) lets pixels be stored at the network's size in the same pass."""
        return None

    def memory_estimate(self, source: str | Path, *, window: str | None, slices: str, steps: list[dict] | None,
                        image_size: int | None) -> float | None:
        """GB the in-memory path (``load``) would hold for a source, estimated without reading it whole, so that
        ``data_engine=auto`` keeps small sets in memory without caching them; None (the default): known only from
        the cached cases' metadata."""
        return None

    def inspect(self, source: str, *, window: str | None, slices: str) -> dict[str, Any]:
        """``lepton data inspect``: what is in a source of this task's data, and what is wrong with it."""
        from lepton.data.index.inspection import inspect_source

        return inspect_source(source, window=window, slices=slices)

    def input_size(self, train, config: Any) -> tuple[int, ...] | None:
        """The network's input size for these training data, or None for the default (the config's image size, or
        the data's median size)."""
        return None

    def tensors(self, data, spec) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs in [0, 1] at ``spec``'s size and the training targets, as tensors."""
        import torch

        return spec.resize(data.images), torch.from_numpy(self.targets(data))

    def fit_inputs(self, train, spec) -> None:
        """Fit what the inputs need beyond images on the training split, into ``spec.options`` (saved with the run):
        a sequence task's covariate schema. Called once, before ``side_inputs``."""

    def side_inputs(self, data, spec) -> torch.Tensor | None:
        """Per-sample inputs beside the images (N, F) — clinical covariates — passed to the network as its second
        argument in training, validation and prediction; None (the default) when the network takes images only.
        ``data`` is a data set, or (prediction, serving) a list with one mapping of values by name per input."""
        return None

    def model_options(self, spec) -> dict[str, Any]:
        """Extra arguments of ``create_model`` for this run's network (saved in its spec): e.g. how many covariates
        it fuses."""
        return {}

    def read(self, path: str | Path, spec) -> list[tuple[str, np.ndarray]]:
        """A file to predict on as (name, decoded input) pairs, read as training read its data (``Run.predict``)."""
        from lepton.data.readers.io import read_image

        out = []
        for frame in read_image(path, window=spec.window, slices=spec.slices, steps=spec.steps):
            name = str(path) if frame.name == Path(path).name else f"{path}{frame.name[len(Path(path).name):]}"
            out.append((name, frame.pixels))
        return out

    def answer_file(self, run, path: str | Path, output: str | Path | None = None,
                    dicom_seg: bool = False) -> list[dict[str, Any]] | None:
        """The answers (one dict per frame, with ``path``) for a file this task predicts other than frame by frame
        at the network's input size (``Run.predict``; ``run`` is the loaded run), with its files (``encodings``)
        written to the folder ``output`` if given; None (the default): read it with ``read`` and batch its frames
        with the other files'."""
        return None

    def read_bytes(self, data: bytes, name: str, spec) -> np.ndarray | None:
        """An uploaded file decoded as ``read`` decodes a path, for the server; None (the default): the server's own
        image decoding."""
        return None

    def batch(self, x: torch.Tensor, y: torch.Tensor, spec, generator: torch.Generator):
        """A training batch as the network sees it (segmentation cuts patches of ``spec.size`` from larger cases)."""
        return x, y

    def augment(self, x: torch.Tensor, y: torch.Tensor, options: dict[str, float], generator: torch.Generator):
        """A training batch (images in [0, 1]) augmented as ``options`` say
        (``lepton.data.transforms.preprocessing``), with targets
        that depend on the geometry (boxes, masks) moved along; returns ``(x, y)``. The loop calls it on ``batch``'s
        output."""
        from lepton.data.transforms.preprocessing import augment_batch

        return augment_batch(x, options, generator), y

    def prepare_model(self, model, y_train, spec, config: Any) -> None:
        """Fit data-dependent parts of a new network to the training targets before training (detection: its anchor
        shapes); nothing by default."""

    # -- training -----------------------------------------------------------------------------------------
    def num_outputs(self, label_names: list[str]) -> int:
        """How many outputs the network needs."""
        raise NotImplementedError

    def targets(self, data: ImageSet) -> np.ndarray:
        """The training target per image of a data set (class index, value, …)."""
        raise NotImplementedError

    def criterion(self, y_train: torch.Tensor, config: Any) -> Loss:
        """The training loss ``loss(logits, y)``, set up from the training targets and the config."""
        return self.loss

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The plain loss on raw network outputs (adversarial attacks and fine-tuning ascend or descend it)."""
        raise NotImplementedError

    def sample_weights(self, y_train: torch.Tensor, config: Any) -> torch.Tensor | None:
        """Per-sample drawing weights for the epoch order, or None for a plain shuffle."""
        return None

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Raw network outputs → the task's outputs (probabilities, values); averaged under flip TTA."""
        return logits

    def with_calibration(self, record: Mapping[str, Any]) -> Task:
        """A copy of this task whose ``activate`` applies a probability recalibration (``lepton.tasks.calibration``)
        fitted at a local site; tasks without calibrated probabilities refuse."""
        raise ConfigError(f"the {self.name} task has no probability recalibration")

    def val_metrics(self, y: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
        """Per-epoch validation figures; must hold ``val_loss`` and ``selection_metric``."""
        raise NotImplementedError

    def fit_decision(self, y_val: np.ndarray, outputs: np.ndarray) -> dict[str, Any]:
        """Decision parameters chosen on validation after training (stored in ``run.json``)."""
        return {}

    # -- serving precisions (``lepton.precision``) -----------------------------------------------------------
    def precision_val_set(self, x_val, y_val, x_train, spec, seed: int = 0) -> dict[str, np.ndarray] | None:
        """The arrays a run stores (``val_set.npz``) for checking lower precisions: a bounded subset of the val
        inputs (in [0, 1], before normalisation) with their targets, and ``x_calib``, training inputs at the network's
        size for int8 calibration; None (the default) when the task's precisions are not checked."""
        return None

    def precision_outputs(self, val: Mapping[str, np.ndarray], predictor, spec) -> tuple[Any, Any]:
        """The targets and the task's outputs on a stored val set (``precision_val_set``), the network run by
        ``predictor`` in the precision under check: ``predictor.batch(x)`` for a normalised batch at the network's
        size, ``predictor.image(pixels)`` for one image in [0, 1] at its own size (sliding windows). ``val_metrics``
        of the pair holds ``precision_metric``."""
        raise NotImplementedError

    # -- predictions ----------------------------------------------------------------------------------------
    def decide(self, outputs: np.ndarray, info: Mapping[str, Any]) -> np.ndarray:
        """One decision per row: a class index, a value, …"""
        raise NotImplementedError

    def encode(self, row: np.ndarray, labels: list[str], info: Mapping[str, Any]) -> dict[str, Any]:
        """The JSON answer for one image (``lepton predict``, the native HTTP API, the SDK)."""
        raise NotImplementedError

    def label(self, row: np.ndarray, labels: list[str], info: Mapping[str, Any]) -> str | None:
        """A short categorical answer for metrics and logs, or None when the task has none."""
        return None

    def agrees(self, a: np.ndarray, b: np.ndarray, labels: list[str], info: Mapping[str, Any]) -> bool:
        """Whether two outputs for one image give the same answer (shadow traffic is scored by it)."""
        la, lb = self.label(a, labels, info), self.label(b, labels, info)
        if la is not None:
            return la == lb
        return bool(np.allclose(a, b, rtol=0.05, atol=1e-3))

    def explain_index(self, row: np.ndarray, info: Mapping[str, Any]) -> int:
        """The network output a saliency map explains by default."""
        return int(np.argmax(row))

    # -- semi-supervised training ---------------------------------------------------------------------------
    def unlabelled_views(self, x: torch.Tensor, weak: dict[str, float], strong: dict[str, float],
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """An unlabelled batch in [0, 1] as two views: the weak one the guide (teacher, pseudo-labeller) sees and the
        strong one the network learns on. By default two independent augmentations: the answer of a task that scores
        whole images does not move with the image."""
        from lepton.data.transforms.preprocessing import augment_batch

        return augment_batch(x, weak, generator), augment_batch(x, strong, generator)

    def consistency(self, student: torch.Tensor, guide: torch.Tensor, method: str,
                    threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The unlabelled loss between the network's raw outputs on the strong view and the guide's on the weak view
        (class scores on axis 1: (N, K), or (N, K, …) on the input's grid, where every pixel counts on its own), and
        the fraction of outputs it counts. ``fixmatch``: cross-entropy to the guide's arg-max where its probability
        reaches ``threshold``; ``mean-teacher``: squared difference of the class probabilities."""
        import torch

        target = torch.softmax(guide.float(), dim=1)
        student = student.float()
        if method == "fixmatch":
            confidence, pseudo = target.max(dim=1)
            mask = (confidence >= threshold).float()
            loss = (torch.nn.functional.cross_entropy(student, pseudo, reduction="none") * mask).mean()
            return loss, mask.mean()
        loss = ((torch.softmax(student, dim=1) - target) ** 2).sum(dim=1).mean()
        return loss, torch.ones((), device=student.device)

    # -- evaluation -----------------------------------------------------------------------------------------
    def scores(self, y: np.ndarray, outputs: np.ndarray, info: Mapping[str, Any]) -> dict[str, float]:
        """Headline figures under the decision rule in ``info`` (robustness and export tables compare them)."""
        raise NotImplementedError

    def report(self, y: np.ndarray, outputs: np.ndarray, labels: list[str], info: Mapping[str, Any], *,
               n_bootstrap: int, plots: Path | None) -> tuple[dict[str, Any], list[str]]:
        """The evaluation report's body (JSON-ready, with ``summary``: a few headline lines for the terminal) and
        its Markdown lines; figures go to the folder ``plots`` if given."""
        raise NotImplementedError

    def headline(self, report: Mapping[str, Any]) -> tuple[str, float, list[float] | None]:
        """An evaluation report's headline figure as (name, value, 95 % CI or None): what the distillation report
        sets the teacher and the student side by side on."""
        raise NotImplementedError

    # -- distillation (lepton.distill) -----------------------------------------------------------------------
    def distill_targets(self, y_train: Any, teacher: Any, temperature: float) -> Any:
        """The targets a student trains on: the labels ``y_train`` beside the teacher's outputs (a tensor of rows,
        or a folder of per-case soft masks: ``teacher_outputs``), indexable by a batch's indices as ``y_train`` is."""
        raise ConfigError(f"the {self.name} task has no distillation (classification and segmentation runs have)")

    def distill_loss(self, hard_loss: Loss, temperature: float, alpha: float) -> Loss:
        """The student's loss on ``distill_targets``: the teacher's outputs at ``temperature`` (weight ``alpha``)
        and the task's own loss ``hard_loss`` on the labels."""
        raise ConfigError(f"the {self.name} task has no distillation (classification and segmentation runs have)")

    def distill_batch(self, targets: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """One augmented batch's ``targets`` with the teacher's outputs on that very batch (as the student sees it)
        in place of the cached ones: consistent teaching."""
        raise ConfigError(f"the {self.name} task has no distillation (classification and segmentation runs have)")

    # — training and evaluation — what the loop, evaluation, clinical validation, labelling and distillation ask ----
    #: How an input reaches the network's size (``Preprocessing.fit``): "resize" (interpolated), or "pad" (padded or
    #: cropped, never interpolated, so that the outputs lie on the input's own grid).
    input_fit: ClassVar[str] = "resize"
    #: What one evaluated row is in subgroup tables and their bootstrap CIs: "image", or "case" (a volume or image
    #: scored as a whole, e.g. by its Dice).
    unit: ClassVar[str] = "image"
    #: What a person labelling a case gives (``lepton label``): "class" (a class name), "mask" (a label map) or "boxes";
    #: None: the task has no labelling rounds (``suggest`` refuses it; imported labels are read as class names).
    annotation: ClassVar[str | None] = None
    #: Whether evaluation writes ``predictions.csv`` (each image's true class and class probabilities), which the
    #: validation report reads back for its failure cases (the most confident wrong answers, with Grad-CAM).
    prediction_table: ClassVar[bool] = False
    #: How a distillation teacher's outputs are kept for its student: "rows" (one per image, in memory; unlabelled
    #: images may join the labelled ones) or "cases" (one soft-mask file per training case on disk, read per batch).
    teacher_outputs: ClassVar[str] = "rows"

    def binary_test(self, labels: list[str]) -> bool:
        """Whether a run with these labels answers a binary test with one probability per image (outputs (N, 2), the
        second class's probability the test's score): then the clinical analyses apply — decision curve, operating
        points, calibration and its recalibration, Fairlearn's view of the subgroups."""
        return False

    def load_unlabelled(self, source: str | Path, *, window: str | None, slices: str, steps: list[dict] | None):
        """An unlabelled pool (``lepton.data.readers.unlabelled.UnlabelledSet``) read as this task reads its labelled
        cases (``slices`` the run's)."""
        from lepton.data.readers.unlabelled import load_unlabelled

        return load_unlabelled(source, window=window, slices=slices, steps=steps)

    def evaluation_outputs(self, run, data) -> tuple[Any, dict[str, Any]]:
        """A run's outputs on an evaluated data set (``lepton.evaluate``; ``run`` the loaded run) and the extra keyword
        arguments of ``report``: by default ``run.predict_proba`` of the images with their side inputs."""
        return run.predict_proba(data.images, self.side_inputs(data, run.preprocessing)), {}

    def unit_scores(self, body: Mapping[str, Any], labels: list[str]) -> tuple[str, np.ndarray] | None:
        """A figure per evaluated unit, read from a report's ``body`` (``report``), that subgroup tables average: its
        name and values (a case's mean foreground Dice); None (the default): subgroup tables recompute ``scores`` on
        each bootstrap resample."""
        return None

    # -- protocols and the registry --------------------------------------------------------------------------
    def oip_outputs(self, labels: list[str], size: list[int] | None = None) -> list[dict[str, Any]]:
        """Open Inference Protocol v2 output metadata: ``name``, ``datatype``, ``shape`` (batch axis -1); ``size``, the
        input's spatial size, for outputs on the input's grid ("sliding_window" tasks)."""
        raise NotImplementedError

    def oip_tensors(self, outputs: np.ndarray, labels: list[str], info: Mapping[str, Any]) -> dict[str, Any]:
        """The output tensors for a batch by name: ``{name: (OIP datatype, array)}``; BYTES as an object array
        of ``str``. The server encodes them as JSON or binary tensor data, as the client asks."""
        raise NotImplementedError

    def card_metrics(self, info: Mapping[str, Any], reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """What the registry keeps of a run's validation record and its evaluation reports (by folder)."""
        return {k: v for k, v in info.items() if k.startswith("val_")}

    def card_text(self, labels: list[str], channels: int, threshold: float | None,
                  metrics: Mapping[str, Any]) -> dict[str, list[str]]:
        """Model-card lines: ``use`` (intended use), ``decision`` (the rule) and ``metrics``."""
        return {"use": [f"A {self.name} model on {channels}-channel images."], "decision": [],
                "metrics": [f"- {k}: {v}" for k, v in metrics.items()]}


_TASKS: dict[str, type[Task]] = {}
#: The built-in tasks' modules, imported (and so registered) the first time a task is looked up.
BUILTIN = ("classification", "detection", "segmentation", "sequence")


def _registered() -> dict[str, type[Task]]:
    """The task table, with the built-in tasks' modules imported first (their ``@register_task`` fills it)."""
    if not all(name in _TASKS for name in BUILTIN):
        from importlib import import_module

        for name in BUILTIN:
            import_module(f"lepton.tasks.{name}")
    return _TASKS


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a Task subclass available by its ``name`` (``--task NAME``, run configs)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    _TASKS[cls.name] = cls
    return cls


def get_task(name: str | None, options: Mapping[str, Any] | None = None) -> Task:
    """A task instance by name (None or empty means classification, the default of older runs), holding the run's
    task ``options``."""
    key = name or "classification"
    tasks = _registered()
    if key not in tasks:
        raise ConfigError(f"unknown task {key!r}; available: {', '.join(sorted(tasks))}")
    task = tasks[key]()
    task.options = dict(options or {})
    return task


def list_tasks() -> list[str]:
    return sorted(_registered())


def choose_task(source: str | Path, task: str | None = None) -> tuple[str, Layout]:
    """The task for a data source, and the layout that chose it.

    The source's layout (``lepton.data.index.layout.detect_layout``) picks the task that declares it in ``layouts``. An
    explicit ``task`` is kept when it reads that layout, and refused naming both when the layout says otherwise, so
    that a Decathlon folder is never trained as a classifier of images against label maps.
    """
    from lepton.data.index.layout import detect_layout

    layout = detect_layout(source)
    readers = [name for name, cls in sorted(_registered().items()) if layout.name in cls.layouts]
    if task:
        chosen = get_task(task)
        if layout.name in chosen.layouts or not chosen.layouts or (not readers and layout.task == chosen.name):
            return chosen.name, layout
        wanted = readers[0] if readers else layout.task
        raise ConfigError(f"--task {chosen.name} contradicts the data: {source} holds {layout.evidence}, which is "
                          f"{wanted} data; drop --task (or give --task {wanted}), or point Lepton at "
                          f"{chosen.name} data")
    if not readers:
        raise ConfigError(f"{source} holds {layout.evidence}: that is {layout.task} data, and Lepton has no "
                          f"{layout.task} task yet (tasks: {', '.join(list_tasks())})")
    return readers[0], layout


def inspect_data(source: str, *, task: str | None = None, window: str | None = None,
                 slices: str = "middle") -> dict[str, Any]:
    """What is in a data source, read as the task its layout picks (or ``task``): the task and its evidence first,
    then the task's own summary (``Task.inspect``)."""
    name, layout = choose_task(source, task)
    result = get_task(name).inspect(source, window=window, slices=slices)
    return {"task": name, "layout": layout.name, "evidence": layout.evidence, **result}
