"""The end-to-end demos, on CPU in minutes: synthetic chest X-rays, or (``volumes=True``) synthetic CT volumes
written as real DICOM series and NIfTI files → train → evaluate → explain → predict."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np


def run_demo(output_dir: str | Path = "runs", *, quick: bool = False, seed: int = 0,
             quiet: bool = False) -> dict[str, Any]:
    """Generate the synthetic dataset, train ``lepton_cnn``, evaluate on its test split and
    predict two PNG files; return the paths and headline figures."""
    from PIL import Image

    from lepton.data.tools.synthetic import write_synthetic_npz
    from lepton.evaluate import evaluate
    from lepton.train import train

    started = time.perf_counter()
    out = Path(output_dir)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    n, size = (400, 48) if quick else (1200, 64)
    data_path = write_synthetic_npz(out / "demo-data" / f"synthetic_cxr_{n}_{size}.npz", n=n, size=size, seed=seed)
    run = train(data_path, preset="demo", name=f"demo-{stamp}", output_dir=str(out), seed=seed,
                epochs=3 if quick else None, quiet=quiet)
    train_seconds = time.perf_counter() - started
    report = evaluate(run, split="test", n_bootstrap=200 if quick else 1000)
    # Two test images written as PNG files, predicted the way a user would predict new files.
    test = np.load(data_path)
    examples = []
    for label in (0, 1):
        i = int(np.flatnonzero(test["test_labels"].ravel() == label)[0])
        png = out / "demo-data" / f"example_{run.label_names[label]}.png"
        Image.fromarray(test["test_images"][i]).save(png)
        examples.append(png)
    predictions = run.predict(examples)
    primary = report["metrics"][report["primary_threshold"]]
    return {
        "run": str(run.path), "data": str(data_path), "report": str(Path(report["output"]) / "report.md"),
        "plots": report.get("plots", []), "test_images": report["images"],
        "test_acc": primary["acc"], "test_auc": primary["auc"], "ci95": primary["ci95"],
        "threshold": run.threshold, "predictions": predictions,
        "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.perf_counter() - started, 1),
    }


def run_volume_demo(output_dir: str | Path = "runs", *, quick: bool = False, seed: int = 0,
                    quiet: bool = False) -> dict[str, Any]:
    """CT phantoms (body, lungs, spine; half with a lung nodule) written as DICOM series folders and NIfTI files
    with a CSV manifest, resampled and cropped by MONAI transforms, a 3-D ``lepton_cnn`` trained on whole
    volumes, evaluated on the test cases, a Grad-CAM
    map written as NIfTI beside a slice montage, and a series folder and a NIfTI file predicted."""
    from lepton.data.tools.synthetic import write_ct_cases
    from lepton.evaluate import evaluate
    from lepton.explain import explain
    from lepton.train import train

    started = time.perf_counter()
    out = Path(output_dir)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    n = 48 if quick else 80
    manifest = write_ct_cases(out / "demo-volumes" / f"ct_{n}", n=n, seed=seed)
    # Resampled to 2 mm voxels, cropped to the body and padded to a common size: the steps are saved with the run,
    # and predict, explain and the server apply them too.
    steps = [{"name": "spacing", "mm": [1.5, 1.5, 2.0]}, {"name": "crop_foreground", "threshold": 0.05, "margin": 1},
             {"name": "pad", "size": [16, 24, 24]}]
    run = train(manifest, preset="default", slices="volume", window="-300,1400", model="lepton_cnn", preprocess=steps,
                epochs=10 if quick else 12, batch_size=8, lr=2e-3, augment="light", name=f"demo-volumes-{stamp}",
                output_dir=str(out), seed=seed, quiet=quiet)
    train_seconds = time.perf_counter() - started
    report = evaluate(run, split="test", n_bootstrap=200 if quick else 1000)
    cases = manifest.parent
    examples = [cases / "case000", cases / "case001.nii.gz"]  # a DICOM series folder and a NIfTI file
    explained = explain(run, examples[:1], output=run.path / "explanations")
    predictions = run.predict(examples)
    primary = report["metrics"][report["primary_threshold"]]
    return {
        "run": str(run.path), "data": str(manifest), "report": str(Path(report["output"]) / "report.md"),
        "test_images": report["images"], "test_acc": primary["acc"], "test_auc": primary["auc"],
        "ci95": primary["ci95"], "threshold": run.threshold, "predictions": predictions,
        "explanation": explained[0], "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def run_segmentation_demo(output_dir: str | Path = "runs", *, quick: bool = False, seed: int = 0,
                          quiet: bool = False) -> dict[str, Any]:
    """CT phantoms with lung nodules (a Decathlon folder of NIfTI files) → a 3-D U-Net → Dice, HD95 and lesion
    detection on the test cases → a new phantom written as a DICOM series, segmented, its label map written as NIfTI
    and as a DICOM SEG that is read back with highdicom and compared voxel for voxel."""
    from lepton.data.readers.dicomseg import read_seg
    from lepton.data.readers.series import read_series
    from lepton.data.readers.volume import network_order
    from lepton.data.tools.synthetic import nodule_phantom, write_dicom_series, write_segmentation_cases
    from lepton.evaluate import evaluate
    from lepton.train import train

    started = time.perf_counter()
    out = Path(output_dir)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    n = 32 if quick else 60
    data = write_segmentation_cases(out / "demo-segmentation" / f"nodules_{n}", n=n, dims=3, seed=seed)
    run = train(data, preset="segmentation", window="-1000,1400", epochs=12 if quick else 30, batch_size=4,
                time_budget_s=0, name=f"demo-segmentation-{stamp}", output_dir=str(out), seed=seed, quiet=quiet)
    train_seconds = time.perf_counter() - started
    report = evaluate(run, split="test", n_bootstrap=200 if quick else 1000)
    # A new case as a real DICOM series: segmented, written as NIfTI and DICOM SEG, the SEG read back.
    hu, truth = nodule_phantom(np.random.default_rng(seed + 1000), (16, 32, 32), count=2)
    series = out / "demo-segmentation" / "new_case_series"
    write_dicom_series(series, hu, spacing=(1.0, 1.0, 2.0), patient_id="DEMO-NEW")
    (prediction,) = run.predict([series], output=run.path / "predictions", dicom_seg=True)
    seg_labels, _ = read_seg(prediction["dicom_seg"])
    import nibabel as nib

    nifti_labels = np.asarray(nib.load(prediction["label_map"]).dataobj)
    (volume,) = read_series(series)
    true_net = network_order(truth.transpose(2, 1, 0)[::-1, ::-1, :].astype(np.uint8))  # as the series reader lays it
    both = (seg_labels[0] > 0) & (true_net > 0)
    dice_new = 2 * both.sum() / max(1, (seg_labels[0] > 0).sum() + (true_net > 0).sum())
    return {
        "run": str(run.path), "data": str(data), "report": str(Path(report["output"]) / "report.md"),
        "test_cases": report["images"], "test_dice": report["mean_dice"], "test_dice_ci95": report["mean_dice_ci95"],
        "detection": {k: report["detection"][k] for k in ("true_lesions", "found", "sensitivity", "fp_per_case")},
        "new_case": {"prediction": prediction, "dice_against_truth": round(float(dice_new), 4),
                     "dicom_seg_matches_nifti": bool(np.array_equal(seg_labels[0], nifti_labels)),
                     "series_shape": list(volume.shape)},
        "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.perf_counter() - started, 1),
    }


def run_detection_demo(output_dir: str | Path = "runs", *, quick: bool = False, seed: int = 0,
                       quiet: bool = False) -> dict[str, Any]:
    """Box-labelled lesions, end to end: chest-radiograph-like images with opacities and CT-like volumes with lung
    nodules (``write_detection_cases``: boxes around each lesion, negatives kept) → RetinaNet (2-D, then 3-D) → mAP,
    CPM and per-class AP with CIs on the test split → boxes for an image and a volume, as the server answers them."""
    from lepton.data.tools.synthetic import write_detection_cases
    from lepton.evaluate import evaluate
    from lepton.train import train

    started = time.perf_counter()
    out = Path(output_dir)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    result: dict[str, Any] = {}
    # volumes: batches of 8 from ~70 % of the cases; the 3-D detector needs ~150 optimiser steps to find nodules and
    # ~400 to regress its boxes off the anchors' stride-4 lattice (benchmarks/detection.py): 48 epochs of 3 steps
    # (quick), 72 of 6
    for dims, n, epochs in ((2, 60 if quick else 160, 8 if quick else 30), (3, 32 if quick else 64,
                                                                            48 if quick else 72)):
        kind = "images" if dims == 2 else "volumes"
        boxes = write_detection_cases(out / "demo-detection" / f"{kind}_{n}", n=n, dims=dims, seed=seed)
        t0 = time.perf_counter()
        run = train(boxes, preset="detection", epochs=epochs, time_budget_s=0, image_size=64 if dims == 2 else None,
                    name=f"demo-detection-{kind}-{stamp}", output_dir=str(out), seed=seed, quiet=quiet)
        train_seconds = time.perf_counter() - t0
        report = evaluate(run, split="test", n_bootstrap=200 if quick else 1000)
        example = boxes.parent / ("images/case000.png" if dims == 2 else "imagesTr/case000.nii.gz")
        (answer,) = run.predict([example])
        result[kind] = {"run": str(run.path), "data": str(boxes), "report": str(Path(report["output"]) / "report.md"),
                        "test_images": report["images"], "map": report["map"], "map_ci95": report["map_ci95"],
                        "ap50": report["ap50"], "cpm": report["cpm"], "cpm_ci95": report["cpm_ci95"],
                        "threshold": run.info.get("threshold"), "example": answer,
                        "train_seconds": round(train_seconds, 1)}
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def run_sequence_demo(output_dir: str | Path = "runs", *, quick: bool = False, seed: int = 0,
                      quiet: bool = False) -> dict[str, Any]:
    """Generated cine loops — a beating chamber whose contraction sets an ejection-fraction-like target, written as
    multi-frame ultrasound DICOM with a scan region and a burned-in strip, age and sex beside them — → the sequence
    task (a 2-D CNN per frame, temporal attention, the covariates fused by FiLM) → MAE, R² with bootstrap CIs on the
    test clips → a clip predicted offline and by a real server (native API and OIP), which must agree."""
    import json as _json
    import threading

    import httpx
    import uvicorn

    from lepton.data.tools.cine import read_manifest_rows, write_cine_set
    from lepton.evaluate import evaluate
    from lepton.registry import Registry
    from lepton.serve import ServeConfig, create_app
    from lepton.train import train

    started = time.perf_counter()
    out = Path(output_dir)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    n = 40 if quick else 96
    manifest = write_cine_set(out / "demo-sequence" / f"cine_{n}", n=n, size=64, seed=seed)
    options = {"fps": 8, "frames": 8, "size": 32, "target": "value", "fusion": "film",  # 1 s: a whole beat
               "covariates": "age:numeric:years,sex:categorical"}
    run = train(manifest, task="sequence", model="seq_attention", epochs=4 if quick else 8, batch_size=4,
                augment="none", precision="fp32", task_options=options, name=f"demo-sequence-{stamp}",
                output_dir=str(out), seed=seed, quiet=quiet)
    train_seconds = time.perf_counter() - started
    report = evaluate(run, split="test", n_bootstrap=200 if quick else 1000)
    row = read_manifest_rows(manifest)[0]
    clip = manifest.parent / row["path"]
    covariates = {"age": float(row["age"]), "sex": row["sex"]}
    offline = run.predict([clip], covariates=[covariates])[0]["value"]
    # The run registered and served on loopback: the same clip and covariates through the native API.
    reg = Registry.open(out / "demo-sequence" / "registry")
    version = reg.register_run(run.path, "echo-ef")
    key = reg.create_key("demo")
    server = uvicorn.Server(uvicorn.Config(create_app(ServeConfig(models=[f"echo-ef@{version.version}"],
                                                                  registry=str(out / "demo-sequence" / "registry"),
                                                                  rate_limit=0)),
                                           host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the demo server did not start")
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/models/echo-ef/predict", timeout=120,
                            headers={"Authorization": f"Bearer {key}"},
                            files={"file": (clip.name, clip.read_bytes())},
                            data={"covariates": _json.dumps(covariates)})
        answer.raise_for_status()
        served = answer.json()["value"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    return {
        "run": str(run.path), "data": str(manifest), "report": str(Path(report["output"]) / "report.md"),
        "test_clips": report["images"], "test_mae": report["metrics"]["mae"], "test_r2": report["metrics"]["r2"],
        "test_mae_ci95": report["ci95"].get("mae"), "baseline_mae": report["baseline_mae"],
        "example": {"clip": str(clip), "covariates": covariates, "true": float(row["label"]), "offline": offline,
                    "served": served, "agree": abs(offline - served) < 1e-3},
        "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.perf_counter() - started, 1),
    }


def run_pathology_demo(output_dir: str | Path = "runs", *, quick: bool = False, seed: int = 0,
                       quiet: bool = False) -> dict[str, Any]:
    """``lepton.pathology.demo.run_pathology_demo``: generated slide pyramids → attention MIL → slide AUC, heatmaps."""
    from lepton.pathology.demo import run_pathology_demo as run

    return run(output_dir, quick=quick, seed=seed, quiet=quiet)


@dataclass(frozen=True)
class Demo:
    """One ``lepton demo --task NAME``: the function that runs it (``output_dir``, ``quick``, ``seed``, ``quiet``),
    the line that closes it (rich markup, from its result), and its variant on volumes (``--volumes``), if any."""

    run: Callable[..., dict[str, Any]]
    done: Callable[[dict[str, Any]], str]
    volumes: Demo | None = None


def _classification_done(volumes: bool) -> Callable[[dict[str, Any]], str]:
    def done(r: dict[str, Any]) -> str:
        return (f"[bold green]Demo done[/] in {r['wall_seconds']:.0f} s: test ACC {r['test_acc']:.3f}, "
                f"AUC {r['test_auc']:.3f} on {r['test_images']} images.\n"
                f"  run directory: {r['run']}\n  report: {r['report']}\n"
                f"  next: lepton predict {r['run']} {'SERIES_FOLDER' if volumes else 'IMAGE.png'}")

    return done


#: The demos by name (``lepton demo --task NAME``): one per task, and pathology's slides. A new task's demo is a
#: function above and one entry here.
DEMOS: dict[str, Demo] = {
    "classification": Demo(run_demo, _classification_done(False),
                           volumes=Demo(run_volume_demo, _classification_done(True))),
    "segmentation": Demo(run_segmentation_demo, lambda r: (
        f"[bold green]Segmentation demo done[/] in {r['wall_seconds']:.0f} s: test Dice {r['test_dice']:.3f} on "
        f"{r['test_cases']} cases; DICOM SEG: {r['new_case']['prediction']['dicom_seg']}")),
    "detection": Demo(run_detection_demo, lambda r: (
        f"[bold green]Detection demo done[/] in {r['wall_seconds']:.0f} s: test mAP {r['images']['map']:.3f} "
        f"(images), {r['volumes']['map']:.3f} (volumes); CPM {r['images']['cpm']:.3f}, {r['volumes']['cpm']:.3f}")),
    "sequence": Demo(run_sequence_demo, lambda r: (
        f"[bold green]Sequence demo done[/] in {r['wall_seconds']:.0f} s: test MAE {r['test_mae']:.2f} (predicting "
        f"the mean: {r['baseline_mae']:.2f}), R² {r['test_r2']:.3f} on {r['test_clips']} clips; served == offline: "
        f"{r['example']['agree']}")),
    "pathology": Demo(run_pathology_demo, lambda r: (
        f"[bold green]Pathology demo done[/] in {r['wall_seconds']:.0f} s: slide AUC {r['test_auc']:.3f} (95% CI "
        f"{r['auc_ci95'][0]:.3f}-{r['auc_ci95'][1]:.3f}) on {r['split']['test']} test slides; heatmaps, GeoJSON and "
        f"reports in {r['model']}/predictions")),
}
