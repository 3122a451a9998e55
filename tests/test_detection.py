"""Detection: box annotations (COCO, VOC, CSV; 2-D and 3-D), bad boxes, negatives, metrics on known cases, the
RetinaNet pieces, a tiny 2-D train → predict → serve and a 3-D case end to end."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
from PIL import Image

from lepton.errors import DataError

#: (file, boxes as (x0, y0, x1, y1, label)) — the third image has no finding.
TRUTH = {"a.png": [(2, 3, 10, 12, "cell"), (20, 20, 30, 28, "blob")], "b.png": [(5, 5, 15, 9, "cell")], "c.png": []}


def _images(root):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in TRUTH:
        Image.fromarray(rng.integers(0, 255, (32, 40), dtype=np.uint8)).save(root / name)  # 40 wide, 32 high
    return root


def _csv(root, truth=TRUTH, extra=()):
    path = root / "boxes.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "x0", "y0", "x1", "y1", "label"])
        for name, boxes in truth.items():
            for b in boxes:
                w.writerow([name, *b])
            if not boxes:
                w.writerow([name, "", "", "", "", ""])
        w.writerows(extra)
    return path


def _coco(root, truth=TRUTH):
    cats = {"blob": 1, "cell": 2}
    spec = {"images": [{"id": i, "file_name": n, "width": 40, "height": 32} for i, n in enumerate(truth)],
            "categories": [{"id": v, "name": k} for k, v in cats.items()], "annotations": []}
    for i, boxes in enumerate(truth.values()):
        for x0, y0, x1, y1, label in boxes:
            spec["annotations"].append({"id": len(spec["annotations"]), "image_id": i, "category_id": cats[label],
                                        "bbox": [x0, y0, x1 - x0, y1 - y0]})
    (root / "coco.json").write_text(json.dumps(spec))
    return root / "coco.json"


def _voc(root, truth=TRUTH):
    (root / "Annotations").mkdir(exist_ok=True)
    (root / "JPEGImages").mkdir(exist_ok=True)
    for name, boxes in truth.items():
        (root / "JPEGImages" / name).write_bytes((root / name).read_bytes())
        objects = "".join(f"<object><name>{lab}</name><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
                          f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>" for x0, y0, x1, y1, lab in boxes)
        (root / "Annotations" / (name[:-4] + ".xml")).write_text(
            f"<annotation><filename>{name}</filename><size><width>40</width><height>32</height></size>"
            f"{objects}</annotation>")
    return root


def _expected(data):
    got = {}
    for name, boxes, classes in zip(data.names, data.boxes, data.classes, strict=True):
        got[name.rsplit("/", 1)[-1]] = sorted((tuple(float(v) for v in b), data.label_names[c])
                                              for b, c in zip(boxes, classes, strict=True))
    return got


@pytest.mark.parametrize("fmt", ["csv", "coco", "voc"])
def test_every_format_reads_the_same_boxes_and_keeps_negatives(tmp_path, fmt):
    from lepton.data.readers.boxes import load_boxes
    from lepton.tasks import choose_task

    root = _images(tmp_path / "d")
    source = {"csv": _csv, "coco": _coco, "voc": _voc}[fmt](root)
    assert choose_task(source)[0] == "detection"
    data = load_boxes(source)
    assert data.label_names == ["blob", "cell"] and len(data) == 3
    want = {n: sorted(((float(y0), float(x0), float(y1), float(x1)), lab) for x0, y0, x1, y1, lab in b)
            for n, b in TRUTH.items()}
    assert _expected(data) == want  # (y0, x0, y1, x1) in pixels, the negative image kept with no box
    assert data.labels.tolist() == [1, 1, 0]
    targets = data.normalized_targets()
    assert targets.shape == (3, 2, 5) and targets[2, :, -1].tolist() == [-1, -1]
    np.testing.assert_allclose(targets[1, 0, :4], [5 / 32, 5 / 40, 9 / 32, 15 / 40])


def test_voc_split_lists_and_volumes_with_z(tmp_path):
    from lepton.data.readers.boxes import load_boxes

    root = _voc(_images(tmp_path / "voc"))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nc\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("b\n")
    assert load_boxes(root).splits.tolist() == ["train", "val", "train"]
    vol = tmp_path / "v"
    vol.mkdir()
    np.save(vol / "ct.npy", np.random.default_rng(0).random((8, 16, 20)).astype(np.float32))
    (vol / "boxes.csv").write_text("path,x0,y0,x1,y1,z0,z1,label\nct.npy,2,3,9,10,1,5,nodule\n")
    data = load_boxes(vol / "boxes.csv")
    assert data.spatial_dims == 3 and data.boxes[0].tolist() == [[1, 3, 2, 5, 10, 9]]  # (z0, y0, x0, z1, y1, x1)
    (vol / "flat.csv").write_text("path,x0,y0,x1,y1,label\nct.npy,2,3,9,10,nodule\n")
    with pytest.raises(DataError, match="flat.csv row 2: a 2-D box on a 3-D image"):
        load_boxes(vol / "flat.csv")


@pytest.mark.parametrize(("row", "message"), [
    (["a.png", 30, 5, 45, 9, "cell"], "boxes.csv row 6: box outside the image \\(x 30…45, the image spans 0…40"),
    (["a.png", 12, 5, 6, 9, "cell"], "boxes.csv row 6: inverted box \\(x0 = 12 > x1 = 6\\)"),
    (["a.png", 6, 5, 9, 5, "cell"], "boxes.csv row 6: zero-size box \\(y0 = y1 = 5\\)"),
    (["a.png", 6, -1, 9, 5, "cell"], "boxes.csv row 6: box outside the image"),
])
def test_bad_boxes_name_the_file_and_row_and_skip_bad_drops_them(tmp_path, row, message, caplog):
    from lepton.data.readers.boxes import load_boxes

    root = _images(tmp_path / "d")
    source = _csv(root, extra=[row])
    with pytest.raises(DataError, match=message) as err:
        load_boxes(source)
    assert "a.png" in str(err.value) and "--skip-bad" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="lepton.data"):
        data = load_boxes(source, skip_bad=True)
    assert sum(len(b) for b in data.boxes) == 3 and "dropping 1 bad box" in caplog.text


def test_bad_boxes_in_coco_and_voc_name_the_annotation_and_object(tmp_path):
    from lepton.data.readers.boxes import load_boxes

    root = _images(tmp_path / "d")
    bad = {**TRUTH, "b.png": [(5, 5, 50, 9, "cell")]}
    with pytest.raises(DataError, match="(?s)coco.json: 1 bad box.*b.png: annotation 2: box outside the image"):
        load_boxes(_coco(root, bad))
    (root / "coco.json").unlink()
    with pytest.raises(DataError, match="b.png: object 1 \\(cell\\): box outside the image"):
        load_boxes(_voc(root, bad))
    spec = json.loads(_coco(tmp_path / "d").read_text())
    spec["annotations"][0]["category_id"] = 9
    (root / "coco.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match="category_id 9 is not in categories"):
        load_boxes(root / "coco.json")


def _rows(boxes, dims=2, width=None):
    """Padded rows from [(coords…, [score,] class)]."""
    width = width or max(1, len(boxes))
    k = len(boxes[0]) if boxes else 2 * dims + 1
    out = np.zeros((width, k), np.float32)
    out[:, -1] = -1
    for i, b in enumerate(boxes):
        out[i] = b
    return out


def test_metrics_on_known_cases():
    from lepton.tasks.det_metrics import at_threshold, choose_threshold, cpm, detection_report, froc_points, match_all

    box = (0.1, 0.1, 0.3, 0.3)
    far = (0.6, 0.6, 0.8, 0.8)
    y = np.stack([_rows([(*box, 0), (*far, 0)]), _rows([], width=2)])
    perfect = np.stack([_rows([(*box, 0.9, 0), (*far, 0.8, 0)]), _rows([(0, 0, 0, 0, 0, -1)] * 2)])
    rep = detection_report(y, perfect, ["lesion"], 0.5, n_bootstrap=0)
    assert rep["map"] == pytest.approx(1.0) and rep["cpm"] == pytest.approx(1.0)
    # one hit at 0.9, a false positive at 0.8 (in the empty image), the second finding at 0.7:
    # precision 1 up to recall 1/2, then 2/3 at recall 1 -> 101-point AP = (51·1 + 50·2/3) / 101
    mixed = np.stack([_rows([(*box, 0.9, 0), (*far, 0.7, 0)]), _rows([(*box, 0.8, 0), (0, 0, 0, 0, 0, -1)])])
    rep = detection_report(y, mixed, ["lesion"], 0.85, n_bootstrap=0)
    assert rep["ap50"] == pytest.approx((51 + 50 * 2 / 3) / 101)
    fp, sens, _ = froc_points(match_all(y, mixed, 1), np.arange(2))
    np.testing.assert_allclose(fp, [0, 0.5, 0.5])
    np.testing.assert_allclose(sens, [0.5, 0.5, 1.0])
    # sensitivity 0.5 below 1/2 FP per image, 1.0 from 1/2 on: CPM = (2·0.5 + 5·1) / 7
    assert cpm(fp, sens)[0] == pytest.approx(6 / 7) and rep["cpm"] == pytest.approx(6 / 7)
    assert rep["at_threshold"]["sensitivity"] == 0.5 and rep["at_threshold"]["fp_per_image"] == 0
    chosen = choose_threshold(match_all(y, mixed, 1), 2)  # F1: 2/3 at 0.9, 1/2 at 0.8, 4/5 at 0.7
    assert chosen["threshold"] == pytest.approx(0.7) and chosen["sensitivity"] == 1.0
    assert at_threshold(match_all(y, mixed, 1), 2, 0.75)["false_positives"] == 1
    # a box hitting at IoU 0.25 counts for IoU thresholds 0.1 and 0.2 only: mAP over 0.1…0.5 = 2/5
    shifted = np.stack([_rows([(0.1, 0.1, 0.3, 0.9, 0.9, 0)]), _rows([(*far, 0.9, -1)])])
    single = np.stack([_rows([(*box, 0)]), _rows([], width=1)])
    rep = detection_report(single, shifted, ["lesion"], 0.5, n_bootstrap=200)
    assert rep["map"] == pytest.approx(2 / 5) and rep["ap50"] == 0.0
    # a right box of the wrong class is a miss for its class and a false positive for the other
    wrong = np.stack([_rows([(*box, 0.9, 1)]), _rows([(*far, 0.9, -1)])])
    rep = detection_report(single, wrong, ["lesion", "other"], 0.5, n_bootstrap=0)
    assert rep["per_class"]["lesion"]["ap"] == 0.0 and rep["per_class"]["other"]["ap"] is None



def test_3d_box_conventions_agree_from_the_writer_to_the_metric(tmp_path):
    """One convention from the generator to the score (#30): boxes as read hold exactly the nodule's voxels in
    (z, y, x) order with exclusive upper corners, the metric's 3-D IoU is the hand IoU, the detector's anchors sit at
    the centres of its stride-4 cells with the fitted shapes (not MONAI's rounded ones), and MONAI's box coder takes
    an anchor to a nodule box and back."""
    import torch

    from lepton.data.readers.boxes import load_boxes
    from lepton.data.readers.masks import read_mask
    from lepton.data.tools.synthetic import write_detection_cases
    from lepton.models.detection import FIRST_STRIDE, BoxDetector, BoxLoss
    from lepton.tasks.det_metrics import box_iou

    data = load_boxes(write_detection_cases(tmp_path, 3, dims=3, seed=0), window="-1000,1400")
    for name, image, boxes in zip(data.names, data.images, data.boxes, strict=True):
        mask = read_mask(name.replace("imagesTr", "labelsTr"))[0][0] > 0
        assert image.shape[1:] == mask.shape == (16, 32, 32)
        for box in boxes.astype(int):  # z0, y0, x0, z1, y1, x1: the box's voxels are the mask's, none outside
            inside = mask[box[0]:box[3], box[1]:box[4], box[2]:box[5]]
            assert inside.sum() == mask.sum() and inside[[0, -1]].any() and inside[:, :, [0, -1]].any()
    cube = np.array([[0, 0, 0, 5, 5, 5]], float)  # a 5-voxel nodule, the generator's usual size
    assert box_iou(cube, cube + 1)[0, 0] == pytest.approx(64 / (250 - 64))  # one voxel off on every axis: 0.344
    assert box_iou(cube, cube + np.array([1, 0, 0, 1, 0, 0]))[0, 0] == pytest.approx(100 / 150)  # off along z only
    net = BoxDetector(1, 1, spatial_dims=3)
    net.set_anchor_shapes(np.array([[3, 3, 3], [5, 5, 5], [7, 7, 7]], np.float32))
    net.train()
    with torch.no_grad():
        out = net(torch.zeros(1, 1, 16, 32, 32))
    first = out["anchors"][: int(out["locs"][0]) * 3]
    centres = (first[:, :3] + first[:, 3:]) / 2
    assert set(centres[:, 0].tolist()) == {2.0, 6.0, 10.0, 14.0}  # voxels 4i…4i+3 centre at 4i + 2
    assert set(centres[:, 2].tolist()) == {float(FIRST_STRIDE * i + 2) for i in range(8)}
    # the fitted shapes exactly (MONAI rounds corners to whole voxels: 5 -> 4, 3 -> 4, 7 -> 8)
    torch.testing.assert_close(first[:3], torch.tensor([[0.5] * 3 + [3.5] * 3, [-0.5] * 3 + [4.5] * 3,
                                                        [-1.5] * 3 + [5.5] * 3]))
    old = BoxDetector(1, 1, spatial_dims=3)  # a run saved before exact anchors keeps the anchors it trained on
    old.load_state_dict({k: v for k, v in net.state_dict().items() if k != "exact_anchors"})
    old.train()
    with torch.no_grad():
        rounded = old(torch.zeros(1, 1, 16, 32, 32))["anchors"][:3]
    torch.testing.assert_close(rounded[:, 3:] - rounded[:, :3], torch.tensor([[4.0] * 3, [4.0] * 3, [8.0] * 3]))
    coder = BoxLoss(3, 1).det.box_coder
    target = torch.tensor([[3.0, 10.0, 20.0, 8.0, 15.0, 25.0]])
    codes = coder.encode_single(target, first[:1])
    torch.testing.assert_close(coder.decode_single(codes, first[:1]), target)


def test_bootstrap_cis_cover_the_estimate():
    from lepton.tasks.det_metrics import detection_report

    rng = np.random.default_rng(0)
    ys, outs = [], []
    for _ in range(30):
        c = rng.uniform(0.1, 0.7, 2)
        ys.append(_rows([(*c, *(c + 0.2), 0)]))
        jitter = rng.normal(0, 0.05, 2)
        outs.append(_rows([(*(c + jitter), *(c + 0.2 + jitter), rng.uniform(0.3, 1), 0),
                           (*rng.uniform(0, 0.8, 2), 0.9, 0.95, rng.uniform(0, 0.6), 0)]))
    rep = detection_report(np.stack(ys), np.stack(outs), ["lesion"], 0.5, n_bootstrap=200)
    for key in ("map", "ap50", "cpm"):
        lo, hi = rep[f"{key}_ci95"]
        assert lo <= rep[key] <= hi and hi - lo > 0.01


def test_flip_tta_fuses_boxes_and_anchors_fit_the_boxes():
    import torch

    from lepton.models.detection import fit_anchor_shapes, fuse, unflip

    rows = torch.full((1, 100, 6), 0.0)
    rows[..., -1] = -1
    rows[0, 0] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.8, 0])
    flipped = rows.clone()
    flipped[0, 0] = torch.tensor([0.1, 0.6, 0.3, 0.8, 0.6, 0])  # the same box seen in the mirrored image
    back = unflip(flipped, 2)
    torch.testing.assert_close(back[0, 0, :4], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    fused = fuse(torch.cat([rows[0], back[0]]), 2, views=2)
    assert (fused[:, -1] >= 0).sum() == 1 and float(fused[0, -2]) == pytest.approx(0.7)
    lonely = fuse(torch.cat([rows[0], unflip(rows, 2)[0]]), 2, views=2)  # no match in the other view: half score
    assert (lonely[:, -1] >= 0).sum() == 2 and float(lonely[0, -2]) == pytest.approx(0.4)
    sizes = np.concatenate([np.full((20, 2), 6.0), np.full((20, 2), [10.0, 30.0])])
    shapes = fit_anchor_shapes(sizes)
    assert shapes.shape == (3, 2)
    for size in ([6, 6], [10, 30]):  # every box size is an anchor shape at some pyramid level
        assert any(np.allclose(s * k, size, rtol=0.2) for s in shapes for k in (1, 2, 4)), (size, shapes)


def test_box_augmentation_moves_boxes_with_the_image():
    import torch

    from lepton.tasks import get_task

    task = get_task("detection")
    x = torch.zeros(6, 1, 32, 48)
    x[:, :, 8:16, 4:20] = 1.0  # the finding, rows 8-16 and columns 4-20
    y = torch.full((6, 2, 5), -1.0)
    y[:, 0] = torch.tensor([8 / 32, 4 / 48, 16 / 32, 20 / 48, 0])
    gen = torch.Generator().manual_seed(3)
    xa, ya = task.augment(x, y, {"hflip": 0.5, "vflip": 0.5, "scale": 0.2, "translate": 0.1}, gen)
    assert not torch.equal(xa, x)
    for img, rows in zip(xa, ya, strict=True):
        if rows[0, -1] < 0:
            continue
        y0, x0, y1, x1 = (rows[0, :4] * torch.tensor([32, 48, 32, 48])).tolist()
        inside = img[0, int(np.ceil(y0)) + 1:int(y1) - 1, int(np.ceil(x0)) + 1:int(x1) - 1]
        assert inside.numel() and float(inside.mean()) > 0.9
        assert float(img[0].sum()) <= float(img[0, int(y0):int(np.ceil(y1)) + 1, int(x0):int(np.ceil(x1)) + 1].sum()
                                            ) + 1e-3  # nothing bright outside the moved box
    assert torch.equal(ya[:, 1], y[:, 1])  # padding stays padding


def test_volumes_are_resampled_and_reexposed_on_a_share_of_samples_images_on_all():
    import torch

    from lepton.tasks import get_task
    from lepton.tasks.detection import VOLUME_AUGMENT_P

    task = get_task("detection")
    gen = torch.Generator().manual_seed(0)
    for dims, expected in ((3, VOLUME_AUGMENT_P), (2, 1.0)):
        x = torch.rand(400, 1, *([8] * dims))
        y = torch.full((400, 1, 2 * dims + 1), -1.0)
        for opts in ({"scale": 0.2, "translate": 0.1}, {"brightness": 0.3}):
            xa, _ = task.augment(x, y, opts, gen)
            changed = float((xa - x).flatten(1).abs().amax(1).gt(1e-4).float().mean())
            assert abs(changed - expected) < 0.06, (dims, opts, changed)  # 400 draws: 4.9 binomial SDs at p = 0.2


def test_world_boxes_round_trip_through_the_affine(tmp_path):
    from lepton.data.readers.boxes import load_boxes, voxel_to_world_boxes, world_to_voxel_boxes
    from lepton.data.readers.io import read_image
    from lepton.data.tools.synthetic import write_detection_cases

    csv_path = write_detection_cases(tmp_path / "vol", 4, dims=3, seed=3)
    voxel = load_boxes(csv_path)
    # case000's one nodule: its world box from the NIfTI mask and nibabel's affine, independent of Lepton's reader
    import nibabel as nib

    label = nib.load(str(voxel.names[0]).replace("imagesTr", "labelsTr"))
    ijk = np.argwhere(np.asarray(label.dataobj) > 0)
    ends = np.concatenate([ijk - 0.5, ijk + 0.5]) @ label.affine[:3, :3].T + label.affine[:3, 3]
    affine = read_image(voxel.names[0], slices="volume")[0].affine
    assert len(voxel.boxes[0]) == 1
    np.testing.assert_allclose(voxel_to_world_boxes(voxel.boxes[0], affine)[0],
                               [*ends.min(0), *ends.max(0)])
    np.testing.assert_allclose(voxel_to_world_boxes(voxel.boxes[0], affine, "lps")[0],
                               [-ends[:, 0].max(), -ends[:, 1].max(), ends[:, 2].min(), -ends[:, 0].min(),
                                -ends[:, 1].min(), ends[:, 2].max()])
    oblique = np.array([[0.0, 0.8, -0.6, 5], [0.0, 0.6, 0.8, -2], [2.5, 0, 0, 7], [0, 0, 0, 1]])
    box = np.array([[2.0, 3.0, 4.0, 6.0, 9.0, 12.0]])
    np.testing.assert_allclose(world_to_voxel_boxes(voxel_to_world_boxes(box, oblique), oblique)[0, [0, 3]],
                               box[0, [0, 3]])  # the slice axis lies along z: exact; the rotated ones grow
    rows = [["path", "x0", "y0", "z0", "x1", "y1", "z1", "label", "space"]]
    for name, boxes in zip(voxel.names, voxel.boxes, strict=True):
        a = read_image(name, slices="volume")[0].affine
        for space in ("ras", "lps"):
            rows += [[name, *np.round(w, 4), "nodule", space] for w in voxel_to_world_boxes(boxes, a, space)]
        if not len(boxes):
            rows.append([name, "", "", "", "", "", "", "", ""])
    world_csv = tmp_path / "world.csv"
    with open(world_csv, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    world = load_boxes(world_csv)
    assert world.names == voxel.names
    for v, w in zip(voxel.boxes, world.boxes, strict=True):  # each box once per space, back where it was
        np.testing.assert_allclose(w, np.repeat(v, 2, axis=0) if len(v) else w, atol=1e-3)
    with open(world_csv, "a", newline="") as fh:
        csv.writer(fh).writerow([voxel.names[0], -3, -9, 7, -8, -14, 3, "nodule", "ras"])
    with pytest.raises(DataError, match=r"world.csv row \d+: world box with x1 ≤ x0"):
        load_boxes(world_csv)
    flat = _csv(_images(tmp_path / "flat"), extra=[["a.png", 1, 1, 5, 5, "cell"]])
    text = flat.read_text().splitlines()
    flat.write_text("\n".join([text[0] + ",space"] + [t + ",ras" for t in text[1:]]) + "\n")
    with pytest.raises(DataError, match="world .* boxes are 3-D"):
        load_boxes(flat)


@pytest.mark.slow
def test_sliding_windows_put_boxes_where_the_volume_has_them(one_thread):
    import torch

    from lepton.models.detection import BoxDetector

    torch.manual_seed(0)
    model = BoxDetector(1, 1, 3).eval()
    model.detector.set_box_selector_parameters(score_thresh=0.0, topk_candidates_per_level=100, nms_thresh=0.3,
                                               detections_per_img=100)  # an untrained network's weak boxes
    gen = torch.Generator().manual_seed(1)
    patch = torch.randn(1, 1, 16, 16, 16, generator=gen)
    big = torch.cat([torch.randn(1, 1, 16, 16, 16, generator=gen), patch], dim=-1)  # the patch as the right half
    with torch.no_grad():
        alone = model(patch)[0]
    rows = model.detect_windows(big, (16, 16, 16), overlap=0.0)[0]  # two windows, side by side
    assert rows.shape == alone.shape
    alone, rows = alone[alone[:, -1] >= 0], rows[rows[:, -1] >= 0]
    voxels = rows[:, :6] * torch.tensor([16, 16, 32.0] * 2)
    right = voxels[:, 2] >= 16
    shifted = voxels[right] - torch.tensor([0, 0, 16.0] * 2)
    torch.testing.assert_close(shifted[:2], alone[:2, :6] * 16)
    torch.testing.assert_close(rows[right][:2, -2], alone[:2, -2])
    assert bool((voxels[:, 3:] <= torch.tensor([16, 16, 32.0]) + 1e-4).all())


@pytest.mark.slow
def test_box_saliency_stays_with_its_box(one_thread):
    import torch

    from lepton.models.detection import BoxDetector

    torch.manual_seed(0)
    model = BoxDetector(1, 2, 2)
    x = torch.randn(1, 1, 128, 128)
    rows = torch.tensor([[8 / 128, 8 / 128, 24 / 128, 24 / 128, 0.9, 0],  # top left, class 0
                         [100 / 128, 96 / 128, 120 / 128, 120 / 128, 0.8, 1]])  # bottom right, class 1
    maps = model.box_saliency(x, rows)
    assert maps.shape == (2, 128, 128) and float(maps.max()) == 1.0 and model.training  # its mode restored
    for m, (lo, hi), far in ((maps[0], (0, 32), slice(88, None)), (maps[1], (88, 128), slice(None, 40))):
        y, x_ = divmod(int(m.argmax()), 128)
        assert lo <= y < hi and lo <= x_ < hi  # the peak in the box's corner of the image
        assert float(m[lo:hi, lo:hi].mean()) > 20 * float(m[far, far].mean())  # little in the opposite corner


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory):
    from lepton.data.tools.synthetic import write_detection_cases
    from lepton.train import train

    root = tmp_path_factory.mktemp("det2d")
    csv_path = write_detection_cases(root / "data", 24, dims=2, seed=1)
    run = train(csv_path, name="boxes", output_dir=str(root / "runs"), epochs=2, batch_size=8, time_budget_s=0,
                image_size=32, quiet=True, seed=0)
    return run, root / "data"


@pytest.mark.slow
def test_tiny_2d_train_predict_evaluate_and_serve_the_same_boxes(flat_run, tmp_path):
    import base64

    import httpx

    from conftest import auth, running
    from lepton.evaluate import evaluate
    from lepton.registry import Registry
    from lepton.serve import ServeConfig

    run, root = flat_run
    assert run.config.task == "detection" and run.config.model == "retinanet"
    assert {"val_map", "val_cpm", "threshold"} <= set(run.info)
    image = root / "images" / "case001.png"
    (offline,) = run.predict([image])
    assert offline["coordinates"].startswith("fractions") and offline["count"] == len(offline["boxes"])
    loose = {**run.info, "threshold": 0.0}  # every detection, to compare more than the thresholded few
    rows = run.predict_proba([np.asarray(Image.open(image), np.float32)[None] / 255])
    assert len(run.task.encode(rows[0], run.label_names, loose)["boxes"]) > 0
    from lepton.tasks.det_infer import explain_boxes

    kept_info, run.info = run.info, loose
    try:  # one Grad-CAM-style map per listed box, at the network's input size
        answer, maps = explain_boxes(run, np.asarray(Image.open(image), np.float32)[None] / 255)
    finally:
        run.info = kept_info
    assert maps.shape == (answer["count"], *run.preprocessing.size) and maps.min() >= 0 and maps.max() == 1
    # lepton explain: the three best boxes, each map over the image at its own size
    from lepton.explain import explain

    third = sorted((b["score"] for b in run.task.encode(rows[0], run.label_names, loose)["boxes"]), reverse=True)[2]
    few = {**run.info, "threshold": third - 1e-5}  # answers round scores to 5 decimals
    run.info = few
    try:
        (explained,) = explain(run, [image], output=tmp_path / "maps")
    finally:
        run.info = kept_info
    assert explained["count"] >= 3 and [b["box"] for b in explained["boxes"]] == \
        [b["box"] for b in run.task.encode(rows[0], run.label_names, few)["boxes"]]
    assert all(Image.open(b["overlay"]).size == Image.open(image).size for b in explained["boxes"])
    report = evaluate(run, split="test", n_bootstrap=50, output=tmp_path / "eval")
    assert 0 <= report["map"] <= 1 and "opacity" in report["per_class"] and (tmp_path / "eval" / "froc.png").is_file()
    reg = Registry.open(tmp_path / "reg")
    reg.register_run(run.path, "boxes")
    (run.path / "run.json").write_text(json.dumps(few))  # a version answering the three best boxes
    try:
        reg.register_run(run.path, "few-boxes")
    finally:
        (run.path / "run.json").write_text(json.dumps(kept_info))
    key = reg.create_key("clinic")
    with running(ServeConfig(models=["boxes", "few-boxes"], registry=str(tmp_path / "reg"), rate_limit=0)) as url:
        r = httpx.post(f"{url}/v1/models/few-boxes/predict?explain=gradcam", content=image.read_bytes(),
                       headers=auth(key), timeout=60)
        assert r.status_code == 200, r.text
        boxes = r.json()["boxes"]
        assert [b["box"] for b in boxes] == [b["box"] for b in explained["boxes"]]
        assert all(base64.b64decode(b["explanation"]["overlay_png_base64"]).startswith(b"\x89PNG") for b in boxes)
        r = httpx.post(f"{url}/v1/models/boxes/predict", content=image.read_bytes(), headers=auth(key), timeout=60)
        assert r.status_code == 200, r.text
        served = r.json()
        assert served["boxes"] == offline["boxes"] and served["threshold"] == pytest.approx(offline["threshold"])
        meta = httpx.get(f"{url}/v2/models/boxes", headers=auth(key)).json()
        assert [o["name"] for o in meta["outputs"]] == ["boxes", "scores", "labels"]
        pixels = run.preprocessing.resize([np.asarray(Image.open(image), np.float32)[None] / 255]).numpy()
        body = {"inputs": [{"name": "input", "shape": list(pixels.shape), "datatype": "FP32",
                            "data": pixels.ravel().tolist()}]}
        r = httpx.post(f"{url}/v2/models/boxes/infer", json=body, headers=auth(key), timeout=60)
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        labels = np.asarray(out["labels"]["data"]).reshape(out["labels"]["shape"])[0]
        scores = np.asarray(out["scores"]["data"]).reshape(out["scores"]["shape"])[0]
        assert int((labels >= 0).sum()) == offline["count"]
        np.testing.assert_allclose(sorted(scores[labels >= 0], reverse=True),
                                   [b["score"] for b in offline["boxes"]], atol=1e-4)


@pytest.mark.slow
def test_3d_boxes_end_to_end(tmp_path):
    from lepton.data.tools.synthetic import write_detection_cases
    from lepton.evaluate import evaluate
    from lepton.train import train

    csv_path = write_detection_cases(tmp_path / "vol", 16, dims=3, seed=2)
    run = train(csv_path, name="nodules", output_dir=str(tmp_path / "runs"), epochs=1, batch_size=4,
                time_budget_s=0, quiet=True, seed=0, tta=False)
    assert run.preprocessing.spatial_dims == 3 and run.preprocessing.size == (16, 32, 32)
    (answer,) = run.predict([tmp_path / "vol" / "imagesTr" / "case000.nii.gz"])
    rows = run.predict_proba([run.task.read(tmp_path / "vol" / "imagesTr" / "case000.nii.gz",
                                            run.preprocessing)[0][1]])
    assert rows.shape == (1, 100, 8)
    loose = run.task.encode(rows[0], run.label_names, {"threshold": 0.0})
    assert {"z0", "z1", "y0", "x1"} <= set(loose["boxes"][0]["box"]) and answer["count"] <= loose["count"]
    report = evaluate(run, split="test", n_bootstrap=20, plots=False)
    assert report["task"] == "detection" and report["images"] >= 1 and "cpm" in report
    # a volume twice the training size on each in-plane axis: slid over at the training scale, not shrunk
    import nibabel as nib

    from lepton.data.readers.boxes import voxel_to_world_boxes
    from lepton.data.tools.synthetic import nodule_phantom

    hu, _ = nodule_phantom(np.random.default_rng(4), (16, 64, 64), count=3)
    affine = np.diag([-0.5, -0.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0).copy(), affine), tmp_path / "big.nii.gz")
    run.info["threshold"] = 0.0  # every detection, so an untrained network's boxes are there to check
    (big,) = run.predict([tmp_path / "big.nii.gz"])
    (small,) = run.predict([tmp_path / "vol" / "imagesTr" / "case000.nii.gz"])
    assert big["windows"] > 1 and small["windows"] == 1 and big["count"] > 0
    assert small["count"] == loose["count"] and big["world_coordinates"] == "RAS mm"
    from lepton.data.readers.io import read_image

    frame = read_image(tmp_path / "big.nii.gz", slices="volume")[0]
    voxels = np.array([[b["voxels"][k] for k in ("z0", "y0", "x0", "z1", "y1", "x1")] for b in big["boxes"]])
    assert voxels.min() >= 0 and (voxels[:, 3:] <= [16, 64, 64]).all()
    np.testing.assert_allclose(voxels[:, [1, 2, 4, 5]] / 64, [[b["box"][k] for k in ("y0", "x0", "y1", "x1")]
                                                           for b in big["boxes"]], atol=1e-4)
    world = np.array([[b["world"][k] for k in ("x0", "y0", "z0", "x1", "y1", "z1")] for b in big["boxes"]])
    np.testing.assert_allclose(world, voxel_to_world_boxes(voxels, frame.affine), atol=2e-3)
    # the three best boxes: served on the volume's own grid as offline, and explained per box
    import base64
    import io

    import httpx

    from conftest import auth, running
    from lepton.explain import explain
    from lepton.registry import Registry
    from lepton.serve import ServeConfig

    run.info["threshold"] = big["boxes"][2]["score"] - 1e-5  # answers round scores to 5 decimals
    (run.path / "run.json").write_text(json.dumps(run.info))
    (offline,) = run.predict([tmp_path / "big.nii.gz"])
    assert offline["count"] >= 3 and offline["windows"] > 1
    rows = explain(run, [tmp_path / "big.nii.gz"], output=tmp_path / "maps")
    assert [b["box"] for b in rows[0]["boxes"]] == [b["box"] for b in offline["boxes"]]
    for box in rows[0]["boxes"]:
        heat = nib.load(box["nifti"])
        assert heat.shape == (16, 64, 64) and np.allclose(heat.affine, frame.affine)  # the volume's (d, h, w) grid
        assert float(np.asarray(heat.dataobj).max()) == pytest.approx(1.0)
        assert Image.open(box["overlay"]).size[0] > 0
    reg = Registry.open(tmp_path / "reg")
    reg.register_run(run.path, "nodules")
    key = reg.create_key("clinic")
    with running(ServeConfig(models=["nodules"], registry=str(tmp_path / "reg"), rate_limit=0)) as url:
        body = (tmp_path / "big.nii.gz").read_bytes()
        r = httpx.post(f"{url}/v1/models/nodules/predict", files={"file": ("big.nii.gz", body)}, headers=auth(key),
                       timeout=120)
        assert r.status_code == 200, r.text
        served = r.json()
        assert served["boxes"] == offline["boxes"] and served["windows"] == offline["windows"]
        assert served["world_coordinates"] == "RAS mm"
        r = httpx.post(f"{url}/v1/models/nodules/predict?explain=gradcam", files={"file": ("big.nii.gz", body)},
                       headers=auth(key), timeout=120)
        assert r.status_code == 200, r.text
        explained = r.json()["boxes"]
        assert [b["box"] for b in explained] == [b["box"] for b in offline["boxes"]]
        png = base64.b64decode(explained[0]["explanation"]["overlay_png_base64"])
        assert Image.open(io.BytesIO(png)).format == "PNG"
        r = httpx.post(f"{url}/v1/models/nodules/predict?explain=gradcam%2B%2B", files={"file": ("big.nii.gz", body)},
                       headers=auth(key), timeout=120)
        assert r.status_code == 422, r.text


def test_detection_refuses_what_boxes_do_not_allow(tmp_path):
    from lepton.config import TrainConfig
    from lepton.errors import ConfigError
    from lepton.tasks import choose_task, get_task

    task = get_task("detection")
    with pytest.raises(ConfigError, match="ensemble members' boxes cannot be averaged"):
        task.criterion(None, TrainConfig(task="detection", model="retinanet", ensemble=2))
    with pytest.raises(ConfigError, match="preprocessing steps move voxels, not boxes"):
        task.load("x.csv", window=None, slices="middle", steps=[{"step": "spacing"}], skip_bad=False)
    source = _csv(_images(tmp_path / "d"))
    with pytest.raises(ConfigError, match="--task segmentation contradicts the data"):
        choose_task(source, "segmentation")


def test_boxes_as_a_dicom_sr_parse_back_with_highdicom(tmp_path):
    import pydicom

    from lepton.data.readers.boxes import voxel_to_world_boxes
    from lepton.data.readers.io import read_image
    from lepton.data.tools.synthetic import write_dicom_series
    from lepton.pacs.sr import answer_sr, read_boxes

    hu = np.full((6, 20, 24), -1000.0, np.float32)
    hu[3, 7, 15] = 1000.0  # slice 3, row 7, column 15 of the series
    files = write_dicom_series(tmp_path / "series", hu, spacing=(0.7, 0.8, 2.5), origin=(-50.0, -60.0, 10.0))
    frame = read_image(tmp_path / "series", slices="volume", window="0,4000")[0]
    d, h, w = np.unravel_index(np.argmax(frame.pixels[0]), frame.pixels.shape[1:])
    world = voxel_to_world_boxes(np.array([[d, h, w, d + 1, h + 1, w + 1]]), frame.affine)[0]
    evidence = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    answer = {"threshold": 0.5, "count": 1, "boxes": [{"label": "nodule", "score": 0.8, "box": {},
                                                       "world": dict(zip(["x0", "y0", "z0", "x1", "y1", "z1"],
                                                                         world.tolist(), strict=True))}]}
    answer_sr(evidence, answer, model="nodules", version=2).save_as(tmp_path / "sr.dcm")
    (box,) = read_boxes(pydicom.dcmread(tmp_path / "sr.dcm"))
    assert box["label"] == "nodule" and box["score"] == pytest.approx(0.8)
    assert box["series"] == str(evidence[0].SeriesInstanceUID)
    centre = [-50.0 + 15 * 0.7, -60.0 + 7 * 0.8, 10.0 + 3 * 2.5]  # the voxel's centre from the DICOM geometry (LPS)
    np.testing.assert_allclose(box["lps"], [*(np.subtract(centre, [0.35, 0.4, 1.25])),
                                            *(np.add(centre, [0.35, 0.4, 1.25]))], atol=1e-4)
    flat = {"threshold": 0.5, "count": 2, "boxes": [
        {"label": "nodule", "score": 0.9, "box": {"y0": 0.25, "x0": 0.5, "y1": 0.5, "x1": 0.75}},
        {"label": "mass", "score": 0.6, "box": {"y0": 0.0, "x0": 0.0, "y1": 0.1, "x1": 0.125}}]}
    answer_sr(evidence[:1], flat, model="cxr", version=1).save_as(tmp_path / "flat.dcm")
    said = sorted(read_boxes(pydicom.dcmread(tmp_path / "flat.dcm")), key=lambda b: -b["score"])
    assert [(b["label"], b["score"]) for b in said] == [("nodule", pytest.approx(0.9)), ("mass", pytest.approx(0.6))]
    np.testing.assert_allclose([b["pixels"] for b in said], [[12, 5, 18, 10], [0, 0, 3, 2]], atol=1e-4)
    assert said[0]["image"] == str(evidence[0].SOPInstanceUID)


def test_box_uncertainty_peaks_at_the_threshold_and_mirrored_answers_agree():
    from lepton.tasks.detection import Detection

    def rows(*boxes):
        out = np.zeros((1, 3, 6), np.float32)
        out[..., -1] = -1
        for k, box in enumerate(boxes):
            out[0, k] = box
        return out

    task, info = Detection(), {"threshold": 0.3}
    near, sure, faint = (rows((0.1, 0.1, 0.3, 0.3, s, 0)) for s in (0.3, 0.95, 0.03))
    h = task.uncertainty(np.concatenate([near, sure, faint, rows()]), info)
    assert h[0] == pytest.approx(np.log(2)) and h[0] > h[1] > 0 and h[0] > h[2] > 0 and h[3] == 0
    moved, other = rows((0.1, 0.6, 0.3, 0.8, 0.5, 0)), rows((0.1, 0.1, 0.3, 0.3, 0.5, 1))
    d = task.disagreement(np.concatenate([near, near, near, rows()]),
                          np.concatenate([near, moved, other, rows()]), info)
    assert d.tolist() == pytest.approx([0, 1, 1, 0])  # the same box; moved away; another class; no boxes


@pytest.mark.slow
def test_suggest_writes_box_preannotations_that_read_back_and_import(flat_run, tmp_path, one_thread):
    import shutil

    from lepton.data.readers.boxes import load_boxes
    from lepton.data.tools.synthetic import write_detection_cases
    from lepton.errors import ConfigError
    from lepton.label.importer import import_labels
    from lepton.label.suggest import suggest

    run, root = flat_run
    pool = tmp_path / "pool"
    pool.mkdir()
    new = write_detection_cases(tmp_path / "new", 6, dims=2, seed=7).parent
    for p in sorted((new / "images").glob("*.png")):
        shutil.copy(p, pool / f"new_{p.name}")
    shutil.copy(root / "images" / "case000.png", pool / "case000.png")  # in the run's data: never proposed
    kept_info, run.info = run.info, {**run.info, "threshold": 0.05}  # a tiny run: enough boxes to check
    try:
        rows = suggest(run, pool, n=10, strategy="entropy", output=tmp_path / "s")
        assert sorted(r["case"] for r in rows) == [f"new_case{i:03d}.png" for i in range(6)]
        scores = [r["score"] for r in rows]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0
        by_csv, by_coco = (load_boxes(tmp_path / "s" / f, validate=False)
                           for f in ("preannotations.csv", "preannotations.coco.json"))
        assert by_coco.label_names == run.label_names and sum(r["boxes"] for r in rows) > 0
        for data in (by_csv, by_coco):  # the run's own boxes, in the image's pixels, in both files
            assert data.names == [r["path"] for r in rows]
            for name, boxes, classes in zip(data.names, data.boxes, data.classes, strict=True):
                (answer,) = run.predict([name])
                w, h = Image.open(name).size
                want = sorted((b["box"]["y0"] * h, b["box"]["x0"] * w, b["box"]["y1"] * h, b["box"]["x1"] * w,
                               b["label"]) for b in answer["boxes"])
                got = sorted((*b, data.label_names[c]) for b, c in zip(boxes.tolist(), classes, strict=True))
                assert [g[4] for g in got] == [w[4] for w in want]
                np.testing.assert_allclose([g[:4] for g in got], [w[:4] for w in want], atol=0.02)
        tta = suggest(run, pool, n=3, strategy="tta", output=tmp_path / "t")
        assert len(tta) == 3 and [r["score"] for r in tta] == sorted((r["score"] for r in tta), reverse=True)
        assert tta[0]["score"] > 0.01  # the two views apart, not the run's flip TTA fused into one answer
        with pytest.raises(ConfigError, match="coreset"):
            suggest(run, pool, n=3, strategy="coreset", output=tmp_path / "c")
    finally:
        run.info = kept_info
    lines = (tmp_path / "s" / "preannotations.csv").read_text().splitlines()
    first = rows[0]["path"]
    for extra, message in (([f"{first},1,1,999,9,opacity,"], r"box outside the image \(x 1…999"),
                           ([f"{first},1,1,9,9,tumour,"], r"label\(s\) \['tumour'\] are not the run's"),
                           ([f"{root / 'images' / 'case000.png'},1,1,9,9,opacity,"], "already labelled .* in the "
                                                                                      "run's data")):
        (tmp_path / "bad.csv").write_text("\n".join([*lines, *extra]) + "\n")
        with pytest.raises(DataError, match=message) as refused:
            import_labels(run, tmp_path / "bad.csv", tmp_path / "labelling")
        assert "--skip-bad" not in str(refused.value)
        assert not (tmp_path / "labelling" / "labels.csv").exists()  # nothing recorded
    (tmp_path / "fixed.csv").write_text("\n".join([*lines, f"{first},2,3,12,14,opacity,"]) + "\n")
    done = import_labels(run, tmp_path / "fixed.csv", tmp_path / "labelling")
    assert done["round"] == 1 and done["added"] == 6
    assert import_labels(run, tmp_path / "s" / "preannotations.coco.json", tmp_path / "labelling",
                         overwrite=True)["replaced"] == 1  # the first image's boxes as the run gave them
    assert suggest(run, pool, n=10, output=tmp_path / "s2", labels=tmp_path / "labelling") == []
