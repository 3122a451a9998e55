"""The data picks the task: layouts read from names, headers and a few files; traps refused with the fix; an explicit
task that contradicts the layout refused naming both; `lepton train` without --task trains what the data holds."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import lepton_cmd, write_png_folder
from lepton.data.index.layout import detect_layout, looks_like_label_map
from lepton.data.tools.synthetic import write_segmentation_cases
from lepton.errors import ConfigError, DataError
from lepton.tasks import choose_task, inspect_data

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(lepton_cmd(*args), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def decathlon(tmp_path_factory) -> Path:
    return write_segmentation_cases(tmp_path_factory.mktemp("dec") / "nodules", n=6, dims=3)


@pytest.fixture(scope="module")
def paired(tmp_path_factory) -> Path:
    return write_segmentation_cases(tmp_path_factory.mktemp("pair") / "cxr", n=6, dims=2, shape=(32,))


def test_segmentation_layouts_pick_segmentation(decathlon, paired, tmp_path):
    task, layout = choose_task(decathlon)
    assert (task, layout.name) == ("segmentation", "decathlon")
    assert layout.describe() == "task: segmentation — Decathlon layout (dataset.json), 6 cases, labels nodule"
    task, layout = choose_task(paired)
    assert (task, layout.name, layout.labels) == ("segmentation", "paired-folders", ["background", "opacity"])
    assert "images/ and masks/" in layout.evidence and "6 cases" in layout.evidence
    (paired / "m.csv").write_text("path,mask\nimages/case000.png,masks/case000.png\n"
                                  "images/case001.png,masks/case001.png\n")
    task, layout = choose_task(paired / "m.csv")
    assert (task, layout.name, layout.cases) == ("segmentation", "mask-manifest", 2)


def test_classification_layouts_pick_classification(tmp_path, synthetic_npz):
    folder = write_png_folder(tmp_path / "cls")
    task, layout = choose_task(folder)
    assert (task, layout.name, layout.labels) == ("classification", "class-folders", ["normal", "pneumonia"])
    assert choose_task(synthetic_npz)[0] == "classification"
    (tmp_path / "l.csv").write_text("path,label\ncls/normal/0.png,normal\n")
    assert choose_task(tmp_path / "l.csv")[1].name == "label-manifest"


def test_inspect_names_the_task_and_labels(decathlon, tmp_path):
    report = inspect_data(str(decathlon))
    assert report["task"] == "segmentation" and report["labels"] == ["background", "nodule"]
    assert report["cases"] == 6 and report["classes"]["nodule"]["cases"] >= 1 and not report["problems"]
    assert report["spacing_mm"]["median"] == [2.0, 1.0, 1.0]
    out = run_cli("data", "inspect", str(decathlon))
    assert out.returncode == 0, out.stderr
    assert "task: segmentation — Decathlon layout (dataset.json), 6 cases, labels nodule" in out.stdout
    classified = inspect_data(str(write_png_folder(tmp_path / "cls")))
    assert classified["task"] == "classification" and classified["classes"] == ["normal", "pneumonia"]


def _trap(root: Path, image_dir: str, mask_dir: str, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for folder in (image_dir, mask_dir):
        (root / folder).mkdir(parents=True)
    for i in range(n):
        Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(root / image_dir / f"c{i}.png")
        mask = np.zeros((16, 16), np.uint8)
        mask[4:9, 3:8] = 1 + i % 2
        Image.fromarray(mask).save(root / mask_dir / f"c{i}.png")
    return root


@pytest.mark.parametrize("image_dir,mask_dir", [("scans", "segmentations"), ("train/images", "train/masks"),
                                                ("photos", "outlines")])
def test_images_and_masks_as_two_classes_are_refused(tmp_path, image_dir, mask_dir):
    root = _trap(tmp_path / "trap", image_dir, mask_dir)
    with pytest.raises(DataError, match="--task segmentation"):
        detect_layout(root)
    out = run_cli("train", str(root), "--epochs", "1")
    assert out.returncode != 0 and "--task segmentation" in out.stderr and "Traceback" not in out.stderr


def test_same_names_in_two_real_classes_are_not_a_trap(tmp_path):
    root = tmp_path / "cls"
    rng = np.random.default_rng(1)
    for cls in ("normal", "effusion"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(root / cls / f"{i:04d}.png")
    assert detect_layout(root).task == "classification"
    assert not looks_like_label_map(root / "normal" / "0000.png")


def test_a_single_class_and_a_nested_data_set_are_refused(tmp_path, decathlon):
    single = tmp_path / "single"
    (single / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(single / "images" / "a.png")
    with pytest.raises(DataError, match="only one class folder .images.*--task segmentation"):
        detect_layout(single)
    nested = tmp_path / "nested"
    (nested / "ok").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(nested / "ok" / "a.png")
    (nested / "hippo").symlink_to(decathlon, target_is_directory=True)
    with pytest.raises(DataError, match=r"hippo: this class folder holds dataset.json.*point Lepton at"):
        detect_layout(nested)


def test_a_contradicting_task_is_refused_naming_both(decathlon, tmp_path):
    with pytest.raises(ConfigError, match=r"--task classification contradicts the data: .* Decathlon layout .* "
                                          r"segmentation data"):
        choose_task(decathlon, "classification")
    folder = write_png_folder(tmp_path / "cls")
    with pytest.raises(ConfigError, match=r"--task segmentation contradicts .* class folders.* classification"):
        choose_task(folder, "segmentation")
    assert choose_task(decathlon, "segmentation")[0] == "segmentation"
    out = run_cli("train", str(decathlon), "--task", "classification", "--epochs", "1")
    assert out.returncode != 0 and "contradicts" in out.stderr and "Traceback" not in out.stderr


def test_layouts_of_tasks_not_yet_in_lepton_are_named(tmp_path):
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "Annotations" / "a.xml").write_text("<annotation><object><bndbox/></object></annotation>")
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x0,y0,x1,y1,label\na.png,1,1,4,4,cell\n")
    slides = tmp_path / "slides"
    (slides / "tumour").mkdir(parents=True)
    (slides / "tumour" / "s1.svs").write_bytes(b"II*\x00")
    for source, layout in ((voc, "voc"), (coco, "coco"), (boxes, "box-manifest")):  # the detection task reads them
        assert (choose_task(source)[0], choose_task(source)[1].name) == ("detection", layout)
    with pytest.raises(ConfigError, match="--task classification contradicts the data: .* detection data"):
        choose_task(boxes, "classification")
    for source, task in ((slides, "pathology"),):
        with pytest.raises(ConfigError, match=f"that is {task} data, and Lepton has no {task} task yet"):
            choose_task(source)


def test_label_maps_are_told_from_images(tmp_path):
    mask = np.zeros((5, 6, 7), np.uint8)
    mask[1:3, 2:4, 2:5] = 2
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "m.nii.gz")
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32), np.eye(4)),
             tmp_path / "i.nii.gz")
    assert looks_like_label_map(tmp_path / "m.nii.gz") and not looks_like_label_map(tmp_path / "i.nii.gz")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    assert not looks_like_label_map(tmp_path / "bad.png")


def test_help_names_every_task():
    import sys

    built_in = json.loads(subprocess.run([sys.executable, "-c", "import json, lepton.tasks as t; "
                                          "print(json.dumps(t.list_tasks()))"], capture_output=True, text=True,
                                         check=True).stdout)
    top, train = run_cli("--help", timeout=60), run_cli("train", "--help", timeout=60)
    assert {"classification", "segmentation"} <= set(built_in)
    for task in built_in:
        assert task in top.stdout and task in train.stdout


@pytest.mark.slow
def test_train_without_task_trains_segmentation_on_a_decathlon_folder(decathlon, tmp_path):
    out = run_cli("train", str(decathlon), "--epochs", "1", "--time-budget", "0", "--batch-size", "2",
                  "--output-dir", str(tmp_path), "--name", "seg", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "task: segmentation — Decathlon layout (dataset.json), 6 cases, labels nodule" in out.stderr
    summary = json.loads(out.stdout)
    assert summary["task"] == "segmentation" and 0.0 <= summary["val_dice"] <= 1.0
    config = (tmp_path / "seg" / "config.yaml").read_text()
    assert "task: segmentation" in config and "preset: segmentation" in config and "model: unet" in config


@pytest.mark.skipif(not (SHARED / "hippocampus" / "dataset.json").is_file(), reason="shared hippocampus not here")
def test_the_shared_hippocampus_folder_is_segmentation_data():
    task, layout = choose_task(SHARED / "hippocampus")
    assert task == "segmentation" and layout.labels == ["background", "anterior", "posterior"]
    assert layout.describe().startswith("task: segmentation — Decathlon layout (dataset.json), ")
    assert layout.describe().endswith("cases, labels anterior, posterior")
    with pytest.raises(ConfigError, match="contradicts"):
        choose_task(SHARED / "hippocampus", "classification")


@pytest.mark.skipif(not (SHARED / "bccd").is_dir(), reason="shared BCCD boxes not here")
def test_the_shared_bccd_folder_is_box_data():
    task, layout = choose_task(SHARED / "bccd")
    assert (task, layout.name) == ("detection", "voc") and "Pascal VOC" in layout.evidence


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["paired", "csv"])
def test_train_without_task_on_paired_folders_and_mask_csvs(paired, tmp_path, kind):
    source = paired
    if kind == "csv":
        rows = "".join(f"images/case{i:03d}.png,masks/case{i:03d}.png\n" for i in range(6))
        (paired / "seg.csv").write_text("path,mask\n" + rows)
        source = paired / "seg.csv"
    out = run_cli("data", "inspect", str(source))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "task: segmentation" in out.stdout and "opacity" in out.stdout
    out = run_cli("train", str(source), "--epochs", "1", "--time-budget", "0", "--batch-size", "2",
                  "--output-dir", str(tmp_path), "--name", kind, "--quiet")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["task"] == "segmentation" and "task: segmentation" in out.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "hippocampus" / "dataset.json").is_file(), reason="shared hippocampus not here")
def test_train_on_the_shared_hippocampus_folder_without_options_is_segmentation(tmp_path):
    out = run_cli("train", str(SHARED / "hippocampus"), "--epochs", "1", "--time-budget", "0",
                  "--output-dir", str(tmp_path), "--name", "hippo", "--quiet", timeout=900)
    assert out.returncode == 0, out.stderr
    assert "task: segmentation — Decathlon layout (dataset.json)" in out.stderr
    config = (tmp_path / "hippo" / "config.yaml").read_text()
    assert "task: segmentation" in config and "preset: segmentation" in config
    run = json.loads((tmp_path / "hippo" / "run.json").read_text())
    assert run["task"] == "segmentation" and {"val_dice_1", "val_dice_2"} <= set(run)
