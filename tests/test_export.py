import json
import subprocess

import numpy as np
import pytest
import torch

from conftest import lepton_cmd
from lepton.errors import ConfigError
from lepton.export import PARITY_ATOL, export_onnx, finalize_pruning, prune_model, sparsity
from lepton.models import create_model


@pytest.mark.parametrize("name", ["lepton_cnn", "resnet18"])
def test_onnx_matches_pytorch_with_dynamic_batch(tmp_path, name):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = create_model(name, 1, 3, image_size=28).eval()
    path = export_onnx(model, (1, 28, 28), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5, 32):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            expected = torch.softmax(model(x), 1).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == (batch, 3)
        np.testing.assert_allclose(got, expected, atol=PARITY_ATOL)


def test_pruning_reaches_the_requested_sparsity():
    model = create_model("lepton_cnn", 1, 2, image_size=28)
    finalize_pruning(prune_model(model, 0.6))
    assert sparsity(model) == pytest.approx(0.6, abs=0.01)
    assert not any(name.endswith("_orig") for name, _ in model.named_parameters())
    with pytest.raises(ConfigError, match="fraction"):
        prune_model(model, 1.5)


@pytest.mark.slow
def test_export_run_report(tiny_run, tmp_path):
    from lepton.export import export_run, format_table

    report = export_run(tiny_run, formats=("onnx", "torchscript"), quantize="int8", prune=0.5, finetune_epochs=1,
                        output=tmp_path / "exp", repeats=3)
    names = [v["variant"] for v in report["variants"]]
    assert names == ["pytorch-fp32", "onnx-fp32", "onnx-int8", "torchscript", "pytorch-pruned-0.5"]
    by = {v["variant"]: v for v in report["variants"]}
    assert by["onnx-fp32"]["max_abs_prob_diff"] <= PARITY_ATOL
    assert by["torchscript"]["max_abs_prob_diff"] <= PARITY_ATOL
    assert by["onnx-int8"]["size_mb"] < by["onnx-fp32"]["size_mb"] / 2  # int8 weights
    assert abs(by["onnx-int8"]["delta_auc"]) < 0.1
    assert by["pytorch-pruned-0.5"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    for v in report["variants"]:
        assert v["latency_b1_ms"] > 0 and v["throughput_b32"] > 0
    saved = json.loads((tmp_path / "exp" / "export_report.json").read_text())
    assert [v["variant"] for v in saved["variants"]] == names
    assert "onnx-int8" in format_table(report)
    for key in ("onnx", "onnx-int8", "torchscript", "pruned", "onnx-pruned"):
        assert (tmp_path / "exp").joinpath(report["files"][key].rsplit("/", 1)[-1]).is_file()


@pytest.mark.slow
def test_export_cli(tiny_run, tmp_path):
    out = subprocess.run(lepton_cmd("export", str(tiny_run.path), "--format", "onnx", "--output", str(tmp_path)),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "onnx-fp32" in out.stdout and (tmp_path / "model.onnx").is_file()
    bad = subprocess.run(lepton_cmd("export", str(tiny_run.path), "--format", "tflite"), capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "unknown export format" in bad.stderr
