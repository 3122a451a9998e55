"""Segmentation data: image + mask pairs from Decathlon folders, paired folders and manifests; masks as PNG, NIfTI
and DICOM SEG; every way a pair can be wrong, refused naming the case; the metrics on known answers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from lepton.data.readers.dicomseg import read_seg, write_seg
from lepton.data.readers.masks import load_segmentation, read_mask
from lepton.data.readers.series import read_series
from lepton.data.readers.volume import network_affine, network_order
from lepton.data.tools.synthetic import nodule_phantom, write_dicom_series, write_segmentation_cases
from lepton.errors import DataError
from lepton.tasks.seg_metrics import case_metrics, detection, lesions, mean_ci

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"


def test_decathlon_and_paired_folders_load_with_geometry(tmp_path):
    root = write_segmentation_cases(tmp_path / "d3", n=6, dims=3)
    data = load_segmentation(root)
    assert len(data) == 6 and data.label_names == ["background", "nodule"] and data.spatial_dims == 3
    assert data.images[0].shape == data.masks[0].shape == (1, 16, 32, 32) and data.masks[0].dtype == np.uint8
    np.testing.assert_allclose(np.linalg.norm(data.affines[0][:3, :3], axis=0), [2.0, 1.0, 1.0])
    flat = load_segmentation(write_segmentation_cases(tmp_path / "d2", n=5, dims=2))
    assert flat.label_names == ["background", "opacity"] and flat.masks[0].shape == (1, 64, 64)
    assert set(np.unique(np.concatenate([m.ravel() for m in flat.masks]))) == {0, 1}  # 0/255 PNG read as 0/1
    assert flat.affines[0] is None


def test_a_manifest_and_a_palette_mask(tmp_path):
    img = (np.random.default_rng(0).random((20, 24)) * 255).astype(np.uint8)
    mask = np.zeros((20, 24), np.uint8)
    mask[2:6, 3:9], mask[10:15, 12:20] = 1, 2
    Image.fromarray(img).save(tmp_path / "a.png")
    pal = Image.fromarray(mask, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.save(tmp_path / "a_mask.png")
    (tmp_path / "m.csv").write_text("path,mask,patient_id\na.png,a_mask.png,P1\n")
    data = load_segmentation(tmp_path / "m.csv")
    assert data.label_names == ["background", "class 1", "class 2"] and data.has_patient_ids
    np.testing.assert_array_equal(data.masks[0][0], mask)  # palette indices are the classes


def write_pair(root: Path, image: np.ndarray, mask: np.ndarray, affine: np.ndarray, mask_affine=None):
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / "c.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine if mask_affine is None else mask_affine), root / "labelsTr" / "c.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "x"},
                                                   "training": [{"image": "./imagesTr/c.nii.gz",
                                                                 "label": "./labelsTr/c.nii.gz"}]}))
    return root


@pytest.mark.parametrize("fault, message", [
    ("shape", "image and mask shapes differ"),
    ("spacing", "spacing"),
    ("orientation", "orientation"),
    ("origin", "origins .* apart"),
    ("fraction", "whole class indices"),
    ("labels", "masks hold class 3 but only 2 label names"),
])
def test_bad_pairs_are_refused_naming_the_case(tmp_path, fault, message):
    image = np.random.default_rng(0).random((10, 12, 8)).astype(np.float32)
    mask = np.zeros((10, 12, 8), np.float32)
    mask[3:6, 4:8, 2:5] = 1
    affine, mask_affine = np.diag([1.0, 1.0, 2.0, 1.0]), None
    if fault == "shape":
        mask = mask[:, :, :7]
    elif fault == "spacing":
        mask_affine = np.diag([1.0, 1.0, 3.0, 1.0])
    elif fault == "orientation":
        mask_affine = np.diag([-1.0, 1.0, 2.0, 1.0])
    elif fault == "origin":
        mask_affine = affine.copy()
        mask_affine[:3, 3] = [5.0, 0, 0]
    elif fault == "fraction":
        mask[0, 0, 0] = 0.5
    elif fault == "labels":
        mask[0, 0, 0] = 3
    root = write_pair(tmp_path / fault, image, mask, affine, mask_affine)
    with pytest.raises(DataError, match=message) as err:
        load_segmentation(root)
    assert "c.nii.gz" in str(err.value) or fault == "labels"


def test_layouts_that_cannot_be_paired(tmp_path):
    (tmp_path / "p" / "images").mkdir(parents=True)
    (tmp_path / "p" / "masks").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "p" / "images" / "a.png")
    with pytest.raises(DataError, match="without a partner.*every image needs a mask"):
        load_segmentation(tmp_path / "p")
    root = tmp_path / "escape"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"labels": ["background", "x"],
                                                   "training": [{"image": "../../etc/passwd", "label": "x.nii.gz"}]}))
    with pytest.raises(DataError, match="points outside the data folder"):
        load_segmentation(root)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match="colour mask is ambiguous"):
        read_mask(tmp_path / "colour.png")
    Image.new("L", (8, 8)).save(tmp_path / "lossy.jpg")
    with pytest.raises(DataError, match="JPEG is lossy"):
        read_mask(tmp_path / "lossy.jpg")


def test_dicom_seg_round_trip_against_its_series(tmp_path):
    hu, truth = nodule_phantom(np.random.default_rng(3), (10, 24, 20), count=2)
    write_dicom_series(tmp_path / "s", hu, spacing=(0.7, 0.8, 2.5), origin=(-50, -60, 100))
    (volume,) = read_series(tmp_path / "s")
    labels = network_order(truth.transpose(2, 1, 0)[::-1, ::-1, :])  # where the series reader puts the voxels
    affine = network_affine(volume.affine, volume.shape)
    labels = labels.astype(np.uint8)
    labels[labels > 0] = np.where(np.arange(labels.size)[labels.ravel() > 0] % 2 == 0, 1, 2)  # two classes
    out = write_seg(labels, affine, tmp_path / "s", ["background", "a", "b"], tmp_path / "seg.dcm")
    back, back_affine = read_seg(out)
    np.testing.assert_array_equal(back[0], labels)
    np.testing.assert_allclose(back_affine, affine, atol=1e-4)
    import highdicom as hd

    seg = hd.seg.segread(str(out))
    assert [d.segment_label for d in seg.SegmentSequence] == ["a", "b"]
    assert {str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == \
        {str(ds.SOPInstanceUID) for ds in (__import__("pydicom").dcmread(p) for p in (tmp_path / "s").iterdir())}
    assert read_mask(out)[0].shape == back.shape  # a SEG is also a mask source for training
    empty = write_seg(np.zeros_like(labels), affine, tmp_path / "s", ["background", "a"], tmp_path / "empty.dcm")
    assert read_seg(empty)[0].shape == back.shape and not read_seg(empty)[0].any()  # "nothing found" is a result


def test_writing_a_seg_logs_no_uid(tmp_path):
    """highdicom logs at INFO the UID of each source it copies attributes from; writing a SEG (`lepton demo --task
    segmentation`, `predict --dicom-seg`) must not put one in the log, even with the CLI's --debug level."""
    code = f"""
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
from pathlib import Path
import numpy as np
from lepton.data.readers.dicomseg import read_seg, write_seg
from lepton.data.readers.series import read_series
from lepton.data.tools.synthetic import nodule_phantom, write_dicom_series
from lepton.data.readers.volume import network_affine, network_order
root = Path({str(tmp_path)!r})
hu, truth = nodule_phantom(np.random.default_rng(3), (6, 16, 16), count=1)
write_dicom_series(root / "s", hu, spacing=(1.0, 1.0, 2.0))
(volume,) = read_series(root / "s")
labels = network_order(truth.transpose(2, 1, 0)[::-1, ::-1, :]).astype(np.uint8)
read_seg(write_seg(labels, network_affine(volume.affine, volume.shape), root / "s", ["background", "a"],
                   root / "seg.dcm"))
logging.getLogger("lepton.test").info("logging reaches stderr")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "logging reaches stderr" in out.stderr  # the capture works, so an absent UID means none was logged
    import pydicom

    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    uids = {str(seg.SOPInstanceUID), str(seg.StudyInstanceUID), str(seg.FrameOfReferenceUID)} | {
        str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert not [u for u in uids if u in out.stderr]
    # anything UID-shaped, but the standard's own (transfer syntaxes, 1.2.840.10008.*: a codec's debug line names them)
    assert not re.search(r"(?<![\d.])1\.2\.(?!840\.10008\.)\d+(\.\d+)+", out.stderr), out.stderr


def test_metrics_on_known_answers():
    truth = np.zeros((20, 20, 20), np.uint8)
    truth[5:10, 5:10, 5:10] = 1
    pred = truth.copy()
    m = case_metrics(pred, truth, ["bg", "x"], (1.0, 1.0, 2.0))["x"]
    assert m["dice"] == 1.0 and m["iou"] == 1.0 and m["hd95"] == 0.0 and m["asd"] == 0.0
    assert m["true_size"] == pytest.approx(125 * 2 / 1000)  # 125 voxels of 2 mm³, in mL
    shifted = np.zeros_like(truth)
    shifted[5:10, 5:10, 6:11] = 1  # one voxel along the 2 mm axis
    m = case_metrics(shifted, truth, ["bg", "x"], (1.0, 1.0, 2.0))["x"]
    assert m["dice"] == pytest.approx(0.8) and m["hd95"] == pytest.approx(2.0)
    found = lesions(np.pad(truth, 1)[1:-1, 1:-1, 1:-1], None, ["bg", "x"], (1.0, 1.0, 2.0), np.diag([2, 1, 1, 1.0]))
    assert len(found) == 1 and found[0]["voxels"] == 125 and found[0]["centroid_mm"] == [14.0, 7.0, 7.0]
    probs = np.stack([1.0 - truth, truth]).astype(np.float32)
    extra = truth.copy()
    extra[15:17, 15:17, 15:17] = 1  # a false positive
    det = detection([(extra, truth, np.stack([1.0 - extra, extra * 0.6]))], ["bg", "x"])
    assert det["sensitivity"] == 1.0 and det["fp_per_case"] == 1.0 and det["froc"]["1"] == 1.0
    assert detection([(truth, truth, probs)], ["bg", "x"])["froc"]["0.125"] == 1.0
    mean, ci = mean_ci([0.5, 0.7, 0.9, float("nan")], n=500)
    assert mean == pytest.approx(0.7) and 0.5 <= ci[0] < 0.7 < ci[1] <= 0.9


@pytest.mark.skipif(not (SHARED / "dataset.json").is_file(), reason="the shared hippocampus data is not here")
def test_the_shared_hippocampus_folder_loads():
    data = load_segmentation(SHARED)
    assert len(data) >= 200 and data.label_names == ["background", "anterior", "posterior"]
    assert all(m.max() == 2 for m in data.masks[:10]) and data.spatial_dims == 3


@pytest.mark.parametrize("name", ["unet", "segresnet", "attention_unet"])
@pytest.mark.parametrize("dims", [2, 3])
def test_segmentation_networks_answer_on_the_input_grid(name, dims):
    import torch

    from lepton.models import create_model, model_info

    model = create_model(name, in_channels=1, num_classes=3, image_size=32, spatial_dims=dims).eval()
    shape = (1, 1, *([32] * dims))
    with torch.no_grad():
        assert model(torch.rand(*shape)).shape == (1, 3, *shape[2:])
    assert model_info(name).output == "map" and 16 % model_info(name).divisor == 0


def test_val_metrics_and_network_input_by_slabs_equal_the_whole_case(monkeypatch):
    import torch

    from lepton.data.transforms.preprocessing import Preprocessing
    from lepton.runs import network_input
    from lepton.tasks import get_task
    from lepton.tasks import segmentation as seg

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (1, 9, 6, 5)).astype(np.uint8)
    probs = rng.dirichlet([1, 1, 1], (9, 6, 5)).transpose(3, 0, 1, 2).astype(np.float32)
    pred = probs.argmax(0)
    dices = [2 * np.sum((pred == c) & (truth[0] == c)) / (np.sum(pred == c) + np.sum(truth[0] == c)) for c in (1, 2)]
    nll = -np.log(np.take_along_axis(probs, truth.astype(np.int64), 0)).mean()
    task = get_task("segmentation")
    whole = task.val_metrics([truth], [probs])
    monkeypatch.setattr(seg, "SLAB_VOXELS", 60)  # two slices of 6 x 5 per slab: five slabs, the last one short
    slabs = task.val_metrics([truth], [probs])
    for got in (whole, slabs):
        assert got["val_dice_1"] == pytest.approx(dices[0]) and got["val_dice_2"] == pytest.approx(dices[1])
        assert got["val_loss"] == pytest.approx(nll, rel=1e-6)
    empty = task.val_metrics([np.zeros_like(truth)], [np.stack([np.ones((9, 6, 5), np.float32), *[np.zeros(
        (9, 6, 5), np.float32)] * 2])])
    assert empty["val_dice"] == 1.0  # a class absent from both counts as agreement

    spec = Preprocessing(size=(4, 4, 4), channels=1, mean=[0.3], std=[0.2])
    pixels = rng.random((1, 9, 6, 5)).astype(np.float32)
    expected = spec.normalize(torch.from_numpy(pixels)[None])
    assert torch.equal(network_input(spec, pixels, slab_voxels=60), expected)


def test_val_metrics_let_each_case_go_before_the_next_is_read():
    import weakref

    from lepton.tasks import get_task

    rng = np.random.default_rng(1)
    truths = [rng.integers(0, 2, (1, 6, 5, 4)).astype(np.uint8) for _ in range(3)]
    alive = []

    def cases():  # as the cached validation yields them: one case's probabilities at a time
        for _ in truths:
            alive.append(any(ref() is not None for ref in refs))
            held = [rng.dirichlet([1, 1], (6, 5, 4)).transpose(3, 0, 1, 2).astype(np.float32)]
            refs.append(weakref.ref(held[0]))
            yield held.pop()

    refs: list = []
    out = get_task("segmentation").val_metrics(truths, cases())
    assert 0 <= out["val_dice"] <= 1 and alive == [False, False, False]
    with pytest.raises(ValueError, match="fewer outputs"):
        get_task("segmentation").val_metrics(truths, iter([np.full((2, 6, 5, 4), 0.5, np.float32)] * 2))
