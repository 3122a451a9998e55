"""Clinical validation: subgroup columns and metrics, DICOM ages, decision curves, recalibration served as a new
version, external validation, the validation report and the registry's promotion rule."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import lepton_cmd, png_bytes, running
from lepton.errors import DataError, RegistryError


def write_dicom(path: Path, *, age: str, sex: str, manufacturer: str, institution: str, pixels: np.ndarray) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MRN-12345", "19790101"
    ds.PatientAge, ds.PatientSex, ds.Manufacturer = age, sex, manufacturer
    ds.InstitutionName, ds.ViewPosition, ds.Modality = institution, "PA", "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_ages_sex_and_sites_are_read_without_identifiers(tmp_path):
    from lepton.data import load_dataset
    from lepton.validation.covariates import age_band, covariate_table, parse_age

    assert parse_age("045Y") == 45 and parse_age("006M") == 0.5
    assert parse_age("010W") == pytest.approx(10 * 7 / 365.25) and parse_age("003D") == pytest.approx(3 / 365.25)
    assert parse_age("") is None and parse_age("abc") is None and parse_age("999Y") is None and parse_age("62") == 62
    assert [age_band(a) for a in (0.5, 17.9, 18, 45, 79.99, 80, None)] == \
        ["0-17", "0-17", "18-39", "40-59", "60-79", "80+", "unknown"]
    rng = np.random.default_rng(0)
    rows = []
    for i, (age, sex, maker, site) in enumerate([("045Y", "F", "ACME", "St Elsewhere"), ("006M", "M", "Zeta", "Mercy"),
                                                 ("081Y", "", "ACME", "St Elsewhere")]):
        write_dicom(tmp_path / f"{i}.dcm", age=age, sex=sex, manufacturer=maker, institution=site,
                    pixels=rng.integers(0, 255, (16, 16)))
        rows.append({"path": f"{i}.dcm", "label": "ab"[i % 2]})
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    table = covariate_table(load_dataset(tmp_path / "m.csv"))
    assert list(table["age_band"]) == ["40-59", "0-17", "80+"] and list(table["age"]) == ["45", "0.5", "81"]
    assert list(table["sex"]) == ["F", "M", "unknown"] and list(table["manufacturer"]) == ["ACME", "Zeta", "ACME"]
    assert table["site"][0] == table["site"][2] != table["site"][1] and table["site"][0].startswith("site-")
    text = json.dumps({k: list(v) for k, v in table.items()})
    assert "Elsewhere" not in text and "Doe" not in text and "MRN" not in text and "1979" not in text
    assert "PatientID" not in table and "patient_id" not in table


def test_a_missing_subgroup_column_names_it_and_the_available_ones(tmp_path, tiny_run):
    from lepton.data import load_dataset
    from lepton.evaluate import evaluate
    from lepton.validation.covariates import subgroup_columns

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,label,patient_age,scanner\na.png,x,61,ACME\na.png,y,40,Zeta\n")
    with pytest.raises(DataError, match=r"no subgroup column 'ethnicity'; available: age, age_band, manufacturer, "
                                        r"patient_age, scanner"):
        subgroup_columns(load_dataset(tmp_path / "m.csv"), ["age_band", "ethnicity"])
    with pytest.raises(DataError, match=r"no subgroup column 'sex'; available: none"):
        evaluate(tiny_run, split="test", by=["sex"], n_bootstrap=0, plots=False, output=tmp_path / "e", track=[])


def test_subgroups_of_size_zero_and_one_are_reported_and_flagged():
    from lepton.validation.subgroups import binary_scorer, fairlearn_frame, subgroup_metrics

    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(40), np.ones(40)].astype(np.int64)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 80), 0, 1)
    pred = (p >= 0.5).astype(np.int64)
    band = np.array(["40-59", "60-79"] * 39 + ["40-59", "80+"], dtype=object)  # 80+ has one image, 0-17 none
    table = subgroup_metrics({"age_band": band}, binary_scorer(y, p, pred), events=y, n_bootstrap=200, min_size=30)
    groups = {g["group"]: g for g in table["columns"]["age_band"]["groups"]}
    assert list(groups) == ["0-17", "18-39", "40-59", "60-79", "80+"]
    empty, single, big = groups["0-17"], groups["80+"], groups["40-59"]
    assert empty["n"] == 0 and empty["too_small"] and empty["metrics"]["auc"] is None and empty["ci95"]["auc"] is None
    assert single["n"] == 1 and single["too_small"] and single["metrics"]["auc"] is None  # AUC needs both classes
    assert single["ci95"]["sensitivity"] is None and "1 images (< 30)" in single["reason"]
    assert not big["too_small"] and big["ci95"]["auc"][0] < big["metrics"]["auc"] < big["ci95"]["auc"][1]
    from sklearn.metrics import roc_auc_score

    assert big["metrics"]["auc"] == pytest.approx(roc_auc_score(y[band == "40-59"], p[band == "40-59"]))
    rest = band != "40-59"
    assert big["gap"]["auc"] == pytest.approx(big["metrics"]["auc"] - roc_auc_score(y[rest], p[rest]))
    gap = table["columns"]["age_band"]["largest_gap"]["auc"]
    assert gap["group"] in ("40-59", "60-79") and gap["ci95"][0] < gap["gap"] < gap["ci95"][1]
    frame = fairlearn_frame(y, p, pred, {"age_band": band})
    assert frame.by_group.loc["40-59", "auc"] == pytest.approx(big["metrics"]["auc"])
    assert frame.by_group.loc["40-59", "sensitivity"] == pytest.approx(big["metrics"]["sensitivity"])


@pytest.mark.slow  # alone it pays MONAI's import (the surface distances); in the suite that is paid already
def test_segmentation_subgroups_average_each_cases_dice_from_the_task_report():
    from lepton.tasks import get_task
    from lepton.tasks.seg_metrics import dice_iou
    from lepton.validation.subgroups import mean_scorer, subgroup_metrics

    rng = np.random.default_rng(0)
    labels = ["background", "lesion"]
    truths, outputs = [], []
    for i in range(8):
        truth = np.zeros((16, 16), np.int64)
        truth[4:10, 4:10] = 1
        pred = np.roll(truth, i % 4, axis=1)  # shifted further in some cases: lower Dice
        probs = np.stack([1.0 - pred, pred]).astype(np.float32) * 0.9 + 0.05
        truths.append(truth[None])
        outputs.append(probs + rng.uniform(0, 0.01, probs.shape).astype(np.float32))
    task = get_task("segmentation")
    body, _ = task.report(truths, outputs, labels, {}, n_bootstrap=0, plots=None)
    name, dice = task.unit_scores(body, labels)
    assert name == "dice" and task.unit == "case"
    expected = [dice_iou(o.argmax(0), t[0], 1)[0] for o, t in zip(outputs, truths, strict=True)]
    np.testing.assert_allclose(dice, expected, atol=1e-4)  # the report rounds to 4 decimals
    site = np.array(["A", "B"] * 4, dtype=object)
    table = subgroup_metrics({"site": site}, mean_scorer(dice, "dice"), n_bootstrap=100, min_size=2, unit="case")
    a = table["columns"]["site"]["groups"][0]
    assert table["unit"] == "case" and a["group"] == "A" and a["n"] == 4
    assert a["metrics"]["dice"] == pytest.approx(np.mean(dice[site == "A"]))
    assert a["gap"]["dice"] == pytest.approx(np.mean(dice[site == "A"]) - np.mean(dice[site == "B"]))


def test_decision_curve_and_operating_points_match_a_hand_computed_case():
    from lepton.validation.decision import decision_curve, operating_points

    y = np.array([1, 1, 0, 0, 0])
    p = np.array([0.9, 0.4, 0.6, 0.2, 0.1])
    curve = {r["threshold"]: r for r in decision_curve(y, p, [0.25, 0.5])["curve"]}
    # at 0.5: TP 1, FP 1 of 5 → 1/5 − 1/5 · 1 = 0; treat all 2/5 − 3/5 · 1 = −0.2
    assert curve[0.5]["model"] == pytest.approx(0.0) and curve[0.5]["treat_all"] == pytest.approx(-0.2)
    # at 0.25: TP 2, FP 1 → 2/5 − 1/5 · (1/3); treat all 2/5 − 3/5 · (1/3) = 0.2
    assert curve[0.25]["model"] == pytest.approx(0.4 - 0.2 / 3, abs=1e-6)
    assert curve[0.25]["treat_all"] == pytest.approx(0.2)
    assert curve[0.25]["treat_none"] == 0
    (row,) = operating_points(y, p, {"chosen": 0.5}, prevalence=0.1)
    # sensitivity 1/2, specificity 2/3: PPV = .05/(.05 + .3), NPV = .6/(.6 + .05)
    assert row["sensitivity"] == 0.5 and row["specificity"] == pytest.approx(2 / 3)
    assert row["ppv"] == pytest.approx(0.05 / 0.35) and row["npv"] == pytest.approx(0.6 / 0.65)
    with pytest.raises(Exception, match="prevalence must be a proportion"):
        decision_curve(y, p, prevalence=1.5)


def test_platt_and_isotonic_maps_agree_in_numpy_and_torch_and_mend_the_slope():
    import torch

    from lepton.tasks.calibration import apply_calibration, calibrate_probs, calibration_fit, fit_calibration

    rng = np.random.default_rng(0)
    z = rng.normal(0, 1, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(np.int64)
    p = 1 / (1 + np.exp(-3 * z - 1))  # overconfident and shifted: slope 1/3, CITL below 0
    before = calibration_fit(y[2000:], p[2000:])
    assert before["slope"] == pytest.approx(1 / 3, abs=0.05) and before["citl"] < -0.2
    for method in ("platt", "isotonic"):
        record = fit_calibration(y[:2000], p[:2000], method)  # fitted on one half, measured on the other
        after = calibration_fit(y[2000:], apply_calibration(p[2000:], record))
        assert abs(after["slope"] - 1) < abs(before["slope"] - 1) / 2, method  # held-out: at least halfway to 1
        assert abs(after["citl"]) < abs(before["citl"]) / 5, method
        probs = torch.tensor(np.c_[1 - p[:50], p[:50]], dtype=torch.float32)
        np.testing.assert_allclose(calibrate_probs(probs, record)[:, 1].numpy(), apply_calibration(p[:50], record),
                                   atol=1e-5)


@pytest.fixture(scope="module")
def local_site(tmp_path_factory):
    """Another site's labelled data: the synthetic set at another seed, darker and lower in contrast."""
    from lepton.data.tools.synthetic import write_synthetic_npz

    root = tmp_path_factory.mktemp("site")
    path = write_synthetic_npz(root / "site.npz", n=160, size=32, seed=7)
    arrays = dict(np.load(path))
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = (arrays[f"{split}_images"] * 0.55 + 20).astype(np.uint8)
    np.savez(root / "shifted.npz", **arrays)
    return root / "shifted.npz"


@pytest.mark.slow
def test_a_recalibrated_version_serves_the_recalibrated_probabilities(tmp_path, tiny_run, local_site):
    from lepton.registry import Registry
    from lepton.runs import load_run
    from lepton.serve import ServeConfig
    from lepton.tasks.calibration import apply_calibration
    from lepton.validation.calibrate import calibrate

    reg = Registry.open(tmp_path / "reg")
    reg.register_run(tiny_run.path, "cxr")
    result = calibrate(tiny_run, local_site, method="platt", split="val", output=tmp_path / "calibrated",
                       registry=reg, name="cxr")
    assert result["version"] == "cxr@2" and result["record"]["method"] == "platt"
    assert abs(result["after"]["slope"] - 1) < 1e-3 < abs(result["before"]["slope"] - 1)  # Platt on its own data
    card = reg.card("cxr@2")
    assert "Probabilities recalibrated (platt)" in card and str(local_site) in card
    calibrated = load_run(tmp_path / "calibrated")
    data = png_bytes(3)
    pixels = np.asarray(Image.open(io.BytesIO(data)), np.float32)[None] / 255
    raw = tiny_run.predict_proba([pixels])[0]
    expected = calibrated.predict_proba([pixels])[0]
    assert expected[1] == pytest.approx(apply_calibration(raw[1:], result["record"])[0], abs=1e-6)
    assert abs(expected[1] - raw[1]) > 1e-4  # the map moved it
    assert calibrated.threshold == pytest.approx(float(apply_calibration(np.array([tiny_run.threshold]),
                                                                         result["record"])[0]))
    with running(ServeConfig(models=["cxr@2"], registry=str(tmp_path / "reg"), rate_limit=0, auth=False)) as url:
        body = httpx.post(f"{url}/v1/models/cxr/predict", files={"file": ("x.png", data)}).json()
    assert body["version"] == 2
    got = [body["probabilities"][n] for n in calibrated.label_names]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert body["label"] == calibrated.label_names[int(expected[1] >= calibrated.threshold)]


def test_promotion_to_production_needs_a_report_when_the_rule_is_on(tmp_path, tiny_run):
    from lepton.registry import Registry

    reg = Registry.open(tmp_path / "reg")
    reg.register_run(tiny_run.path, "cxr")
    reg.register_run(tiny_run.path, "cxr")
    assert reg.settings() == {"require_validation_report": False}
    reg.promote("cxr", 1, "production")  # the rule is off: allowed
    reg.set_setting("require_validation_report", "true")
    with pytest.raises(RegistryError, match=r"cxr@2 has no validation report, and this registry requires one"):
        reg.promote("cxr", 2, "production")
    assert reg.get("cxr@production").version == 1
    reg.promote("cxr", 2, "staging")  # only production is guarded
    with pytest.raises(RegistryError, match="unknown registry setting"):
        reg.set_setting("require_everything", True)
    with pytest.raises(RegistryError, match="takes true or false"):
        reg.set_setting("require_validation_report", "maybe")
    reg.attach_report("cxr@2", "# Validation report\n", "<p>report</p>", {"highlights": {"AUC": "0.9"}})
    assert reg.promote("cxr", 2, "production").stage == "production"
    assert "## Validation report" in reg.card("cxr@2") and "- AUC: 0.9" in reg.card("cxr@2")
    assert reg.report("cxr@2") == "# Validation report\n" and reg.report("cxr@2", "html") == "<p>report</p>"
    assert Registry.open(tmp_path / "reg").settings()["require_validation_report"] is True  # kept in the database


@pytest.mark.slow
def test_external_validation_flags_a_shift_and_the_report_is_attached(tmp_path, tiny_run, local_site):
    from lepton.registry import Registry
    from lepton.validation.report import validation_report

    reg = Registry.open(tmp_path / "reg")
    reg.register_run(tiny_run.path, "cxr")
    result = validation_report(tiny_run, external=local_site, output=tmp_path / "report", n_bootstrap=100,
                               registry=reg, ref="cxr@1", failures=2)
    ext = json.loads((tmp_path / "report" / "external" / "report.json").read_text())["external"]
    assert ext["domain_classifier"]["flagged"] and ext["shift_flagged"] and ext["domain_classifier"]["auc"] > 0.9
    assert ext["fingerprint"]["difference_in_sd"] < -1  # darker than training, in training SDs
    assert ext["calibration"]["n"] == 24 and ext["calibration"]["slope"] is not None
    text = Path(result["markdown"]).read_text()
    for heading in ("## 2. Data sources", "## 3. Splits and leakage checks", "## 6. Calibration",
                    "## 7. Clinical utility", "## 8. External validation", "## 9. Failure cases",
                    "Items for the authors"):
        assert heading in text
    assert "Evaluated images with pixels identical to a training image: 0 of" in text
    html = Path(result["html"]).read_text()
    assert html.startswith("<!doctype html>") and "data:image/png;base64," in html and "<script" not in html
    assert result["version"] == "cxr@1" and reg.report("cxr@1") == text
    assert reg.get("cxr@1").metrics["validation_report"]["highlights"]["external shift flagged"] is True


@pytest.mark.slow
def test_cli_calibrates_registers_and_guards_promotion(tmp_path, tiny_run, local_site):
    reg = str(tmp_path / "reg")
    done = subprocess.run(lepton_cmd("calibrate", str(tiny_run.path), "--data", str(local_site), "--method",
                                     "isotonic", "--output", str(tmp_path / "cal"), "--register", "cxr",
                                     "--registry", reg), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "isotonic on 24 images" in done.stdout and "registered cxr@1" in done.stdout
    from lepton.registry import Registry

    Registry.open(reg).set_setting("require_validation_report", True)
    done = subprocess.run(lepton_cmd("models", "promote", "cxr", "1", "--registry", reg), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "cxr@1 has no validation report" in done.stderr and "Traceback" not in done.stderr
