import numpy as np
import pytest
from PIL import Image

from lepton.data.readers.io import read_image, sniff_format, to_unit_range
from lepton.errors import DataError


@pytest.mark.parametrize("fmt,ext", [("png", "png"), ("jpeg", "jpg"), ("bmp", "bmp"), ("tiff", "tif")])
def test_raster_formats_are_sniffed_and_scaled(tmp_path, fmt, ext):
    arr = np.linspace(0, 255, 16 * 16).reshape(16, 16).astype(np.uint8)
    path = tmp_path / f"img.{ext}"
    Image.fromarray(arr).save(path)
    assert sniff_format(path) == fmt
    (frame,) = read_image(path)
    assert frame.pixels.shape == (1, 16, 16) and frame.pixels.dtype == np.float32
    assert frame.pixels.min() >= 0.0 and frame.pixels.max() <= 1.0
    if fmt != "jpeg":
        np.testing.assert_allclose(frame.pixels[0], arr / 255.0, atol=1e-6)


def test_extension_is_not_trusted(tmp_path):
    path = tmp_path / "actually_png.dcm"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path, format="PNG")
    assert sniff_format(path) == "png"
    assert read_image(path)[0].pixels.shape == (1, 8, 8)


def test_16bit_png_uses_min_max(tmp_path):
    arr = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    path = tmp_path / "x16.png"
    Image.fromarray(arr).save(path)
    (frame,) = read_image(path)
    np.testing.assert_allclose(frame.pixels[0], arr / 4000.0, atol=1e-6)


def test_rgb_png_keeps_three_channels(tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(np.dstack([np.full((6, 6), v, np.uint8) for v in (0, 128, 255)])).save(path)
    (frame,) = read_image(path)
    assert frame.pixels.shape == (3, 6, 6)
    np.testing.assert_allclose(frame.pixels[:, 0, 0], [0, 128 / 255, 1.0], atol=1e-6)


def test_npy_layouts(tmp_path):
    np.save(tmp_path / "hw.npy", np.arange(12, dtype=np.float64).reshape(3, 4))
    np.save(tmp_path / "hwc.npy", np.zeros((5, 5, 3), np.uint8))
    np.save(tmp_path / "stack.npy", np.random.default_rng(0).random((7, 4, 4)))
    assert read_image(tmp_path / "hw.npy")[0].pixels.shape == (1, 3, 4)
    assert read_image(tmp_path / "hwc.npy")[0].pixels.shape == (3, 5, 5)
    assert len(read_image(tmp_path / "stack.npy")) == 1
    assert len(read_image(tmp_path / "stack.npy", slices="all")) == 7


@pytest.mark.parametrize(
    "content,reason",
    [(b"", "empty"), (b"hello, not an image at all", "unsupported"),
     (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt")],
)
def test_bad_files_name_the_file_and_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match=reason) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_truncated_png_is_rejected(tmp_path):
    path = tmp_path / "trunc.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="trunc.png"):
        read_image(path)


def test_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (10000, 10000)).save(path)  # a few KB on disk, 100 M pixels decoded
    assert path.stat().st_size < 100_000
    with pytest.raises(DataError, match="bomb|over the limit"):
        read_image(path)


def test_pickled_npy_is_refused(tmp_path):
    path = tmp_path / "evil.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="object arrays are refused"):
        read_image(path)


def test_nan_array_is_refused(tmp_path):
    path = tmp_path / "nan.npy"
    np.save(path, np.array([[np.nan, 1.0], [0.0, 2.0]]))
    with pytest.raises(DataError, match="NaN"):
        read_image(path)


def test_to_unit_range_constant_image():
    assert to_unit_range(np.full((3, 3), 7, np.int16)).max() == 0.0


@pytest.mark.parametrize("window", ["nan,400", "40,nan", "40,inf", "inf,400", "40,0", "40,-5", "1e308,400", "40,1e7"])
def test_a_window_outside_its_bounds_is_refused(window):
    from lepton.data.base import resolve_window

    with pytest.raises(DataError, match="CENTER must be a finite number"):
        resolve_window(window)
    assert resolve_window("-600,1500") == (-600.0, 1500.0)
