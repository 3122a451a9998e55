"""Active learning: suggest never proposes a labelled case and writes pre-annotations; import checks label names,
mask geometry and values, and earlier labels, and records rounds."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lepton.data.tools.synthetic import make_synthetic
from lepton.errors import ConfigError, DataError
from lepton.label.importer import _check_mask, import_labels, read_case
from lepton.label.rounds import open_labels
from lepton.label.suggest import STRATEGIES, k_center, suggest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one PyTorch thread (conftest's ``one_thread``)."""


@pytest.fixture(scope="module")
def pool(tmp_path_factory, synthetic_npz):
    """Twelve labelled training images of the run slipped among 20 new ones."""
    labelled = np.load(synthetic_npz)["train_images"][:12]
    new, _, _ = make_synthetic(20, 32, seed=9)
    path = tmp_path_factory.mktemp("pool") / "pool.npz"
    np.savez(path, images=np.concatenate([new[:10], labelled, new[10:]]))
    return path


def read_rows(path):
    return list(csv.DictReader(open(path)))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_suggest_never_proposes_a_labelled_case(tiny_run, pool, tmp_path, strategy):
    rows = suggest(tiny_run, pool, n=100, strategy=strategy, output=tmp_path)
    cases = {r["case"] for r in rows}
    assert len(rows) == 20 and not cases & {f"pool.npz#{i}" for i in range(10, 22)}
    assert read_rows(tmp_path / "suggestions.csv")[0]["label"] in tiny_run.label_names
    if strategy in ("entropy", "tta"):
        scores = [r["score"] for r in rows]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0


def test_rounds_import_checks_and_later_suggestions(tiny_run, pool, tmp_path):
    labels = tmp_path / "labelling"
    suggest(tiny_run, pool, n=5, strategy="entropy", output=tmp_path / "r1", labels=labels)
    csv_path = tmp_path / "r1" / "suggestions.csv"
    rows = read_rows(csv_path)
    bad = [{**rows[0], "label": "pneumothorax"}, *rows[1:]]
    write(tmp_path / "bad.csv", bad)
    with pytest.raises(DataError, match=r"bad.csv: line 2 .*'pneumothorax' is not one of the run's labels.*correct"):
        import_labels(tiny_run, tmp_path / "bad.csv", labels)
    assert not (labels / "labels.csv").exists()  # nothing recorded
    done = import_labels(tiny_run, csv_path, labels)
    assert done["round"] == 1 and done["added"] == 5 and open_labels(labels).next_round == 2
    again = suggest(tiny_run, pool, n=100, strategy="random", output=tmp_path / "r2", labels=labels)
    assert len(again) == 15 and not {r["case"] for r in again} & {r["case"] for r in rows}
    flipped = [{**rows[0], "label": next(n for n in tiny_run.label_names if n != rows[0]["label"])}]
    write(tmp_path / "flip.csv", flipped)
    with pytest.raises(DataError, match="already labelled .* in round 1; give --overwrite"):
        import_labels(tiny_run, tmp_path / "flip.csv", labels)
    assert import_labels(tiny_run, tmp_path / "flip.csv", labels, overwrite=True)["replaced"] == 1
    assert [r["round"] for r in open_labels(labels).rounds] == [1, 2]
    with pytest.raises(ConfigError, match="strategy 'bald'"):
        suggest(tiny_run, pool, strategy="bald", output=tmp_path / "x")


def write(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_mask_geometry_and_unknown_labels_are_refused(tmp_path):
    from lepton.data.readers.io import read_image

    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    names = ["background", "liver"]

    def nifti(name, data, aff=affine):
        nib.save(nib.Nifti1Image(data, aff), tmp_path / name)
        return name

    (frame,) = read_image(tmp_path / nifti("image.nii.gz", np.random.default_rng(0).random((6, 6, 4), np.float32)),
                          slices="volume")
    pixels, image_affine = frame.pixels, frame.affine

    def check(mask, where="x"):
        return _check_mask(mask, tmp_path, pixels, image_affine, names, where)[1]

    good = nifti("good.nii.gz", np.ones((6, 6, 4), np.uint8))
    assert check(good) is None
    problem = check(nifti("spacing.nii.gz", np.ones((6, 6, 4), np.uint8), np.diag([1.0, 1.0, 3.0, 1.0])),
                    "rows.csv: line 2")
    assert "rows.csv: line 2" in problem and "spacing" in problem and "resample the mask" in problem
    assert "shapes differ" in check(nifti("shape.nii.gz", np.ones((6, 5, 4), np.uint8)))
    problem = check(nifti("values.nii.gz", np.full((6, 6, 4), 3, np.uint8)))
    assert "label value(s) [3]" in problem and "relabel" in problem
    (tmp_path / "labels.json").write_text('{"0": "background", "1": "spleen"}')
    assert "spleen" in check(good) and "the run's are" in check(good)


def test_k_center_picks_the_far_cases_first():
    labelled = np.zeros((3, 2))
    pool = np.array([[0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [-4.0, 0.0]])
    picks, gaps = k_center(pool, labelled, 3)
    assert picks.tolist()[:2] == [2, 3] and gaps[0] > gaps[1] > gaps[2]  # the far pair once, then the other side


@pytest.mark.slow
def test_segmentation_preannotations_on_the_image_grid_and_back(tmp_path):
    import shutil

    from lepton.data.tools.synthetic import write_segmentation_cases
    from lepton.train import train

    root = write_segmentation_cases(tmp_path / "seg", n=6, dims=3, shape=(16, 16, 16), seed=0)
    run = train(str(root), name="seg", output_dir=str(tmp_path / "runs"), epochs=1, batch_size=2, quiet=True,
                model="unet", threads=1, data_engine="memory")
    pool = tmp_path / "pool"
    pool.mkdir()
    for p in sorted((write_segmentation_cases(tmp_path / "new", n=2, dims=3, shape=(16, 16, 16), seed=5)
                     / "imagesTr").glob("*.nii.gz")):
        shutil.copy(p, pool / f"new_{p.name}")
    shutil.copy(root / "imagesTr" / "case000.nii.gz", pool / "case000.nii.gz")  # labelled: never proposed
    rows = suggest(run, pool, n=10, strategy="tta", output=tmp_path / "sugg")
    assert sorted(r["case"] for r in rows) == ["new_case000.nii.gz", "new_case001.nii.gz"]
    mask, image = (nib.as_closest_canonical(nib.load(rows[0][k])) for k in ("mask", "path"))
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)  # the same voxels in space
    done = import_labels(run, tmp_path / "sugg" / "suggestions.csv", tmp_path / "labelling")
    assert done["added"] == 2 and done["round"] == 1
    assert suggest(run, pool, n=10, strategy="entropy", output=tmp_path / "s2", labels=tmp_path / "labelling") == []


# -- shapes: COCO and GeoJSON pre-annotations and corrected shapes back --------------------------------------------
NAMES = ["background", "lesion", "vessel"]


def _label_map():
    labels = np.zeros((20, 24), np.uint8)
    labels[2:9, 3:11] = 1
    labels[4:7, 5:8] = 0  # a hole: COCO carries it as RLE
    labels[12:20, 0:5] = 2  # touching the image's left and bottom edges
    labels[14:17, 15:22] = 1
    return labels


def test_shapes_round_trip_through_coco_and_geojson(tmp_path):
    import json

    from lepton.label.shapes import coco_document, geojson_document, read_coco, read_geojson

    labels = _label_map()
    doc = coco_document([("a.png", labels)], NAMES)
    assert [c["name"] for c in doc["categories"]] == ["lesion", "vessel"] and len(doc["annotations"]) == 3
    holed = [a for a in doc["annotations"] if isinstance(a["segmentation"], dict)]
    assert len(holed) == 1 and holed[0]["bbox"] == [3, 2, 8, 7] and holed[0]["area"] == 7 * 8 - 9
    (tmp_path / "a.json").write_text(json.dumps(doc))
    [(_, name, size, build)] = read_coco(tmp_path / "a.json", NAMES)
    assert name == "a.png" and size == (20, 24) and np.array_equal(build((20, 24))[0], labels)
    gj = geojson_document(labels, NAMES)
    assert {f["properties"]["classification"]["name"] for f in gj["features"]} == {"lesion", "vessel"}
    assert all(f["properties"]["objectType"] == "annotation" for f in gj["features"])
    (tmp_path / "a.geojson").write_text(json.dumps(gj))
    assert np.array_equal(read_geojson(tmp_path / "a.geojson", (20, 24), NAMES)[0], labels)


def test_shapes_with_unknown_labels_or_outside_the_image_are_refused(tmp_path):
    import json

    from lepton.label.shapes import coco_document, geojson_document, read_coco, read_geojson

    labels = _label_map()
    gj = geojson_document(labels, NAMES)
    gj["features"][0]["properties"]["classification"]["name"] = "tumour"
    (tmp_path / "bad.geojson").write_text(json.dumps(gj))
    with pytest.raises(DataError, match=r"bad.geojson: feature 1: label 'tumour' is not one of the run's labels"):
        read_geojson(tmp_path / "bad.geojson", (20, 24), NAMES)
    gj = geojson_document(labels, NAMES)
    gj["features"][1]["geometry"]["coordinates"][0][0] = [30.0, 5.0]
    (tmp_path / "out.geojson").write_text(json.dumps(gj))
    with pytest.raises(DataError, match=r"out.geojson: feature 2: the shape reaches outside the image \(24 x 20"):
        read_geojson(tmp_path / "out.geojson", (20, 24), NAMES)
    doc = coco_document([("a.png", labels)], NAMES)
    doc["categories"].append({"id": 7, "name": "tumour"})
    (tmp_path / "cat.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"cat.json: category 7: label 'tumour' is not one of the run's labels"):
        read_coco(tmp_path / "cat.json", NAMES)
    doc = coco_document([("a.png", labels)], NAMES)
    (tmp_path / "size.json").write_text(json.dumps(doc))
    [(_, _, _, build)] = read_coco(tmp_path / "size.json", NAMES)
    with pytest.raises(DataError, match=r"is 24 x 20 px in the COCO file but 32 x 32 px on disk"):
        build((32, 32))


@pytest.mark.slow
def test_2d_preannotations_as_coco_and_geojson_and_back(tmp_path):
    import json
    import shutil

    from lepton.data.tools.synthetic import write_segmentation_cases
    from lepton.train import train

    root = write_segmentation_cases(tmp_path / "seg", n=6, dims=2, shape=(32,), seed=0)
    run = train(str(root), name="seg", output_dir=str(tmp_path / "runs"), epochs=1, batch_size=2, quiet=True,
                threads=1, data_engine="memory", image_size=32)
    pool = tmp_path / "pool"
    pool.mkdir()
    new = write_segmentation_cases(tmp_path / "new", n=2, dims=2, shape=(32,), seed=5)
    for p in sorted((new / "images").glob("*.png")):
        shutil.copy(p, pool / f"new_{p.name}")
    rows = suggest(run, pool, n=5, strategy="entropy", output=tmp_path / "sugg")
    coco = json.loads((tmp_path / "sugg" / "preannotations.coco.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == [r["path"] for r in rows] and len(rows) == 2
    assert all(r["geojson"].endswith(".geojson") for r in rows)
    done = import_labels(run, tmp_path / "sugg" / "preannotations.coco.json", tmp_path / "labelling")
    assert done["added"] == 2
    done = import_labels(run, tmp_path / "sugg" / "suggestions.csv", tmp_path / "labelling2", column="geojson")
    assert done["added"] == 2
    gj = json.loads(Path(rows[0]["geojson"]).read_text())
    gj["features"].append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [5, 1],
                           [5, 5], [1, 1]]]}, "properties": {"classification": {"name": "tumour"}}})
    Path(rows[0]["geojson"]).write_text(json.dumps(gj))
    with pytest.raises(DataError, match=r"(?s)1 row\(s\) refused.*label 'tumour' is not one of the run's labels"):
        import_labels(run, tmp_path / "sugg" / "suggestions.csv", tmp_path / "labelling3", column="geojson")


@pytest.mark.slow
def test_suggest_ranks_unlabelled_slides_by_entropy_with_qupath_geojson(tmp_path):
    """A slide model trained for an epoch on 12 tiny slides ranks three new slides (its own 12, in the same folder,
    left out) by entropy around its threshold and writes each chosen slide's attended regions as QuPath GeoJSON."""
    import json

    from typer.testing import CliRunner

    from lepton.cli import app
    from lepton.data.readers.tiling import TileSpec
    from lepton.data.tools.slidegen import write_slide_set
    from lepton.label.slides import suggest_slides, threshold_entropy
    from lepton.pathology.embed import Backbone
    from lepton.pathology.workflow import train_slides

    slides = tmp_path / "slides"
    manifest = write_slide_set(slides / "train", 12, size=768, seed=1)
    write_slide_set(slides / "new", 3, size=768, seed=2)
    cache = tmp_path / "cache"
    model = tmp_path / "model"
    train_slides(manifest, model, spec=TileSpec(mpp=1.0, size=64, min_tissue=0.5),
                 backbone=Backbone.random(input_size=32), epochs=1, cache=cache, n_bootstrap=10, quiet=True)
    rows = suggest_slides(model, slides, n=2, strategy="entropy", output=tmp_path / "out", cache=cache)
    report = json.loads((tmp_path / "out" / "suggest.json").read_text())
    assert report["pool"] == 15 and report["labelled_excluded"] == 12 and report["training_slides_known"]
    assert [r["rank"] for r in rows] == [1, 2] and all("/new/" in r["path"] for r in rows)
    everything = suggest_slides(model, slides / "new", n=5, strategy="entropy", output=tmp_path / "all", cache=cache)
    scores = [r["score"] for r in everything]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    threshold = json.loads((model / "slide_model.json").read_text())["threshold"]
    assert np.allclose(threshold_entropy([threshold, 0.0, 1.0], threshold), [np.log(2), 0, 0], atol=1e-6)
    assert all(abs(r["score"] - float(threshold_entropy(r["probability"], threshold))) < 1e-4 for r in everything)
    with open(tmp_path / "all" / "suggestions.csv") as fh:
        assert [r["path"] for r in csv.DictReader(fh)] == [r["path"] for r in everything]
    for row in everything:
        collection = json.loads(Path(row["geojson"]).read_text())
        assert collection["type"] == "FeatureCollection" and collection["features"]
        for feature in collection["features"]:
            ring = feature["geometry"]["coordinates"][0]
            assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) >= 4
            assert all(-64 <= x <= row["width"] + 64 and -64 <= y <= row["height"] + 64 for x, y in ring)
            assert feature["properties"]["classification"]["name"] == "tumour (attention)"
    with pytest.raises(ConfigError, match="does not rank whole slides"):
        suggest_slides(model, slides / "new", strategy="tta", output=tmp_path / "tta")
    result = CliRunner().invoke(app, ["label", "suggest", str(model), str(slides / "new"), "--n", "1", "--strategy",
                                      "random", "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "cli" / "preannotations").glob("*.geojson"))) == 1


@pytest.mark.slow
def test_round_report_prices_each_rounds_gain_with_cis_and_a_plot(tiny_run, synthetic_npz, tmp_path):
    import shutil

    from lepton.data.readers.unlabelled import pixel_hash
    from lepton.data.tools.synthetic import LABEL_NAMES
    from lepton.errors import RunError
    from lepton.label.report import round_report
    from lepton.train import train

    new, ys, _ = make_synthetic(16, 32, seed=11)
    np.savez(tmp_path / "new.npz", images=new)
    record = open_labels(tmp_path / "labelling")  # two rounds recorded as import records them (the decoded pixels)
    for no, part in ((1, range(10)), (2, range(10, 16))):
        record.add_round([{"case": f"new.npz#{i}", "sha256": pixel_hash(read_case(f"new.npz#{i}", tmp_path)[0]),
                           "label": LABEL_NAMES[ys[i]]} for i in part], f"round{no}.csv", no)
    # round 0: a copy of the session's run (its val report is written below); round 1: retrained with round 1's labels
    start = shutil.copytree(tiny_run.path, tmp_path / "r0")
    source = dict(np.load(synthetic_npz))
    source["train_images"] = np.concatenate([source["train_images"], new[:10]])
    source["train_labels"] = np.concatenate([source["train_labels"], ys[:10, None]])
    np.savez(tmp_path / "round1.npz", **source)
    after = train(tmp_path / "round1.npz", preset="default", name="r1", output_dir=str(tmp_path), epochs=1,
                  batch_size=32, quiet=True, seed=0).path

    # given in either order, the runs are paired with rounds by the rounds' cases found in their data
    report = round_report(tmp_path / "labelling", [after, start], tmp_path / "report", evaluate_missing=True)
    r0, r1 = report["rounds"]
    assert (Path(r0["run"]), Path(r1["run"])) == (start, after) and r1["round_cases_found"] == {1: 10, 2: 0}
    assert report["metric"] == "auc" and report["rounds_trained"] == 1 and report["rounds_recorded"] == 2
    assert (r0["labels_added"], r1["labels_added"]) == (0, 10)
    assert r1["labels_total"] - r0["labels_total"] == 10 and r1["check"] == "ok"
    for r in (r0, r1):
        assert r["ci95"][0] <= r["auc"] <= r["ci95"][1]
        assert r["from"] == str(Path(r["run"]) / "eval" / "val" / "report.json")
    assert r0["gain"] is None and r1["gain"] == pytest.approx(r1["auc"] - r0["auc"])
    table = (tmp_path / "report" / "report.md").read_text()
    assert f"| 1 | 10 | {r1['labels_total']} | {r1['auc']:.4f} [" in table
    assert "| 0 | 0 |" in table and "1 recorded round(s) have no run" in table
    assert (tmp_path / "report" / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # by position (--no-match) the order given stands: swapped, the round-1 row's training images fail the check
    swapped = round_report(tmp_path / "labelling", [after, start], tmp_path / "report3", match=False)["rounds"]
    assert swapped[1]["gain"] == pytest.approx(-r1["gain"]) and "trained on 168 images" in swapped[1]["check"]
    up, down = sorted((r1, swapped[1]), key=lambda r: r["gain"], reverse=True)  # one of the two orders gains
    assert up["labels_per_point"] == pytest.approx(10 / (up["gain"] / 0.01)) and down["labels_per_point"] is None
    # without a val report the stored figure stands, without a CI
    shutil.rmtree(start / "eval")
    assert round_report(tmp_path / "labelling", [start], tmp_path / "report2")["rounds"][0]["ci95"] is None

    with pytest.raises(ConfigError, match="4 runs for 2 round"):
        round_report(tmp_path / "labelling", [start, after, after, after], tmp_path / "x")
    with pytest.raises(DataError, match="no rounds recorded.*lepton label import"):
        round_report(tmp_path / "nothing", [start], tmp_path / "x")
    (tmp_path / "half").mkdir()
    shutil.copy(start / "config.yaml", tmp_path / "half" / "config.yaml")
    with pytest.raises(RunError, match="half: not a complete run"):
        round_report(tmp_path / "labelling", [start, tmp_path / "half"], tmp_path / "x")
