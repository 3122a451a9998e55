import json
import subprocess

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

from conftest import lepton_cmd
from lepton.errors import ConfigError
from lepton.explain import saliency_maps


@pytest.fixture(scope="module")
def lesion_run(tmp_path_factory):
    """lepton_cnn trained on 48-px synthetic X-rays whose lesion masks are known."""
    from lepton.data.tools.synthetic import write_synthetic_npz
    from lepton.train import train

    out = tmp_path_factory.mktemp("explain")
    data = write_synthetic_npz(out / "lesions.npz", n=700, size=48, seed=11)
    run = train(data, preset="default", name="lesions", output_dir=str(out), epochs=6, batch_size=32,
                lr=2e-3, augment="light", quiet=True, seed=0)
    return run, np.load(data)


def _hit_rates(maps: np.ndarray, masks: np.ndarray, tolerance: int) -> tuple[float, float]:
    """Pointing game: is each map's peak inside the lesion (dilated by ``tolerance`` px)?
    Returns the model's hit rate and a uniformly random point's expected hit rate."""
    hits, chance = [], []
    for heat, mask in zip(maps, masks, strict=True):
        region = binary_dilation(mask, iterations=tolerance)
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        hits.append(bool(region[y, x]))
        chance.append(region.mean())
    return float(np.mean(hits)), float(np.mean(chance))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_heatmaps_point_at_the_lesion(lesion_run, method):
    run, npz = lesion_run
    positive = npz["test_labels"].ravel() == 1
    images = npz["test_images"][positive][:, None].astype(np.float32) / 255
    masks = npz["test_masks"][positive]
    assert positive.sum() >= 30
    maps, targets = saliency_maps(run, list(images), method=method, class_idx=1)
    assert maps.shape == masks.shape and (targets == 1).all()
    assert maps.min() >= 0 and maps.max() <= 1
    model_rate, chance_rate = _hit_rates(maps, masks, tolerance=3)
    rng = np.random.default_rng(0)
    random_rate, _ = _hit_rates(rng.random(maps.shape), masks, tolerance=3)
    # The model's peak lands in the lesion far more often than a random map's peak or a random point.
    assert model_rate >= 0.6, (model_rate, chance_rate)
    assert model_rate >= 2 * chance_rate and model_rate >= 2 * random_rate, (model_rate, chance_rate, random_rate)
    # And most of the top-10 % heat mass sits on the (dilated) lesion, well above the area it covers.
    top_share = []
    for heat, mask in zip(maps, masks, strict=True):
        top = heat >= np.quantile(heat, 0.9)
        top_share.append((binary_dilation(mask, iterations=3) & top).sum() / top.sum())
    assert np.mean(top_share) >= 2 * chance_rate


@pytest.mark.slow
def test_explain_cli_writes_overlays(lesion_run, tmp_path):
    run, npz = lesion_run
    i = int(np.flatnonzero(npz["test_labels"].ravel() == 1)[0])
    Image.fromarray(npz["test_images"][i]).save(tmp_path / "case.png")
    out = subprocess.run(lepton_cmd("explain", str(run.path), str(tmp_path / "case.png"), "--method", "gradcam++",
                                    "--class", "opacity", "--output", str(tmp_path / "cams")),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.splitlines()[0])
    assert row["class"] == "opacity" and row["method"] == "gradcam++"
    overlay = Image.open(row["overlay"])
    assert overlay.size == (48, 48) and overlay.mode == "RGB"
    heat = np.load(row["map"])
    assert heat.shape == (48, 48)


def test_bad_method_and_class(tiny_run, tmp_path):
    from lepton.explain import explain

    with pytest.raises(ConfigError, match="unknown explanation method"):
        saliency_maps(tiny_run, [np.zeros((1, 32, 32), np.float32)], method="lime")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(ConfigError, match="unknown class"):
        explain(tiny_run, [tmp_path / "x.png"], target="tumour", output=tmp_path)
