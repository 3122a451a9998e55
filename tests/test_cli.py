import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import lepton_cmd


def run_cli(*args, timeout=300):
    return subprocess.run(lepton_cmd(*args), capture_output=True, text=True, timeout=timeout)


def test_help_does_not_import_torch():
    code = "import sys, lepton, lepton.cli; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = run_cli("--help")
    assert out.returncode == 0 and "train" in out.stdout and "evaluate" in out.stdout


def test_models_available():
    out = run_cli("models", "available")
    assert out.returncode == 0
    for name in ("lepton_cnn", "resnet18", "densenet121", "efficientnet_b0"):
        assert name in out.stdout


def test_data_inspect_json_and_exit_code(synthetic_npz, tmp_path):
    out = run_cli("data", "inspect", str(synthetic_npz), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["images"] == 240
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a" / "x.png")
    (tmp_path / "b" / "y.png").write_bytes(b"garbage")
    out = run_cli("data", "inspect", str(tmp_path))
    assert out.returncode == 1 and "unreadable" in out.stdout and "y.png" in out.stdout


def test_errors_are_messages_not_tracebacks(tmp_path):
    out = run_cli("train", str(tmp_path / "missing"), "--epochs", "1")
    assert out.returncode == 2
    assert "error" in out.stderr and "no such file" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("evaluate", str(tmp_path))
    assert out.returncode == 2 and "not a complete run" in out.stderr
    out = run_cli("train", "x.npz", "--aug", "rotate")
    assert out.returncode != 0 and "KEY=NUMBER" in out.stderr
    out = run_cli("serve", "--model", "cxr", "--no-auth", "--host", "0.0.0.0")
    assert out.returncode == 2 and "only allowed on loopback" in out.stderr
    out = run_cli("serve", "--model", "cxr", "--workers", "0")
    assert out.returncode == 2 and "--workers" in out.stderr and "1<=x<=256" in out.stderr  # refused while parsing


@pytest.mark.slow
def test_train_evaluate_predict_via_cli(tmp_path, png_folder):
    out = run_cli("train", str(png_folder), "--epochs", "2", "--batch-size", "8", "--name", "cli",
                  "--output-dir", str(tmp_path), "--val-fraction", "0.25", "--test-fraction", "0.25")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["epochs"] == 2
    run = tmp_path / "cli"
    out = run_cli("evaluate", str(run), "--bootstrap", "50")
    assert out.returncode == 0, out.stderr
    assert "AUC" in out.stdout and (run / "eval" / "test" / "report.md").is_file()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n")
    images = sorted((png_folder / "pneumonia").glob("*.png"))[:2]
    out = run_cli("predict", str(run), *map(str, images), str(bad))
    assert out.returncode == 2 and "bad.png" in out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 2 and all(set(r["probabilities"]) == {"normal", "pneumonia"} for r in lines)


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = run_cli("demo", "--quick", "--output-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "Demo done" in out.stdout
    runs = [p for p in tmp_path.iterdir() if p.name.startswith("demo-2")]
    assert len(runs) == 1 and (runs[0] / "eval" / "test" / "report.md").is_file()


def test_public_api_functions_survive_submodule_imports():
    code = ("import lepton.train, lepton.evaluate, lepton.explain, lepton.robustness\n"
            "import lepton\n"
            "from lepton.train import prepare_data\n"
            "for name in ('train', 'evaluate', 'explain', 'robustness', 'load_run', 'create_model'):\n"
            "    value = getattr(lepton, name)\n"
            "    assert callable(value) and not isinstance(value, type(lepton)), name\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_commands_print_no_third_party_info_logs(tmp_path):
    quiet = subprocess.run(lepton_cmd("models", "list", "--registry", str(tmp_path / "reg")), capture_output=True,
                           text=True, timeout=120)
    assert quiet.returncode == 0 and "alembic" not in quiet.stderr and "INFO" not in quiet.stderr, quiet.stderr
    loud = subprocess.run(lepton_cmd("--debug", "models", "list", "--registry", str(tmp_path / "reg2")),
                          capture_output=True, text=True, timeout=120)
    assert loud.returncode == 0 and "alembic" in loud.stderr


def test_predict_takes_a_registry_reference_and_folders(tmp_path, tiny_run):
    from lepton.data.tools.synthetic import make_synthetic
    from lepton.registry import Registry

    reg = Registry.open(tmp_path / "reg")
    reg.register_run(tiny_run.path, "pneu")
    reg.promote("pneu", 1, "production")
    images, _, _ = make_synthetic(3, 32, seed=4)
    folder = tmp_path / "imgs" / "day1"
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"x{i}.png")
    (folder / ".hidden.png").write_bytes(b"not an image")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG broken")
    for ref in ("pneu@production", "pneu@1", "pneu"):
        out = subprocess.run(lepton_cmd("predict", ref, str(folder), "--registry", str(tmp_path / "reg")),
                             capture_output=True, text=True, timeout=120)
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        assert out.returncode == 0, out.stderr
        assert [Path(r["path"]).name for r in rows] == ["x0.png", "x1.png", "x2.png"]
        for row in rows:
            expected = tiny_run.predict([row["path"]])[0]
            assert row["label"] == expected["label"] and row["threshold"] == expected["threshold"]
            assert row["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)
    bad = subprocess.run(lepton_cmd("predict", "pneu@production", str(tmp_path / "imgs"), "--registry",
                                    str(tmp_path / "reg")), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "broken.png" in bad.stderr and len(bad.stdout.splitlines()) == 3
    missing = subprocess.run(lepton_cmd("predict", "nope@production", str(folder), "--registry", str(tmp_path / "reg")),
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "nope" in missing.stderr


def test_data_inspect_reports_dicom_series_geometry(tmp_path):
    from lepton.data.tools.synthetic import write_dicom_series

    slices = np.zeros((5, 8, 8), np.float32)
    write_dicom_series(tmp_path / "good", slices, spacing=(0.5, 0.5, 3.0), series_uid="1.2.3")
    out = subprocess.run(lepton_cmd("data", "inspect", str(tmp_path / "good"), "--json"), capture_output=True,
                         text=True, timeout=120)
    (row,) = json.loads(out.stdout)["series"]
    assert out.returncode == 0 and row["slices"] == 5 and row["spacing_mm"] == [0.5, 0.5, 3.0]
    paths = write_dicom_series(tmp_path / "gap", slices, series_uid="1.2.4")
    paths[2].unlink()
    bad = subprocess.run(lepton_cmd("data", "inspect", str(tmp_path / "gap")), capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1 and "slices missing" in bad.stdout


@pytest.mark.parametrize("args,option", [
    (["serve", "--model", "m", "--max-batch-size", "0"], "--max-batch-size"),
    (["serve", "--model", "m", "--rate-limit", "nan"], "--rate-limit"),
    (["serve", "--model", "m", "--max-wait-ms", "inf"], "--max-wait-ms"),
    (["serve", "--model", "m", "--poll-seconds", "-1"], "--poll-seconds"),
    (["serve", "--model", "m", "--port", "70000"], "--port"),
    (["data", "partition", "x.npz", "--sites", "1", "--out", "sites"], "--sites"),
    (["data", "partition", "x.npz", "--sites", "2", "--out", "sites", "--alpha", "0"], "--alpha"),
    (["models", "register-onnx", "m.onnx", "--name", "m", "--labels", "a,b", "--image-size", "28",
      "--threshold", "1.5"], "--threshold"),
    (["route", "set", "m", "v1=1", "--shadow", "0"], "--shadow"),
    (["federate", "run", "--superlink", "h:1", "--lr", "nan"], "--lr"),
    (["federate", "run", "--superlink", "h:1", "--fraction", "0"], "--fraction"),
    (["federate", "run", "--superlink", "h:1", "--timeout", "inf"], "--timeout"),
    (["federate", "simulate", "x.npz", "--rounds", "0"], "--rounds"),
    (["dicom-node", "--pacs", "http://h/dicom-web", "--model", "m@1", "--interval", "0"], "--interval"),
    (["dicom-node", "--pacs", "http://h/dicom-web", "--model", "m@1", "--backoff", "nan"], "--backoff"),
    (["export", "run", "--prune", "1"], "--prune"),
    (["evaluate", "run", "--bootstrap", "-1"], "--bootstrap"),
    (["evaluate", "run", "--prevalence", "nan"], "--prevalence"),
    (["validate", "report", "run", "--prevalence", "0"], "--prevalence"),
])
def test_numeric_options_are_bounded_and_finite(args, option):
    """Refused while parsing (exit 2, naming the option), before anything is read or started."""
    from typer.testing import CliRunner

    from lepton.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert option in result.output and "Invalid value" in result.output, result.output


def test_route_weights_out_of_bounds_are_refused_by_the_registry(tmp_path):
    result = run_cli("route", "set", "m", "v1=1e308", "--registry", str(tmp_path / "reg"), timeout=120)
    assert result.returncode != 0 and "route: the weight of version 1" in result.stderr, result.stderr
