"""Tracking (#36): TensorBoard event files and MLflow runs read back with their own readers and compared with the run's
own history; a 2-process run logs once; a tracking server that refuses or hangs leaves training finished and the
figures on disk; a real `mlflow server` that comes up late gets what was buffered; evaluation, robustness, export and
federated rounds log too; `lepton runs list/compare --plot`; `lepton models register runs:/ID` and the link back."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import lepton_cmd
from lepton.errors import ConfigError
from lepton.tracking.base import TrackSpec, parse_track

#: The figures of a history row that both backends get each epoch.
EPOCH_KEYS = ("lr", "train_loss", "val_loss", "val_acc", "val_auc", "images_per_s", "seconds")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _history(run_dir: Path) -> list[dict]:
    """The run's own history at full precision (``last.pt``; history.csv rounds to 6 digits)."""
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)["history"]


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_track_values_are_parsed_and_bad_ones_named():
    assert parse_track(["tensorboard", "mlflow", "mlflow=http://127.0.0.1:5000", "tb", "none"]) == [
        TrackSpec("tensorboard"), TrackSpec("mlflow"), TrackSpec("mlflow", "http://127.0.0.1:5000")]
    assert parse_track(None) == [] and parse_track("none") == []
    for bad, words in (("wandb", "use tensorboard, mlflow"), ("tensorboard=/x", "takes no URI"),
                       ("mlflow=", "give the tracking URI")):
        with pytest.raises(ConfigError, match=words):
            parse_track(bad)


def test_the_cli_loads_neither_backend():
    """`lepton --help` stays fast: importing the CLI (and the tracking package) loads no TensorBoard or MLflow."""
    code = ("import sys, lepton.cli, lepton.tracking; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('mlflow', 'tensorboard', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_an_untracked_run_writes_no_tracking(tiny_run):
    assert not (tiny_run.path / "tracking").exists()
    assert not list(tiny_run.path.glob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def tracked(synthetic_npz, tmp_path_factory):
    """Two epochs tracked to TensorBoard and to a local MLflow store (SQLite) at once."""
    from lepton.train import train

    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run = train(synthetic_npz, preset="default", name="both", output_dir=str(root / "runs"), epochs=2,
                batch_size=32, lr=2e-3, quiet=True, seed=0, track=["tensorboard", f"mlflow={uri}"])
    return run, uri


@pytest.mark.slow
def test_tensorboard_holds_the_run_history(tracked):
    run, _ = tracked
    history = _history(run.path)
    events = _events(run.path)
    for key in EPOCH_KEYS:
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [1, 2], key
        assert [e.value for e in logged] == pytest.approx([h[key] for h in history], rel=1e-6), key
    steps = events.Scalars("step/train_loss")
    assert len(steps) >= 2 and [e.step for e in steps] == list(range(1, len(steps) + 1))
    assert events.Images("samples/val")[0].width > events.Images("samples/val")[0].height  # a row of inputs
    assert events.Graph() is not None  # the network traced
    assert json.loads((run.path / "tracking" / "tracking.json").read_text())["tensorboard"] == {"logdir": "."}


@pytest.mark.slow
def test_mlflow_holds_the_run_history_config_tags_files_and_model(tracked, monkeypatch):
    import mlflow.pytorch
    from mlflow import MlflowClient

    run, uri = tracked
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where runs:/ URIs resolve
    record = json.loads((run.path / "tracking" / "tracking.json").read_text())["mlflow"]
    assert record["tracking_uri"] == uri and record["model_uri"] == f"runs:/{record['run_id']}/model"
    client = MlflowClient(uri)
    history = _history(run.path)
    for key in EPOCH_KEYS:  # exactly the run's own figures (MLflow keeps doubles)
        logged = sorted(client.get_metric_history(record["run_id"], key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in logged] == [(h["epoch"], h[key]) for h in history], key
    found = client.get_run(record["run_id"])
    assert found.info.status == "FINISHED" and found.info.run_name == "both"
    assert found.data.params["epochs"] == "2" and found.data.params["lr"] == "0.002"
    fingerprint = json.loads((run.path / "data.json").read_text())
    tags = found.data.tags
    assert tags["data.sha256"] == fingerprint["sha256"] and tags["precision"] == run.info["precision"]
    assert tags["lepton.version"] and "cpu.flags" in tags and tags["processes"] == "1"
    assert tags["lepton.run_dir"] == str(run.path.resolve())
    files = {a.path for a in client.list_artifacts(record["run_id"], "run")}
    assert {"run/best.pt", "run/run.json", "run/history.csv", "run/curves.png", "run/config.yaml"} <= files
    # MLflow's PyTorch flavour: the model loads from the run and answers as the run does
    model = mlflow.pytorch.load_model(record["model_uri"], map_location="cpu")
    x = run.preprocessing.normalize(torch.rand(4, run.preprocessing.channels, *run.preprocessing.size))
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), run.model.float().cpu().eval()(x), atol=1e-5)


@pytest.mark.slow
def test_evaluation_robustness_and_export_log_to_the_runs_trackers(tracked):
    from mlflow import MlflowClient

    from lepton.evaluate import evaluate
    from lepton.export import export_run
    from lepton.robustness import robustness

    run, uri = tracked
    report = evaluate(run.path, split="test", n_bootstrap=50, plots=False)
    rob = robustness(run.path, corruptions=("gaussian_noise",), attacks=("fgsm",), max_images=48)
    export_run(run.path, formats=("onnx",), repeats=2)
    run_id = json.loads((run.path / "tracking" / "tracking.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient(uri)
    metrics = client.get_run(run_id).data.metrics
    primary = report["metrics"][report["primary_threshold"]]
    assert metrics["eval/test/auc"] == primary["auc"]
    assert [metrics["eval/test/auc_ci_low"], metrics["eval/test/auc_ci_high"]] == primary["ci95"]["auc"]
    noise = sorted(client.get_metric_history(run_id, "robustness/val/gaussian_noise/auc"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in noise] == [(r["severity"], r["auc"]) for r in rob["corruptions"]
                                                  ["gaussian_noise"]]
    assert metrics["export/onnx-fp32/latency_b1_ms"] > 0
    assert {"eval/test/report.json", "eval/test/report.md"} <= {
        a.path for a in client.list_artifacts(run_id, "eval/test")}
    assert client.get_run(run_id).info.status == "FINISHED"  # logged into the training's run, left as it was
    events = _events(run.path)  # and TensorBoard, into the run directory
    assert events.Scalars("eval/test/auc")[0].value == pytest.approx(primary["auc"], rel=1e-6)
    assert [e.step for e in events.Scalars("robustness/val/gaussian_noise/auc")] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_register_an_mlflow_run_uri_and_the_link_both_ways(tracked, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from lepton.cli import app
    from lepton.registry import Registry

    run, uri = tracked
    run_id = json.loads((run.path / "tracking" / "tracking.json").read_text())["mlflow"]["run_id"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = CliRunner().invoke(app, ["models", "register", f"runs:/{run_id}", "--name", "tracked", "--registry",
                                      str(tmp_path / "reg")])
    assert result.exit_code == 0, result.output
    reg = Registry.open(tmp_path / "reg")
    version = reg.get("tracked@1")
    assert version.source_run == f"runs:/{run_id}"
    assert version.metrics["mlflow_run"]["run_id"] == run_id and version.metrics["val_auc"] == run.info["val_auc"]
    assert f"runs:/{run_id}/model" in reg.card("tracked@1")
    assert reg.load_run("tracked@1").label_names == run.label_names  # the weights came through MLflow
    found = MlflowClient(uri).get_run(run_id)
    assert found.data.tags["lepton.registered"] == "tracked@1"
    card = MlflowClient(uri).download_artifacts(run_id, "model_card/model_card.md", str(tmp_path))
    assert Path(card).read_text().startswith("# Model card: tracked v1")
    # a run directory registered directly carries the same link
    assert reg.register_run(run.path, "direct").metrics["mlflow_run"]["run_id"] == run_id


@pytest.mark.slow
def test_a_refusing_tracking_server_leaves_training_finished_and_the_figures_on_disk(synthetic_npz, tmp_path,
                                                                                      caplog, monkeypatch):
    from mlflow import MlflowClient

    from lepton.tracking import mlflow_tracker
    from lepton.train import train

    spent = []
    finish = mlflow_tracker.MlflowTracker.finish

    def timed(self, status="FINISHED"):
        t0 = time.perf_counter()
        finish(self, status)
        spent.append(time.perf_counter() - t0)

    monkeypatch.setattr(mlflow_tracker.MlflowTracker, "finish", timed)
    closed = _free_port()  # nothing listens there: every connection is refused
    with caplog.at_level(logging.WARNING, logger="lepton.tracking"):
        run = train(synthetic_npz, preset="default", name="away", output_dir=str(tmp_path), epochs=2, batch_size=32,
                    quiet=True, track=f"mlflow=http://127.0.0.1:{closed}")
    assert run.info["status"] == "complete" and (run.path / "best.pt").is_file()
    warnings = [r for r in caplog.records if r.name == "lepton.tracking" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"127.0.0.1:{closed}" in warnings[0].getMessage(), warnings
    assert spent and max(spent) < 5.0, spent  # the end of the run waited two refused tries, not MLflow's retries
    rows = mlflow_tracker.offline_figures(run.path)
    history = _history(run.path)
    for key in EPOCH_KEYS:
        assert [(s, v) for k, v, _, s in rows if k == key] == [(h["epoch"], h[key]) for h in history], key
    record = json.loads((run.path / "tracking" / "tracking.json").read_text())["mlflow"]
    assert record["offline"].endswith("mlflow-offline.jsonl") and "run_id" not in record
    # when a tracking store is there, `lepton runs sync` sends it all and removes the file
    store = f"sqlite:///{tmp_path / 'later.db'}"
    sent = mlflow_tracker.sync_offline(run.path, store)
    assert sent["figures"] == len(rows) and not (run.path / "tracking" / "mlflow-offline.jsonl").exists()
    logged = MlflowClient(store).get_metric_history(sent["run_id"], "val_auc")
    assert sorted((m.step, m.value) for m in logged) == [(h["epoch"], h["val_auc"]) for h in history]
    found = MlflowClient(store).get_run(sent["run_id"])
    assert found.info.status == "FINISHED" and found.data.params["epochs"] == "2"
    assert "run/best.pt" in {a.path for a in MlflowClient(store).list_artifacts(sent["run_id"], "run")}


def test_a_hanging_tracking_server_never_blocks_the_caller(tmp_path, monkeypatch):
    """A server that accepts connections and never answers: each call returns at once, and the end of the run waits
    for two short tries (MLFLOW_HTTP_REQUEST_TIMEOUT) before writing the figures down."""
    from lepton.tracking.mlflow_tracker import MlflowTracker, offline_figures

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        tracker = MlflowTracker(f"http://127.0.0.1:{hole.getsockname()[1]}", tmp_path, run_name="slow")
        t0 = time.perf_counter()
        tracker.start({"lr": 0.1}, {"task": "classification"})
        for step in range(1, 201):
            tracker.log_step({"step/train_loss": 1.0 / step}, step)
        calls = time.perf_counter() - t0
        t1 = time.perf_counter()
        tracker.finish()
        ended = time.perf_counter() - t1
    assert calls < 0.5, calls
    assert ended < 8.0, ended
    assert [(s, v) for _, v, _, s in offline_figures(tmp_path)] == [(s, 1.0 / s) for s in range(1, 201)]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a loopback port, started when the test calls it; stopped afterwards."""
    procs = []
    port = _free_port()

    def start() -> str:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
             str(tmp_path / "server-artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        procs.append(proc)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return f"http://127.0.0.1:{port}"
            except OSError:
                time.sleep(0.5)
        raise AssertionError("mlflow server did not come up")

    yield f"http://127.0.0.1:{port}", start
    for proc in procs:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.skipif(not Path(sys.executable).with_name("mlflow").exists(), reason="needs the full mlflow (server)")
def test_a_tracking_server_that_comes_up_late_gets_what_was_buffered(mlflow_server, synthetic_npz, tmp_path,
                                                                      caplog):
    from mlflow import MlflowClient

    from lepton.tracking.mlflow_tracker import MlflowTracker
    from lepton.train import train

    uri, start = mlflow_server
    tracker = MlflowTracker(uri, tmp_path / "early", run_name="early")
    with caplog.at_level(logging.WARNING, logger="lepton.tracking"):
        tracker.start({"lr": 0.1}, {"task": "classification"})
        for epoch in (1, 2, 3):
            tracker.log_metrics({"val_auc": epoch / 10}, epoch)
        deadline = time.monotonic() + 30
        while not caplog.records and time.monotonic() < deadline:  # the server is not there yet
            time.sleep(0.1)
        assert len(caplog.records) == 1 and "cannot be reached" in caplog.records[0].getMessage()
        start()
        tracker.finish()
    client = MlflowClient(uri)
    run_id = json.loads((tmp_path / "early" / "tracking" / "tracking.json").read_text())["mlflow"]["run_id"]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_auc")) == [
        (1, 0.1), (2, 0.2), (3, 0.3)]
    assert not (tmp_path / "early" / "tracking" / "mlflow-offline.jsonl").exists()
    assert len(caplog.records) == 1  # one warning, whatever the number of retries
    # a training run against the server: figures, files (through the server's artifact proxy) and model
    run = train(synthetic_npz, preset="default", name="served", output_dir=str(tmp_path / "runs"), epochs=2,
                batch_size=32, quiet=True, track=f"mlflow={uri}")
    run_id = json.loads((run.path / "tracking" / "tracking.json").read_text())["mlflow"]["run_id"]
    history = _history(run.path)
    logged = sorted(client.get_metric_history(run_id, "val_loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in logged] == [(h["epoch"], h["val_loss"]) for h in history]
    assert {"model", "run", "images"} <= {a.path for a in client.list_artifacts(run_id)}
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_two_process_run_logs_once(tmp_path):
    from mlflow import MlflowClient

    from lepton.data.tools.synthetic import write_synthetic_npz

    data = write_synthetic_npz(tmp_path / "small.npz", n=64, size=32, seed=3, fractions=(0.5, 0.25, 0.25))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(lepton_cmd("train", str(data), "--preset", "default", "--epochs", "2", "--batch-size", "8",
                                     "--output-dir", str(tmp_path / "runs"), "--name", "two", "--nproc", "2",
                                     "--track", "tensorboard", "--track", f"mlflow={uri}", "--quiet"),
                          capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "two"
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert [e.step for e in _events(run_dir).Scalars("val_auc")] == [1, 2]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lepton").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["processes"] == "2"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_auc")] == [1, 2]
    assert done.stderr.count("tracking failed") == 0


def test_federated_rounds_log_pooled_and_per_site_figures(tmp_path):
    from lepton.federated.rundir import Recorder
    from lepton.federated.site import SiteSettings

    summaries = {"1": {"train": 10, "val": 4}, "2": {"train": 20, "val": 6}}
    recorder = Recorder("fedavg", SiteSettings(), {"name": "fl", "output-dir": str(tmp_path)}, {}, {}, summaries)
    with recorder.track(["tensorboard"]):
        for auc in (0.6, 0.8):
            recorder.pool("evaluate", [{"site": 1, "num-examples": 4, "val_auc": auc, "val_loss": 0.5},
                                       {"site": 2, "num-examples": 6, "val_auc": auc - 0.1, "val_loss": 0.7}])
    events = _events(tmp_path / "fl")
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("val_auc")] == [(1, 0.54), (2, 0.74)]  # by val images
    assert [round(e.value, 6) for e in events.Scalars("site-2/val_auc")] == [0.5, 0.7]
    assert [e.step for e in events.Scalars("site-1/val_loss")] == [1, 2]


@pytest.mark.slow
def test_runs_list_and_compare_two_real_runs_with_an_overlay(tracked, tiny_run, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from lepton.cli import app
    from lepton.evaluate import evaluate

    run, _ = tracked
    for r in (run, tiny_run):
        evaluate(r.path, split="test", n_bootstrap=50, plots=False, track="none")
    plot = tmp_path / "curves.png"
    result = CliRunner().invoke(app, ["runs", "compare", str(run.path), str(tiny_run.path), "--plot", str(plot),
                                      "--json"])
    assert result.exit_code == 0, result.output
    compared = json.loads(result.output)
    assert compared["runs"] == ["both", "tiny"]
    assert compared["config"]["epochs"] == ["2", "3"]
    assert "name" not in compared["config"] and "output_dir" not in compared["config"]
    auc = compared["metrics"]["test.auc"]
    for figure, r in zip(auc, (run, tiny_run), strict=True):
        report = json.loads((r.path / "eval" / "test" / "report.json").read_text())
        assert figure == {"value": report["metrics"][report["primary_threshold"]]["auc"],
                          "ci95": report["metrics"][report["primary_threshold"]]["ci95"]["auc"]}
    assert compared["metrics"]["val_auc"] == [{"value": r.info["val_auc"], "ci95": None} for r in (run, tiny_run)]
    # the overlay: the PNG the figure was drawn into, one panel per shared figure, one line per run
    drawn = compared["plot"]
    with Image.open(plot) as image:
        assert image.format == "PNG" and list(image.size) == drawn["size"] and image.size[0] > image.size[1]
    assert [a["ylabel"] for a in drawn["axes"]] == ["train_loss", "val_loss", "val_acc", "val_auc"]
    for axes in drawn["axes"]:
        assert [line["label"] for line in axes["lines"]] == ["both", "tiny"] and axes["xlabel"] == "epoch"
    val_auc = drawn["axes"][3]["lines"]
    assert val_auc[0]["x"] == [1, 2] and val_auc[1]["x"] == [1, 2, 3]
    assert val_auc[1]["y"] == pytest.approx([h["val_auc"] for h in _history(tiny_run.path)], rel=1e-5)
    assert json.loads(plot.with_suffix(".json").read_text()) == drawn
    # runs list: both runs, complete, with where they were tracked
    listed = CliRunner().invoke(app, ["runs", "list", str(run.path.parent), "--json"])
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.output)
    assert row["name"] == "both" and row["status"] == "complete" and row["epochs"] == 2
    assert row["tracking"][0] == "tensorboard" and row["tracking"][1].startswith("mlflow ")
    assert row["eval"]["test"]["auc"] == compared["metrics"]["test.auc"][0]["value"]


def test_compare_needs_two_runs_and_names_what_is_not_a_run(tmp_path, tiny_run):
    from lepton.errors import RunError
    from lepton.tracking.compare import compare_runs

    with pytest.raises(RunError, match="two runs or more"):
        compare_runs([tiny_run.path])
    with pytest.raises(RunError, match="not a run directory"):
        compare_runs([tiny_run.path, tmp_path])


def test_image_grid_lays_masks_over_volumes():
    from lepton.tracking.base import image_grid

    volumes = np.zeros((2, 1, 5, 8, 8), np.float32)
    masks = np.zeros((2, 5, 8, 8), np.int64)
    masks[0, 2, 2:4, 2:4] = 1  # in the middle slice
    grid = image_grid(volumes, masks)
    assert grid.shape == (8, 18, 3)
    assert grid[3, 3, 0] > 0.3 and grid[3, 3, 1] < 0.1 and grid[0, 0].sum() == 0
    # a segmentation task's targets keep their channel axis (N, 1, D, H, W), as training hands them over
    np.testing.assert_array_equal(image_grid(volumes, masks[:, None]), grid)
