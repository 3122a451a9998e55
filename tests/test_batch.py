"""Batch inference (lepton.batch): folders, manifests and Decathlon folders streamed into Parquet or CSV, errors as
rows, exactly once after a SIGKILL and a restart, Ray Data in local mode giving the local engine's rows, and a
segmentation run's masks and volumes."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import lepton_cmd

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def write_pngs(root: Path, n: int, *, seed: int = 0, size: int = 32, nested: bool = False) -> list[Path]:
    from lepton.data.tools.synthetic import make_synthetic

    images, _, _ = make_synthetic(n, size, seed=seed)
    paths = []
    for i, image in enumerate(images):
        folder = root / (f"sub{i % 3}" if nested else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"im{i:04d}.png")
        paths.append(folder / f"im{i:04d}.png")
    return paths


def rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    return pq.read_table(path).to_pylist()


def test_a_folder_with_a_corrupt_file_streams_into_parquet(tiny_run, tmp_path):
    from lepton.batch import predict_batch

    good = write_pngs(tmp_path / "in", 23, nested=True)
    (tmp_path / "in" / "sub1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "in" / ".hidden.png").write_bytes(b"skipped")
    out = tmp_path / "results.parquet"
    summary = predict_batch(tiny_run, tmp_path / "in", out, workers=1, batch_size=8, flush_rows=8, progress=False)
    assert (summary.inputs, summary.rows, summary.errors, summary.skipped) == (24, 24, 1, 0)
    assert not out.with_name("results.parquet.parts").exists()  # merged and removed
    table = rows(out)
    assert sorted(r["path"] for r in table) == sorted(map(str, [*good, tmp_path / "in/sub1/broken.png"]))
    bad = next(r for r in table if r["path"].endswith("broken.png"))
    assert bad["error"] and bad["label"] is None and bad["prob_normal"] is None
    assert pq.ParquetFile(out).metadata.num_row_groups >= 3  # parts became row groups, never one big write
    for row in table[:5]:  # the same answers as Run.predict, to its 6 decimals
        if row["error"] is None:
            expected = tiny_run.predict([row["path"]])[0]
            assert row["label"] == expected["label"] and row["threshold"] == expected["threshold"]
            for k, p in expected["probabilities"].items():  # batches of 8, not 1: oneDNN's last digit may move
                assert row[f"prob_{k}"] == pytest.approx(p, abs=2e-6)
            assert row["model"] == str(tiny_run.path) and row["precision"] == "fp32" and row["frame"] == 0


def test_a_manifest_into_csv_and_a_finished_job(tiny_run, tmp_path):
    from lepton.batch import predict_batch
    from lepton.errors import ConfigError

    paths = write_pngs(tmp_path / "imgs", 6)
    manifest = tmp_path / "list.csv"
    lines = ["path,label", *(f"imgs/{p.name},{'opacity' if i % 2 else 'normal'}" for i, p in enumerate(paths)),
             "imgs/im0000.png,normal", "imgs/missing.png,normal"]  # a path twice is one input; a missing file a row
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.csv"
    summary = predict_batch(tiny_run, manifest, out, workers=0, progress=False)
    assert (summary.rows, summary.errors) == (7, 1)
    table = rows(out)
    assert [Path(r["path"]).name for r in table] == [*(p.name for p in paths), "missing.png"]
    assert [r["truth"] for r in table[:2]] == ["normal", "opacity"]
    assert "missing.png" in table[-1]["error"] and table[0]["error"] == ""
    again = predict_batch(tiny_run, manifest, out, workers=0, progress=False)  # finished: nothing redone
    assert (again.processed, again.skipped, again.rows) == (0, 7, 7)
    write_pngs(tmp_path / "more", 1)
    with pytest.raises(ConfigError, match="finished job"):
        predict_batch(tiny_run, [manifest, tmp_path / "more"], out, workers=0, progress=False)
    with pytest.raises(ConfigError, match="other settings"):  # unfinished parts of another job are not mixed in
        parts = tmp_path / "x.parquet.parts"
        parts.mkdir()
        (parts / "job.json").write_text(json.dumps({"model": "other"}))
        predict_batch(tiny_run, manifest, tmp_path / "x.parquet", workers=0, progress=False)
    redone = predict_batch(tiny_run, [manifest, tmp_path / "more"], out, workers=0, progress=False, overwrite=True)
    assert (redone.rows, redone.skipped) == (8, 0)


def test_a_kill_during_the_merge_is_finished_by_the_next_start(tiny_run, tmp_path):
    """The states a kill can leave around the merge: parts and an old or torn output; output and merged parts."""
    from lepton.batch import predict_batch

    write_pngs(tmp_path / "in", 10)
    out = tmp_path / "r.parquet"
    predict_batch(tiny_run, tmp_path / "in", out, workers=0, flush_rows=4, progress=False)
    reference = rows(out)
    # killed before the output's rename: parts remain, a torn temporary output beside them
    from lepton.batch.rows import schema
    from lepton.batch.store import PartStore

    job = {"model": str(tiny_run.path), "task": "classification", "sources": [str(tmp_path / "in")],
           "precision": "fp32", "tta": bool(tiny_run.config.tta), "masks": None, "labelled": False}
    store = PartStore(tmp_path / "r2.parquet", job, schema(tiny_run))
    store.write(reference[:6])
    store.write(reference[6:])
    (tmp_path / ".r2.parquet.tmp").write_bytes(b"torn")
    (store.parts / ".part-000002.parquet.tmp").write_bytes(b"torn")  # a part torn mid-write never counts
    summary = predict_batch(tiny_run, tmp_path / "in", tmp_path / "r2.parquet", workers=0, progress=False)
    assert (summary.processed, summary.skipped) == (0, 10)
    assert rows(tmp_path / "r2.parquet") == reference
    # killed after the output's rename, while the merged parts were being removed
    (tmp_path / ".r2.parquet.parts-merged").mkdir()
    again = predict_batch(tiny_run, tmp_path / "in", tmp_path / "r2.parquet", workers=0, progress=False)
    assert again.processed == 0 and not (tmp_path / ".r2.parquet.parts-merged").exists()


@pytest.mark.slow
def _children(pid: int) -> list[int]:
    """A process's child processes, from /proc (Linux)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
    except (OSError, StopIteration):
        return False
    return "Z" not in state.split()[1]


def test_sigkill_mid_run_then_the_same_command_ends_with_each_input_once(tiny_run, tmp_path):
    paths = write_pngs(tmp_path / "archive", 600, nested=True)
    (tmp_path / "archive" / "sub0" / "zz_corrupt.dcm").write_bytes(b"DICM" * 40)
    out = tmp_path / "results.parquet"
    cmd = lepton_cmd("predict", str(tiny_run.path), str(tmp_path / "archive"), "--output", str(out),
                     "--workers", "1", "--batch-size", "8", "--flush-rows", "8", "--quiet")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = out.with_name("results.parquet.parts")
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if parts.is_dir() and len(list(parts.glob("part-*.parquet"))) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read().decode()}"
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert workers  # its worker processes end with it (none left holding the model)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)]
    assert not out.exists()
    written = sum(pq.read_metadata(p).num_rows for p in parts.glob("part-*.parquet"))
    assert 0 < written < 601
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["skipped"] >= written and summary["skipped"] + summary["processed"] == 601
    table = rows(out)
    keys = [r["path"] for r in table]
    assert len(keys) == len(set(keys)) == 601  # each input exactly once
    assert set(keys) == {str(p) for p in paths} | {str(tmp_path / "archive/sub0/zz_corrupt.dcm")}
    assert summary["errors"] == 1 and "1 input(s) could not be predicted" in resumed.stderr
    probe = next(r for r in table if r["path"] == str(paths[0]))
    assert probe["prob_opacity"] == pytest.approx(tiny_run.predict([paths[0]])[0]["probabilities"]["opacity"],
                                                  abs=2e-6)


@pytest.mark.slow
def test_ray_data_in_local_mode_writes_the_local_engines_rows(tiny_run, tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    from lepton.batch import predict_batch

    write_pngs(tmp_path / "in", 40, nested=True)
    (tmp_path / "in" / "sub2" / "bad.png").write_bytes(b"nope")
    local = predict_batch(tiny_run, tmp_path / "in", tmp_path / "local.parquet", workers=0, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = predict_batch(tiny_run, tmp_path / "in", tmp_path / "ray.parquet", engine="ray", workers=2,
                               progress=False)
    finally:
        ray.shutdown()
    assert (on_ray.rows, on_ray.errors, on_ray.engine) == (local.rows, local.errors, "ray") == (41, 1, "ray")
    a, b = rows(tmp_path / "ray.parquet"), rows(tmp_path / "local.parquet")
    assert [r["path"] for r in a] == [r["path"] for r in b]  # the same rows, in the same order
    for x, y in zip(a, b, strict=True):
        assert {k: v for k, v in x.items() if not k.startswith("prob_")} == \
            {k: v for k, v in y.items() if not k.startswith("prob_")}
        assert [x[k] for k in x if k.startswith("prob_")] == pytest.approx(
            [y[k] for k in y if k.startswith("prob_")], abs=2e-6)  # batches may be cut elsewhere


@pytest.mark.slow
def test_a_segmentation_run_writes_nifti_masks_and_volumes_per_class(tmp_path_factory, tmp_path):
    import nibabel as nib

    import lepton
    from lepton.batch import predict_batch
    from lepton.data.readers.dicomseg import read_seg
    from lepton.data.readers.io import read_image
    from lepton.data.tools.synthetic import nodule_phantom, write_dicom_series, write_segmentation_cases

    root = write_segmentation_cases(tmp_path_factory.mktemp("dec") / "Task01", n=6, dims=3, seed=2)
    run = lepton.train(root, task="segmentation", epochs=2, batch_size=2, time_budget_s=0, quiet=True,
                       output_dir=str(tmp_path_factory.mktemp("runs")), name="seg3d")
    loaded = lepton.load_run(run.path)
    (root / "imagesTr" / "case999.nii.gz").write_bytes(b"not nifti")
    spec = json.loads((root / "dataset.json").read_text())
    spec["test"] = ["./imagesTr/case999.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(spec))
    hu, _ = nodule_phantom(np.random.default_rng(77), (16, 32, 32), count=2)
    series = tmp_path / "series" / "ct1"
    write_dicom_series(series, hu, spacing=(1.0, 1.0, 2.0))
    out = tmp_path / "seg.parquet"
    # a Decathlon folder (training + test), then a DICOM series folder: its label map also as a DICOM SEG
    summary = predict_batch(loaded, [root, series.parent], out, workers=1, progress=False, dicom_seg=True)
    assert (summary.rows, summary.errors) == (8, 1)
    table = rows(out)
    dicom = table[-1]
    assert dicom["path"] == str(series) and dicom["dicom_seg"].endswith("_seg.dcm") and not dicom["error"]
    seg, _ = read_seg(dicom["dicom_seg"])
    np.testing.assert_array_equal(seg[0], np.asarray(nib.load(dicom["mask"]).dataobj))  # SEG and NIfTI agree
    table = table[:-1]
    assert table[-1]["path"].endswith("case999.nii.gz") and table[-1]["error"] and table[0]["dicom_seg"] is None
    first = table[0]
    assert first["path"] == str(root / "imagesTr" / "case000.nii.gz")
    mask = Path(first["mask"])
    assert mask == tmp_path / "seg_masks" / "imagesTr" / "case000_seg.nii.gz"
    saved = nib.load(mask)
    frame = read_image(first["path"], slices="volume")[0]  # the input's grid, as Lepton reads it (RAS)
    assert saved.shape == frame.pixels.shape[1:] and np.allclose(saved.affine, frame.affine)
    voxel_ml = abs(np.linalg.det(frame.affine[:3, :3])) / 1000
    labels = np.asarray(saved.dataobj)
    assert first["voxels_nodule"] == int((labels == 1).sum())
    assert first["volume_ml_nodule"] == pytest.approx(first["voxels_nodule"] * voxel_ml, abs=1e-3)
    expected = loaded.predict([first["path"]])[0]
    assert first["volume_ml_nodule"] == expected["volume_ml"]["nodule"]
    assert first["lesions"] == len(expected["lesions"]) and first["area_mm2_nodule"] is None


def test_batch_options_need_a_results_file(tiny_run, tmp_path):
    result = subprocess.run(lepton_cmd("predict", str(tiny_run.path), str(tmp_path), "--workers", "2"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "batch options" in result.stderr


def test_streaming_evaluation_scores_class_folders_as_evaluate_does(tiny_run, tmp_path):
    from lepton.batch import evaluate_stream
    from lepton.data.tools.synthetic import make_synthetic
    from lepton.evaluate import evaluate

    images, y, _ = make_synthetic(60, 32, seed=5)
    clean = tmp_path / "clean"
    for i, (image, label) in enumerate(zip(images, y, strict=True)):
        folder = clean / tiny_run.label_names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    expected = evaluate(tiny_run, clean, n_bootstrap=0, plots=False, output=tmp_path / "in-memory", track=[])
    held_out = tmp_path / "held-out"
    import shutil

    shutil.copytree(clean, held_out)
    (held_out / "normal" / "broken.png").write_bytes(b"broken")
    (held_out / "other").mkdir()
    Image.fromarray(images[0]).save(held_out / "other" / "x.png")  # not one of the run's classes
    report = evaluate_stream(tiny_run, held_out, output=tmp_path / "streamed", n_bootstrap=0, plots=False,
                             workers=0, progress=False)
    assert (report["images"], report["unreadable"], report["unlabelled"]) == (60, 1, 1)
    assert report["summary"] == expected["summary"]
    assert (tmp_path / "streamed" / "predictions.parquet").exists() and (tmp_path / "streamed" / "report.md").exists()


def test_the_rows_columns_are_the_tasks_own():
    """The task seam (#32): a batch job's columns come from the run's task (``Task.batch_columns``) — the built-in
    tasks' as before, a new task's from its own module — and a task that declares no batch rows is refused."""
    from types import SimpleNamespace

    from lepton.batch.rows import schema
    from lepton.errors import ConfigError
    from lepton.tasks import Task, get_task

    def names(task, labels):
        return schema(SimpleNamespace(task=task, label_names=labels)).names

    ends = (["path", "frame", "truth"], ["model", "precision", "error"])
    assert names(get_task("classification"), ["a", "b"]) == [*ends[0], "label", "prob_a", "prob_b", "threshold",
                                                             *ends[1]]
    assert names(get_task("segmentation"), ["background", "lesion"]) == [
        *ends[0], "mask", "dicom_seg", "shape", "voxels_lesion", "volume_ml_lesion", "area_mm2_lesion", "lesions",
        *ends[1]]

    class Scores(Task):  # a task no module outside lepton.tasks knows of
        name = "scores"
        capabilities = frozenset({"batch"})

        def batch_columns(self, labels):
            return [("score", "float64")]

    assert names(Scores(), ["x"]) == [*ends[0], "score", *ends[1]]
    with pytest.raises(ConfigError, match="detection"):
        names(get_task("detection"), ["nodule"])
