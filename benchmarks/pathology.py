"""Pathology: tiling rate on a generated gigapixel slide against naive per-tile reads, every real slide in
``../shared/data/wsi`` through the demo's slide model, and the demo's slide-level AUC.

1. A pyramidal TIFF of ``--size`` x ``--size`` pixels (default 40,000; JPEG tiles of 256, 0.5 µm/px, levels every 4x)
   is generated tile by tile. Its tissue grid is planned once (the mask's time printed), then the same tiles are
   extracted three ways, each in a process of its own so that its peak RSS is its own: Lepton's engine (bands of
   adjacent tiles, reader threads on every core), the same engine on one thread, and the naive reference — one
   tiffslide ``read_region`` per tile, one thread, nothing reused. Two tile settings: 256 px at 0.5 µm/px (aligned with
   the file's tiles) and 224 px with 32 px overlap (straddling them). Tiles/s, peak RSS and the same-run ratio.
2. The pathology demo (generated slides, patient-grouped splits) trained and evaluated: slide AUC with its bootstrap
   CI on the held-out test slides (goal >= 0.95).
3. Every real slide in ``../shared/data/wsi`` opened, tiled and given a heatmap by the demo's model — or refused,
   with the message (skipped cleanly when the folder is absent). A slide refused for lacking its resolution is tried
   again with ``--mpp`` asserted, and the line says so.

``--quick``: a 12,000 px slide and the quick demo.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
WSI = ROOT.parent / "shared" / "data" / "wsi"


def naive_tiles(path: Path, grid):
    """The reference: one tiffslide ``read_region`` per tile, one thread, no band and no reuse."""
    import numpy as np
    from PIL import Image
    from tiffslide import TiffSlide

    with TiffSlide(path) as ts:
        for i, (x, y) in enumerate(grid.coords):
            tile = ts.read_region((int(x), int(y)), grid.level, (grid.read_size, grid.read_size), as_array=True)
            if grid.read_size != grid.spec.size:
                tile = np.asarray(Image.fromarray(tile).resize((grid.spec.size, grid.spec.size),
                                                               Image.Resampling.BILINEAR, reducing_gap=2.0))
            yield i, tile


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ``ru_maxrss``: Linux carries the parent's peak into a child
    across fork and exec, so a child started by a big parent would report the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def extract(args: argparse.Namespace) -> None:
    """One extraction in this process: print tiles, seconds, a checksum and the peak RSS as JSON."""
    from lepton.data.readers.slides import open_slide
    from lepton.data.readers.tiling import TileSpec, iter_tiles, plan_tiles

    spec = TileSpec(**json.loads(args.spec))
    with open_slide(args.slide) as slide:
        grid = plan_tiles(slide, spec, cache=args.cache)
        assert grid.cached, "the grid is planned before the timed runs"
        rss_before = peak_rss_mb()
        started = time.perf_counter()
        tiles = naive_tiles(slide.path, grid) if args.engine == "naive" else \
            iter_tiles(slide, grid, workers=1 if args.engine == "engine-1" else None)
        count, check = 0, 0
        for i, tile in tiles:
            count += 1
            if i % 97 == 0:
                check += int(tile[::37, ::37].sum())
        seconds = time.perf_counter() - started
    print(json.dumps({"engine": args.engine, "tiles": count, "seconds": seconds, "checksum": check,
                      "rss_before_mb": rss_before, "peak_rss_mb": peak_rss_mb()}))


def tiling(folder: Path, size: int) -> list[dict]:
    from lepton.data.readers.slides import open_slide
    from lepton.data.readers.tiling import TileSpec, plan_tiles
    from lepton.data.tools.slidegen import plan_slide, write_slide

    path = folder / f"slide_{size}.tiff"
    started = time.perf_counter()
    if path.is_file():  # kept from an earlier run with --keep: the same plan, the same bytes
        print(f"kept {path.name}: {size} x {size} px, {path.stat().st_size / 1e6:.0f} MB")
    else:
        write_slide(path, plan_slide(size, size, tumour=True, seed=1, pen=True), compression="jpeg")
        print(f"generated {path.name}: {size} x {size} px, {path.stat().st_size / 1e6:.0f} MB, "
              f"{time.perf_counter() - started:.0f} s, the generating process's peak RSS {peak_rss_mb():.0f} MB")
    rows = []
    for spec in (TileSpec(mpp=0.5, size=256), TileSpec(mpp=0.5, size=224, overlap=32)):
        with open_slide(path) as slide:
            started = time.perf_counter()
            grid = plan_tiles(slide, spec, cache=folder / "cache")
            mask_s = time.perf_counter() - started
        print(f"\n{spec.size} px at {spec.mpp} µm/px, overlap {spec.overlap}: {len(grid)} tissue tiles of "
              f"{int((size / (spec.size - spec.overlap)) ** 2)} on the grid; mask and grid {mask_s:.1f} s; level "
              f"{grid.level}, read {grid.read_size} px")
        runs = {}
        for engine in ("engine", "engine-1", "naive"):
            out = subprocess.run([sys.executable, __file__, "--extract", "--slide", str(path), "--engine", engine,
                                  "--spec", json.dumps(spec.__dict__), "--cache", str(folder / "cache")],
                                 capture_output=True, text=True, check=True)
            runs[engine] = json.loads(out.stdout.strip().splitlines()[-1])
        assert len({r["checksum"] for r in runs.values()}) == 1, "the engines must give the same tiles"
        for engine, r in runs.items():
            rate = r["tiles"] / r["seconds"]
            ratio = rate / (runs["naive"]["tiles"] / runs["naive"]["seconds"])
            print(f"  {engine:9s} {r['tiles']:6d} tiles {r['seconds']:7.1f} s {rate:7.0f} tiles/s  "
                  f"x{ratio:.2f} vs naive  peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"(before reading {r['rss_before_mb']:.0f} MB)")
            rows.append({"spec": spec.__dict__, **r, "tiles_per_s": rate, "ratio": ratio})
    return rows


def real_slides(model: Path, folder: Path) -> None:
    from lepton.errors import LeptonError
    from lepton.pathology.workflow import predict_slide

    if not WSI.is_dir():
        print(f"\nreal slides: {WSI} absent, skipped")
        return
    print(f"\nreal slides in {WSI} (the demo's model; its predictions on real tissue mean nothing clinically):")
    for path in sorted(p for p in WSI.iterdir() if p.suffix.lower() not in (".md",)):
        for mpp in (None, 0.5):
            try:
                report = predict_slide(model, path, folder / "real", mpp=mpp, cache=folder / "cache")
                given = f" with --mpp {mpp} asserted (the file has none)" if mpp else ""
                print(f"  {path.name}: opened{given} — {report['slide']['container']}, "
                      f"{report['slide']['width']}x{report['slide']['height']}, {len(report['slide']['levels'])} "
                      f"level(s); {report['tiles']} tiles; heatmap {Path(report['files']['heatmap']).name}; "
                      f"P(tumour) {report['prediction']['probability']:.2f}")
                break
            except LeptonError as exc:
                again = " even with --mpp 0.5" if mpp else ""
                print(f"  {path.name}: refused{again} — {str(exc).replace(str(WSI) + '/', '')}")
                if "microns per pixel" not in str(exc) and "outside what a microscope" not in str(exc):
                    break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the files")
    parser.add_argument("--tiling-only", action="store_true", help="the tiling figures only")
    parser.add_argument("--extract", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.extract:
        extract(args)
        return
    print(cpu_summary())
    size = args.size or (12_000 if args.quick else 40_000)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        tiling(folder, size)
        if args.tiling_only:
            return
        from lepton.pathology.demo import run_pathology_demo

        demo = run_pathology_demo(folder / "demo", quick=args.quick, quiet=True)
        low, high = demo["auc_ci95"]
        print(f"\npathology demo ({'quick' if args.quick else 'full'}): {demo['split']} slides, {demo['tiles']} tiles; "
              f"test slide AUC {demo['test_auc']:.3f} (95% CI {low:.3f}-{high:.3f}), accuracy {demo['test_acc']:.3f}, "
              f"ECE {demo['ece']:.3f}; generate {demo['generate_seconds']} s, embed {demo['embed_seconds']} s, "
              f"train {demo['train_seconds']} s")
        real_slides(Path(demo["model"]), folder)


if __name__ == "__main__":
    main()
