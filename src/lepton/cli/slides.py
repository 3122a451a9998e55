"""``lepton slides``: whole-slide images — what a slide is, its tiles, a slide classifier trained and applied."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lepton.cli.common import _finite, app, console

slides_app = typer.Typer(help="Whole-slide images (pathology): inspect, tile, generate, train and predict slide "
                              "classifiers (attention MIL).", no_args_is_help=True)
app.add_typer(slides_app, name="slides")

SlideMpp = Annotated[float | None, typer.Option(
    "--mpp", click_type=_finite(0.05, 50), help="The slide's level-0 µm/px, for a file that does not state it (0.25 "
                                                "for 40x, 0.5 for 20x).")]
TileMpp = Annotated[float, typer.Option("--tile-mpp", click_type=_finite(0.05, 100),
                                        help="Tiles at this many µm/px (0.5 is 20x).")]
TileSize = Annotated[int, typer.Option("--size", min=8, max=4096, help="Tile side in pixels.")]
Cache = Annotated[Path | None, typer.Option(help="Cache folder for tile grids and embeddings (default: "
                                                 "$LEPTON_CACHE/slides).")]


@slides_app.command("info")
def slides_info(
    slide: Annotated[Path, typer.Argument(help="A slide file (TIFF, SVS, OME-TIFF, QPTIFF, DICOM) or DICOM folder.")],
    mpp: SlideMpp = None,
) -> None:
    """Levels, µm/px and magnification of a slide, as JSON."""
    from lepton.data.readers.slides import open_slide

    with open_slide(slide, mpp=mpp) as s:
        console.print_json(json.dumps(s.describe()))


@slides_app.command("tile")
def slides_tile(
    slide: Annotated[Path, typer.Argument(help="A slide file or DICOM folder.")],
    output: Annotated[Path | None, typer.Option(help="Write the tiles here as PNG files with tiles.csv.")] = None,
    tile_mpp: TileMpp = 0.5,
    size: TileSize = 256,
    overlap: Annotated[int, typer.Option(min=0, help="Pixels neighbouring tiles share.")] = 0,
    min_tissue: Annotated[float, typer.Option(click_type=_finite(0, 1), help="Least share of tissue a tile keeps.")]
    = 0.5,
    mpp: SlideMpp = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Reader threads (default: the usable cores).")] = None,
    cache: Cache = None,
) -> None:
    """Tissue tiles of a slide at a µm/px: the mask, the grid (cached), every tile read (tiles/s shown)."""
    from lepton.data.readers.tiling import TileSpec, tile_slide

    spec = TileSpec(mpp=tile_mpp, size=size, overlap=overlap, min_tissue=min_tissue)
    console.print_json(json.dumps(tile_slide(slide, spec, mpp=mpp, output=output, cache=cache, workers=workers,
                                             progress=True)))


@slides_app.command("generate")
def slides_generate(
    folder: Annotated[Path, typer.Argument(help="Where the slides and slides.csv go.")],
    n: Annotated[int, typer.Option("--n", min=2, max=10_000, help="How many slides (half with tumour).")] = 20,
    size: Annotated[int, typer.Option(min=512, max=200_000, help="Slide height in pixels (width varies).")] = 3072,
    container: Annotated[str, typer.Option(help="tiff, ome-tiff, svs, ndpi, mrxs or dicom.")] = "tiff",
    compression: Annotated[str, typer.Option(help="jpeg or deflate.")] = "jpeg",
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1)] = 0,
) -> None:
    """Generated pyramidal slides (tissue, pen marks, half with tumour, two per patient) with a slides.csv manifest."""
    from lepton.data.tools.slidegen import write_slide_set

    manifest = write_slide_set(folder, n, size=size, container=container, compression=compression, seed=seed)
    console.print(f"{n} slides and their manifest: {manifest}")


@slides_app.command("train")
def slides_train(
    manifest: Annotated[Path, typer.Argument(help="CSV with slide,label[,patient] (paths relative to it).")],
    output: Annotated[Path, typer.Option(help="The slide model folder.")] = Path("runs/slide-model"),
    backbone: Annotated[Path | None, typer.Option(help="A trained Lepton run (RGB tile classifier) whose network "
                                                       "embeds the tiles; default: lepton_cnn at a fixed random "
                                                       "initialisation.")] = None,
    tile_mpp: TileMpp = 0.5,
    size: TileSize = 256,
    epochs: Annotated[int, typer.Option(min=1, max=1000)] = 40,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1)] = 0,
    mpp: SlideMpp = None,
    cache: Cache = None,
) -> None:
    """Attention-MIL slide classifier on frozen tile embeddings; patient-grouped splits; test AUC with its CI."""
    from lepton.data.readers.tiling import TileSpec
    from lepton.pathology.embed import Backbone
    from lepton.pathology.workflow import train_slides

    result = train_slides(manifest, output, spec=TileSpec(mpp=tile_mpp, size=size),
                          backbone=Backbone.from_run(backbone) if backbone else None, epochs=epochs, seed=seed,
                          mpp=mpp, cache=cache)
    console.print_json(json.dumps(result))


@slides_app.command("predict")
def slides_predict(
    model: Annotated[Path, typer.Argument(help="A slide model folder from `lepton slides train`.")],
    slides: Annotated[list[Path], typer.Argument(help="Slide files or DICOM folders.")],
    output: Annotated[Path, typer.Option(help="Heatmaps, GeoJSON and reports go here.")] = Path("slide-predictions"),
    mpp: SlideMpp = None,
    cache: Cache = None,
) -> None:
    """Each slide's prediction, attention heatmap (PNG), top regions (GeoJSON for QuPath) and report."""
    from lepton.pathology.mil import SlideModel
    from lepton.pathology.workflow import predict_slide

    loaded = SlideModel.load(model)
    for slide in slides:
        report = predict_slide(loaded, slide, output, mpp=mpp, cache=cache)
        console.print_json(json.dumps({"slide": str(slide), **report["prediction"], **report["files"]}))
