"""Export and shrink trained runs: ONNX and TorchScript, int8 quantization, magnitude pruning,
and a comparison of size, latency, throughput and accuracy against the fp32 PyTorch model."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from lepton.errors import ConfigError
from lepton.models.layout import fast_layout
from lepton.utils import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from lepton.runs import Run

FORMATS = ("onnx", "torchscript")
#: Exported models must reproduce PyTorch's probabilities within this absolute tolerance.
PARITY_ATOL = 1e-4
#: The ONNX metadata key naming what a graph answers when it is not the task's outputs: "heads" — a network's
#: layers only, its answers decoded around the session by the network's own code (``BoxDetector.use_graph``).
GRAPH_KEY = "lepton_graph"


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=1)


class WithActivation(nn.Module):
    """The network followed by its task's activation: exported models output what the task predicts
    (class probabilities for classification)."""

    def __init__(self, model: nn.Module, activate: Callable[[torch.Tensor], torch.Tensor] = _softmax):
        super().__init__()
        self.model, self.activate = model, activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.model(x))


Activation = Callable[[torch.Tensor], torch.Tensor]


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path, opset: int = 17,
                activate: Activation = _softmax, output_name: str = "probabilities",
                spatial_axes: bool = False) -> Path:
    """Write an ONNX graph with a dynamic batch axis: input ``input`` (N, C, H, W), output ``output_name``
    (the task's activated outputs; class probabilities by default). ``spatial_axes``: outputs (N, K, …) on the
    input's grid (a task whose inferer slides over inputs at their own size), so the input and the output also get
    dynamic spatial axes (any size the network's divisor allows).

    A network whose answer is decoded around its layers declares the graph to write instead, ``onnx_graph()`` →
    (module, output names) (detection: the head maps of one window of the network's size, anchors and NMS outside),
    and the file's metadata names it (``GRAPH_KEY``: "heads") so that a server runs the network's own decoding around
    the session (``run_around``) rather than reading its outputs as answers."""
    graph = getattr(model, "onnx_graph", None)
    if graph is not None:
        wrapped, names = graph()
        wrapped = wrapped.eval().float()
    else:
        wrapped, names = WithActivation(model, activate).eval().float(), [output_name]
    example = torch.zeros(1, *input_shape)
    axes_in = {0: "batch"}
    axes_out: dict[str, dict[int, str]] = {n: {0: "batch"} for n in names}
    if spatial_axes:
        for i in range(len(input_shape) - 1):
            axes_in[2 + i] = f"spatial{i}"
            for n in names:
                axes_out[n][2 + i] = f"spatial{i}" if graph is None else f"{n}_spatial{i}"
    buf = io.BytesIO()
    torch.onnx.export(wrapped, (example,), buf, input_names=["input"], output_names=names,
                      dynamic_axes={"input": axes_in, **axes_out}, opset_version=opset, dynamo=False)
    data = buf.getvalue()
    if graph is not None:
        import onnx

        proto = onnx.load_from_string(data)
        onnx.helper.set_model_props(proto, {GRAPH_KEY: "heads"})
        data = proto.SerializeToString()
    atomic_write_bytes(path, data)
    return path


def run_around(session, load_run: Callable[[], Run]) -> Run | None:
    """The run whose own decoding answers around ONNX Runtime ``session`` when the session's graph is a network's
    head maps (``GRAPH_KEY`` "heads", ``export_onnx``): ``load_run()`` with its network's layers replaced by the
    session (``use_graph``), so its answers — a volume's sliding windows, flip TTA, NMS — are computed as in PyTorch;
    None for a graph that answers the task's outputs itself."""
    if not _heads(session):
        return None
    run = load_run()
    _use_session(run.model, session)
    return run


def _heads(session) -> bool:
    return session.get_modelmeta().custom_metadata_map.get(GRAPH_KEY) == "heads"


def _use_session(model: nn.Module, session) -> None:
    name = session.get_inputs()[0].name
    model.use_graph(lambda x: session.run(None, {name: np.ascontiguousarray(x, np.float32)}))


def export_torchscript(model: nn.Module, input_shape: tuple[int, int, int], path: Path,
                       activate: Activation = _softmax) -> Path:
    wrapped = WithActivation(model, activate).eval().float()
    with torch.no_grad():
        traced = torch.jit.trace(wrapped, torch.zeros(2, *input_shape))
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def quantize_onnx(src: Path, dst: Path, calibration: np.ndarray) -> Path:
    """Static int8 quantization (QDQ, per-channel weights) with ONNX Runtime, calibrated on ``calibration``:
    convolutions and matrix products in int8 (VNNI / AMX-INT8 where the CPU has them), the output layer and the
    final activation kept in float — quantized probabilities (steps of 1/255) would tie close cases and lose AUC."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calibration[i:i + 32]} for i in range(0, len(calibration), 32)])

        def get_next(self):
            return next(self.batches, None)

    prepared, tmp = dst.with_suffix(".prep.onnx"), dst.with_suffix(".tmp.onnx")
    try:
        # ONNX Runtime's own pre-processing (ONNX shape inference, graph optimisation) before calibration. Its
        # symbolic shape inference (made for transformer graphs) is skipped: on a network with free spatial axes it
        # fails and, failing, leaves sym_shape_infer_temp.onnx and a .data file in the working directory.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                        nodes_to_exclude=_output_layers(onnx.load(str(prepared))))
        tmp.replace(dst)
    finally:
        prepared.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return dst


def _output_layers(model) -> list[str]:
    """Names of the nodes from the last matrix product or convolution to the graph's outputs."""
    producer = {out: node for node in model.graph.node for out in node.output}
    names, frontier = [], [o.name for o in model.graph.output]
    while frontier:
        node = producer.get(frontier.pop())
        if node is None or node.name in names:
            continue
        names.append(node.name)
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            frontier += [i for i in node.input if i in producer]
    return names


def prune_model(model: nn.Module, amount: float) -> nn.Module:
    """Global L1 magnitude pruning of conv and linear weights; the zeros are made permanent."""
    from torch.nn.utils import prune

    if not 0.0 < amount < 1.0:
        raise ConfigError(f"--prune must be a fraction in (0, 1) (got {amount})")
    model.to(memory_format=torch.contiguous_format)  # pruning flattens weights with view(-1)
    params = [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    return model


def finalize_pruning(model: nn.Module) -> nn.Module:
    from torch.nn.utils import prune

    for m in model.modules():
        if prune.is_pruned(m) and hasattr(m, "weight_orig"):
            prune.remove(m, "weight")
    return model


def sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    total = sum(w.numel() for w in weights)
    return float(sum((w == 0).sum().item() for w in weights) / total) if total else 0.0


def _onnx_runner(path: Path, model: nn.Module, activate: Activation) -> Callable[[np.ndarray], np.ndarray]:
    """The exported graph's answers: its output, or for a graph of ``model``'s head maps, ``model``'s own decoding
    around the session (a copy, its layers replaced)."""
    import copy

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if _heads(session):
        around = copy.deepcopy(model)
        _use_session(around, session)
        return _torch_runner(WithActivation(around, activate).eval())
    return lambda x: session.run(None, {"input": x})[0]


def _torch_runner(module: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(fast_layout(torch.from_numpy(x))).numpy()

    return run


def _latency_ms(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, repeats: int) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def _measure(name: str, fn, size_bytes: int, x_val: np.ndarray, y_val: np.ndarray, repeats: int,
             task) -> dict[str, Any]:
    chunk = max(1, min(256, (1 << 22) // int(np.prod(x_val.shape[1:]))))  # large volumes a few at a time
    probs = np.concatenate([fn(x_val[i:i + chunk]) for i in range(0, len(x_val), chunk)])
    b1 = _latency_ms(fn, x_val[:1], repeats * 4)
    big = min(32, chunk)
    b32 = _latency_ms(fn, np.ascontiguousarray(np.resize(x_val, (big, *x_val.shape[1:]))), repeats)
    return {"variant": name, "size_mb": size_bytes / 2**20, "latency_b1_ms": b1, "latency_b32_ms": b32,
            "batch": big, "throughput_b1": 1000 / b1, "throughput_b32": big * 1000 / b32,
            # Scores without a fitted decision (arg-max for classification), as every variant is compared alike.
            **{f"val_{k}": v for k, v in task.scores(y_val, probs, {}).items()}, "_probs": probs}


def export_run(
    run,
    *,
    formats: tuple[str, ...] = ("onnx",),
    quantize: str | None = None,
    prune: float | None = None,
    finetune_epochs: int = 0,
    output: str | Path | None = None,
    repeats: int = 20,
    track: str | list[str] | None = None,
) -> dict[str, Any]:
    """Export a run and compare every variant with the fp32 PyTorch model on the run's val split.

    Writes the models and ``export_report.json`` to ``output`` (default ``RUN/export``) and returns the
    report: per variant the file size, CPU latency at batch 1 and 32, throughput, val ACC/AUC and their
    delta against fp32 PyTorch, and the maximum probability difference from PyTorch. Each variant's figures and
    the report go to the trackers ``track`` names, by default to the run's own.
    """
    import copy
    import dataclasses

    from lepton.runs import Run, load_run
    from lepton.train import prepare_data

    run = run if isinstance(run, Run) else load_run(run)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown export format(s) {unknown}; use {', '.join(FORMATS)}")
    if quantize not in (None, "int8"):
        raise ConfigError(f"--quantize supports int8 (got {quantize!r})")
    if quantize and "onnx" not in formats:
        formats = (*formats, "onnx")
    out = Path(output) if output else run.path / "export"
    out.mkdir(parents=True, exist_ok=True)
    task = run.task
    # The checks below compare formats on the whole val set as tensors: held in memory whatever engine trained it.
    config = dataclasses.replace(run.config, data_engine="memory")
    data = prepare_data(config, run.preprocessing, task)
    spec = run.preprocessing
    x_val = spec.normalize(data.x_val).numpy()
    y_val = data.y_val.numpy()
    shape = (spec.channels, *spec.size)
    model = run.model.float().eval()

    state = io.BytesIO()
    torch.save(model.state_dict(), state)
    def measure(name: str, fn, size_bytes: int) -> dict[str, Any]:
        return _measure(name, fn, size_bytes, x_val, y_val, repeats, task)

    rows = [measure("pytorch-fp32", _torch_runner(WithActivation(model, task.activate).eval()), state.tell())]
    reference = rows[0]["_probs"]
    files: dict[str, str] = {}
    if "onnx" in formats:
        onnx_path = export_onnx(model, shape, out / "model.onnx", activate=task.activate,
                                spatial_axes=task.on_grid)
        files["onnx"] = str(onnx_path)
        rows.append(measure("onnx-fp32", _onnx_runner(onnx_path, model, task.activate), onnx_path.stat().st_size))
        if quantize == "int8":
            x_train = spec.normalize(data.x_train).numpy()
            pick = np.random.default_rng(0).permutation(len(x_train))[:256]
            q_path = quantize_onnx(onnx_path, out / "model.int8.onnx", x_train[pick])
            files["onnx-int8"] = str(q_path)
            rows.append(measure("onnx-int8", _onnx_runner(q_path, model, task.activate), q_path.stat().st_size))
    if "torchscript" in formats:
        ts_path = export_torchscript(model, shape, out / "model.ts", activate=task.activate)
        files["torchscript"] = str(ts_path)
        ts = torch.jit.load(str(ts_path))
        rows.append(measure("torchscript", _torch_runner(ts), ts_path.stat().st_size))
    if prune:
        pruned = prune_model(copy.deepcopy(model), prune)
        if finetune_epochs:
            _finetune(pruned, data, run.config, finetune_epochs, task.loss)
        pruned = finalize_pruning(pruned).eval()
        buf = io.BytesIO()
        torch.save(pruned.state_dict(), buf)
        atomic_write_bytes(out / "model.pruned.pt", buf.getvalue())
        files["pruned"] = str(out / "model.pruned.pt")
        row = measure(f"pytorch-pruned-{prune:g}", _torch_runner(WithActivation(pruned, task.activate).eval()),
                      buf.tell())
        row["sparsity"] = sparsity(pruned)
        rows.append(row)
        if "onnx" in formats:
            p_onnx = export_onnx(pruned, shape, out / "model.pruned.onnx", activate=task.activate,
                                 spatial_axes=task.on_grid)
            files["onnx-pruned"] = str(p_onnx)
    base = rows[0]
    for row in rows:
        probs = row.pop("_probs")
        row["max_abs_prob_diff"] = float(np.abs(probs - reference).max())
        for key in [k for k in row if k.startswith("val_")]:
            row[f"delta_{key[4:]}"] = row[key] - base[key]
        row["speedup_b1"] = base["latency_b1_ms"] / row["latency_b1_ms"]
    report = {"run": str(run.path), "model": run.config.model, "val_images": len(y_val),
              "threads": torch.get_num_threads(), "parity_atol": PARITY_ATOL, "files": files, "variants": rows}
    atomic_write_json(out / "export_report.json", report)
    from lepton.tracking.factory import log_report

    log_report(run.path, track, kind="export", folder="export", files=[out / "export_report.json"],
               metrics={f"{r['variant']}/{k}": v for r in rows for k, v in r.items()
                        if isinstance(v, int | float) and not isinstance(v, bool)},
               text=f"```\n{format_table(report)}\n```")
    return report


def _finetune(model: nn.Module, data, config, epochs: int, loss_fn) -> None:
    """A short fine-tune of a pruned model (pruning masks stay applied) on the run's train split."""
    from lepton.data.transforms.preprocessing import augment_batch, augment_options

    opts = augment_options(config.augment, config.augment_options)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr * 0.1,
                                  weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.y_train), generator=gen)
        for start in range(0, len(order) - 1, config.batch_size):
            idx = order[start:start + config.batch_size]
            if len(idx) < 2:
                continue
            x = data.spec.normalize(augment_batch(data.x_train[idx], opts, gen))
            loss = loss_fn(model(fast_layout(x)), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()


def format_table(report: dict[str, Any]) -> str:
    """The comparison table as fixed-width text (the task's scores as columns, with the last one's delta)."""
    scores = [k for k in report["variants"][0] if k.startswith("val_")]
    first = scores[-1][4:] if scores else None
    head = (f"{'variant':<24}{'size MB':>9}{'b1 ms':>9}{'b32 ms':>9}{'img/s b1':>10}{'img/s b32':>11}"
            + "".join(f"{'val ' + k[4:].upper():>9}" for k in scores)
            + (f"{'d' + first.upper():>9}" if first else "") + f"{'max|dp|':>10}")
    lines = [head, "-" * len(head)]
    for r in report["variants"]:
        lines.append(f"{r['variant']:<24}{r['size_mb']:>9.2f}{r['latency_b1_ms']:>9.2f}{r['latency_b32_ms']:>9.1f}"
                     f"{r['throughput_b1']:>10.0f}{r['throughput_b32']:>11.0f}"
                     + "".join(f"{r[k]:>9.4f}" for k in scores)
                     + (f"{r['delta_' + first]:>+9.4f}" if first else "") + f"{r['max_abs_prob_diff']:>10.2e}")
    return "\n".join(lines)
