"""Sequences and covariates: multi-frame DICOM with and without frame timing, scan-region cropping, WFDB signals,
covariate checks, a tiny clip model trained and predicted, and served answers equal to offline inference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lepton.data.readers.covariates import check_table, check_values, encode, fit_schema, parse_covariates
from lepton.data.readers.sequence import frame_indices, read_sequence, read_wfdb, sample_times
from lepton.data.tools.cine import beating_chamber, write_cine, write_cine_set
from lepton.errors import ConfigError, DataError


def pydicom_data_file(name: str) -> Path:
    """One of pydicom's large test files from the locally installed pydicom-data package (never downloaded)."""
    try:
        import data_store  # the pydicom-data package
    except ImportError:
        pytest.skip("pydicom-data is not installed")
    path = Path(data_store.__file__).parent / "data" / name
    if not path.is_file():
        pytest.skip(f"pydicom-data has no {name}")
    return path


def ramp(n: int = 12, size: int = 16) -> np.ndarray:
    """Frames whose mean brightness is their index × 20: which frame was read shows in the pixels."""
    return np.stack([np.full((size, size), 20 * i, np.uint8) for i in range(n)])


# -- readers ------------------------------------------------------------------------------------------------------
def test_real_ultrasound_cine_frame_time_region_and_colour():
    """The real 120-frame SonoSite loop: 30 fps from FrameTime, sampled at 15 fps (every second frame decoded),
    cropped to its one scan region, YBR_FULL_422 turned into RGB."""
    path = pydicom_data_file("color3d_jpeg_baseline.dcm")
    clip = read_sequence(path, fps=15, length=8)
    assert clip.timing == "FrameTime"
    assert clip.region == (84, 31, 595, 414)
    assert clip.frames.shape == (8, 3, 414 - 31 + 1, 595 - 84 + 1)
    assert np.allclose(np.diff(clip.times), 1 / 15)
    assert clip.frames.min() >= 0 and clip.frames.max() <= 1 and clip.frames.std() > 0.01
    whole = read_sequence(path, fps=15, length=8, crop_region=False)
    assert whole.frames.shape[2:] == (480, 640) and whole.region is None


def test_real_multiframe_mr_without_timing_and_palette_ultrasound():
    mr = read_sequence(pydicom_data_file("emri_small.dcm"))
    assert mr.frames.shape == (10, 1, 64, 64) and mr.timing == "assumed"
    assert np.allclose(mr.times, np.arange(10) / 30.0)
    us = read_sequence(pydicom_data_file("OBXXXX1A_2frame.dcm"))  # palette colour, two regions: the 2-D one wins
    assert us.region == (120, 60, 799, 518) and us.frames.shape == (2, 3, 459, 680)


@pytest.mark.parametrize("timing, expected", [
    ({"frame_time_ms": 100.0}, "FrameTime"),
    ({"frame_time_vector": [0.0] + [100.0] * 11}, "FrameTimeVector"),
    ({"cine_rate": 10}, "CineRate"),
])
def test_generated_timing_sources_resample_to_the_right_frames(tmp_path, timing, expected):
    """10 fps sources sampled at 5 fps: every second frame, centred in the 1.2 s clip (frames 1, 3, 5, 7, 9)."""
    path = write_cine(tmp_path / "c.dcm", ramp(), **timing)
    clip = read_sequence(path, fps=5, length=5)
    assert clip.timing == expected
    assert [round(float(f.mean()) * 255 / 20) for f in clip.frames] == [1, 3, 5, 7, 9]


def test_random_clip_sampling_and_loops():
    rng = np.random.default_rng(0)
    starts = {round(float(sample_times(4.0, 10, 10, "random", rng)[0]), 3) for _ in range(5)}
    assert len(starts) > 1 and all(0 <= s <= 3.0 for s in starts)
    wrapped = sample_times(1.0, 10, 15)  # longer than the clip: read as a loop
    assert wrapped.max() < 1.0 and frame_indices(np.arange(10) / 10, wrapped).tolist()[10:] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kwargs, message", [
    ({"frame_time_ms": 0.0}, "FrameTime"),
    ({"frame_time_ms": -5.0}, "bad frame timing"),
    ({"frame_time_vector": [0.0, 10.0, -1.0] + [10.0] * 9}, "FrameTimeVector"),
    ({"frame_time_vector": [0.0, 10.0]}, "2 entries for 12 frames"),
    ({"number_of_frames": 0}, "0 frame(s)"),
])
def test_bad_timing_and_zero_frames_are_refused(tmp_path, kwargs, message):
    path = write_cine(tmp_path / "bad.dcm", ramp(), **kwargs)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_sequence(path)


def test_frame_count_over_the_limit(tmp_path):
    path = write_cine(tmp_path / "long.dcm", ramp(), frame_time_ms=40)
    with pytest.raises(DataError, match="12 frames is over the limit of 5"):
        read_sequence(path, max_frames=5)


def test_scan_region_crops_the_burned_in_strip(tmp_path):
    frames = np.full((4, 20, 30), 50, np.uint8)
    frames[:, :5, :] = 255  # a burned-in annotation above the region
    path = write_cine(tmp_path / "us.dcm", frames, frame_time_ms=33.3, region=(2, 5, 27, 19))
    clip = read_sequence(path)
    assert clip.region == (2, 5, 27, 19) and clip.frames.shape == (4, 1, 15, 26)
    assert clip.frames.max() < 1.0  # the strip is gone


def test_several_regions_masked_overlays_masked_and_burned_in_reported(tmp_path):
    """Two side-by-side 2-D regions with text between and above them: cropped to the box around both, the text
    between zeroed; a graphics overlay plane's pixels zeroed; BurnedInAnnotation YES reported by inspection."""
    from lepton.tasks import get_task

    frames = np.full((3, 20, 40), 100, np.uint8)
    frames[:, :4, :] = 255  # text above both regions: cropped away
    frames[:, 8:12, 18:22] = 255  # text between the regions: inside the box, masked
    overlay = np.zeros((20, 40), bool)
    overlay[15, 5:10] = True  # a caliper drawn as a graphics overlay inside the left region
    path = write_cine(tmp_path / "dual.dcm", frames, frame_time_ms=40, regions=[(0, 4, 17, 19), (22, 4, 39, 19)],
                      overlay=overlay, burned_in="YES")
    clip = read_sequence(path)
    assert clip.region == (0, 4, 39, 19) and clip.frames.shape == (3, 1, 16, 40)
    assert clip.frames[:, 0, 4:8, 18:22].max() == 0  # between the regions (rows 8-11 → 4-7 after the crop)
    assert clip.frames[:, 0, 11, 5:10].max() == 0  # the overlay (row 15 → 11)
    assert clip.frames[:, 0, 11, 10:17].min() > 0 and clip.frames[:, 0, 0, 25:].min() > 0  # the image stays
    assert any("outside the 2 scan regions" in m for m in clip.masked) and any("6000" in m for m in clip.masked)
    plain = read_sequence(path, mask_annotations=False)
    assert plain.frames[:, 0, 4:8, 18:22].min() > 0 and plain.masked == ()
    manifest = tmp_path / "clips.csv"
    write_cine(tmp_path / "other.dcm", frames, frame_time_ms=40, region=(0, 4, 39, 19), burned_in="NO")
    manifest.write_text("path,label\ndual.dcm,a\nother.dcm,b\n")
    report = get_task("sequence", {"fps": 10, "frames": 2, "size": 16}).inspect(str(manifest), window=None,
                                                                                 slices="middle")["annotations"]
    assert report["burned_in_yes"] == 1 and report["burned_in_files"] == [str(path)]
    assert report["several_regions_masked"] == 1 and report["overlays_masked"] == 1 and "warning" in report


def test_frame_folder_and_wfdb_signal(tmp_path):
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in (1, 2, 10):  # natural order: 10 after 2
        Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(folder / f"f{i}.png")
    clip = read_sequence(folder, source_fps=3)
    assert [round(float(f.mean()) * 255 / 20) for f in clip.frames] == [1, 2, 10] and clip.timing == "source_fps"

    import wfdb

    signal = np.stack([np.sin(np.arange(500) / 10), np.cos(np.arange(500) / 10)], 1)
    wfdb.wrsamp("rec", fs=250, units=["mV", "mV"], sig_name=["I", "II"], p_signal=signal, fmt=["16", "16"],
                write_dir=str(tmp_path))
    rec = read_wfdb(tmp_path / "rec.hea", channels=["II"], start=100, stop=300)
    assert rec.frames.shape == (200, 1) and rec.fps == pytest.approx(250, rel=1e-3)
    assert np.allclose(rec.frames[:, 0], signal[100:300, 1], atol=1e-3)
    with pytest.raises(DataError, match="no channel"):
        read_wfdb(tmp_path / "rec.hea", channels=["V9"])


# -- covariates ---------------------------------------------------------------------------------------------------
def test_covariate_declarations_and_table_checks():
    with pytest.raises(ConfigError, match="kind 'number'"):
        parse_covariates("age:number")
    with pytest.raises(ConfigError, match="manifest column of its own"):
        parse_covariates("label:numeric")
    schema = parse_covariates("age:numeric:years,sex:categorical")
    header = ["path", "label", "age", "sex"]
    with pytest.raises(DataError, match="covariate column.*weight.*not in the manifest"):
        check_table(parse_covariates("weight:numeric:kg"), header, [], "m.csv")
    with pytest.raises(DataError, match="line 3: age is 'old', not a number"):
        check_table(schema, header, [{"age": "40", "sex": "F"}, {"age": "old", "sex": "M"}], "m.csv")
    with pytest.raises(DataError, match="line 2: sex is missing"):
        check_table(schema, header, [{"age": "40", "sex": ""}], "m.csv")


def test_covariates_fitted_encoded_and_imputed():
    schema = parse_covariates("age:numeric:years,sex:categorical", missing="impute")
    rows = check_table(schema, ["age", "sex"], [{"age": "40", "sex": "F"}, {"age": "60", "sex": "M"},
                                                {"age": "NA", "sex": "F"}], "m.csv")
    fitted = fit_schema(schema, rows, "m.csv")
    assert fitted.columns[0].mean == 50 and fitted.columns[1].categories == ["F", "M"]
    x = encode(fitted, rows)  # age, F, M, unseen/missing slot, age missing, sex missing
    assert x.shape == (3, 6)
    assert x[2].tolist() == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]  # imputed age at the mean, flagged missing
    strict = fit_schema(parse_covariates("age:numeric,sex:categorical"), rows[:2], "m.csv")
    with pytest.raises(DataError, match="unknown covariate.*height"):
        check_values(strict, {"age": 50, "sex": "F", "height": 170})
    with pytest.raises(DataError, match="sex 'X' was not seen in training"):
        check_values(strict, {"age": 50, "sex": "X"})
    with pytest.raises(DataError, match="age must be a number or a string"):
        check_values(strict, {"age": [50], "sex": "F"})
    with pytest.raises(DataError, match="age is missing"):
        check_values(strict, {"sex": "F"})


# -- a tiny model, trained, predicted and served ------------------------------------------------------------------
@pytest.fixture(scope="module")
def cine_run(tmp_path_factory):
    """A seq_attention regression run with covariates on 16 generated cine loops (one epoch, 6 frames of 16 px)."""
    from lepton.train import train

    root = tmp_path_factory.mktemp("cine")
    manifest = write_cine_set(root / "data", n=16, size=32, seconds=1.0)
    run = train(manifest, task="sequence", model="seq_attention", epochs=1, batch_size=8, output_dir=str(root),
                name="cine", quiet=True, val_fraction=0.25, test_fraction=0.0, precision="fp32",
                task_options={"fps": 6, "frames": 6, "size": 16, "target": "value", "fusion": "film",
                              "covariates": "age:numeric:years,sex:categorical"})
    return run, manifest


@pytest.mark.slow
def test_sequence_train_predict_and_covariates_matter(cine_run):
    run, manifest = cine_run
    assert run.info["val_mae"] >= 0 and run.preprocessing.size == (6, 16, 16)
    assert run.preprocessing.options["covariates"]["fitted"]
    clip = manifest.parent / "clips" / "cine_0000.dcm"
    a = run.predict([clip], covariates=[{"age": 30, "sex": "F"}])[0]["value"]
    b = run.predict([clip], covariates=[{"age": 85, "sex": "M"}])[0]["value"]
    assert np.isfinite(a) and a != b  # FiLM makes the answer depend on the covariates
    with pytest.raises(DataError, match="unknown covariate"):
        run.predict([clip], covariates=[{"age": 30, "sex": "F", "bmi": 22}])


@pytest.mark.slow
def test_served_answers_equal_offline_inference_with_covariates(cine_run, tmp_path):
    import httpx

    from conftest import running
    from lepton.registry import Registry
    from lepton.serve import ServeConfig

    run, manifest = cine_run
    reg = Registry.open(tmp_path / "reg")
    reg.register_run(run.path, "echo")
    key = reg.create_key("clinic")
    clip = manifest.parent / "clips" / "cine_0003.dcm"
    covariates = {"age": 71, "sex": "M"}
    offline = run.predict([clip], covariates=[covariates])[0]["value"]
    pixels = run.task.read(clip, run.preprocessing)[0][1]
    with running(ServeConfig(models=["echo"], registry=str(tmp_path / "reg"), rate_limit=0)) as base, \
            httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
        info = client.get("/v1/models/echo").json()
        assert [c["name"] for c in info["covariates"]] == ["age", "sex"]
        answer = client.post("/v1/models/echo/predict", files={"file": ("c.dcm", clip.read_bytes())},
                             data={"covariates": json.dumps(covariates)})
        assert answer.status_code == 200, answer.text
        assert answer.json()["value"] == pytest.approx(offline, rel=1e-4, abs=1e-4)
        as_json = client.post("/v1/models/echo/predict", json={"array": pixels.tolist(), "covariates": covariates})
        assert as_json.json()["value"] == pytest.approx(offline, rel=1e-4, abs=1e-4)
        bad = client.post("/v1/models/echo/predict", files={"file": ("c.dcm", clip.read_bytes())},
                          data={"covariates": json.dumps({"age": "old", "sex": "M"})})
        assert bad.status_code == 422 and "not a number" in bad.text
        meta = client.get("/v2/models/echo").json()
        assert [i["name"] for i in meta["inputs"]] == ["input", "age", "sex"]
        infer = client.post("/v2/models/echo/infer", json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, *pixels.shape], "data": pixels.ravel().tolist()},
            {"name": "age", "datatype": "FP32", "shape": [1, 1], "data": [71.0]},
            {"name": "sex", "datatype": "BYTES", "shape": [1, 1], "data": ["M"]}]})
        assert infer.status_code == 200, infer.text
        out = {o["name"]: o for o in infer.json()["outputs"]}
        assert out["value"]["data"][0] == pytest.approx(offline, rel=1e-4, abs=1e-4)
        schema = client.get("/openapi.json").json()
        body = schema["paths"]["/v1/models/{name}/predict"]["post"]["requestBody"]["content"]
        assert "covariates" in body["multipart/form-data"]["schema"]["properties"]


def test_shared_ecg_record_reads_when_present():
    record = Path(__file__).resolve().parents[2] / "shared" / "data" / "ecg" / "100.hea"
    if not record.is_file():
        pytest.skip("the shared ECG records are not here")
    clip = read_wfdb(record, stop=3600)
    assert clip.frames.shape == (3600, 2) and clip.fps == pytest.approx(360)


def test_phantom_contraction_follows_the_ejection_fraction():
    rng = np.random.default_rng(0)
    strong = beating_chamber(70, period_s=0.8, rng=rng, size=48)
    weak = beating_chamber(20, period_s=0.8, rng=np.random.default_rng(0), size=48)
    dark = [float((f < 30).mean()) for f in strong], [float((f < 30).mean()) for f in weak]
    assert (max(dark[0]) - min(dark[0])) > 2 * (max(dark[1]) - min(dark[1]))


def test_cli_task_options_and_covariates():
    import typer

    from lepton.cli.train import _task_options

    assert _task_options(["fps=8", "frames=16", "target=value", "fusion=film"], "age:numeric:years") == {
        "fps": 8, "frames": 16, "target": "value", "fusion": "film", "covariates": "age:numeric:years"}
    with pytest.raises(typer.BadParameter, match="KEY=VALUE"):
        _task_options(["fps"], None)
    from lepton.tasks.sequence import sequence_options

    with pytest.raises(ConfigError, match="unknown key"):
        sequence_options({"fsp": 8})
    with pytest.raises(ConfigError, match="target='score'"):
        sequence_options({"target": "score"})
