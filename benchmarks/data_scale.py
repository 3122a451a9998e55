"""Memory against data size: one training epoch at N, 4N and 16N cases, from the in-memory path and from the case cache.

It writes N·16 CT-like volumes (int16 Hounsfield units as NIfTI, with label maps; ``--shape D,H,W``, default
200×512×512, smaller and fewer under ``--quick``) and N·16 2-D image/mask pairs (PNG), then for each size trains one
epoch of the segmentation preset's U-Net through the CLI — ``--data-engine memory`` and ``--data-engine cache`` —
each in a process of its own, and prints the training process's peak RSS, the training loop's images/s and the wall
time, side by side with the same-run ratios. The cache is built once per size beforehand (``lepton data cache
build``, timed and measured too), as a user would before training. In-memory runs whose padded tensors would not fit
in this machine's memory are skipped with the estimate. Goals (issue #27): cached peak RSS flat from N to 16N (≤ 1.15×)
and under 2.5 GB at 160 CT-size volumes; cached images/s ≥ 0.9× in-memory.

``--kinds classify`` does the same for 2-D classification: N·16 generated chest radiographs (8-bit PNGs of
``--image-px``, default 320 px; 160 px under ``--quick``, with N = 200) in a class folder, one epoch of the compact CNN
at ``--input-px`` (default 256; 128 under ``--quick``) per size and engine, the cache read through one DataLoader
worker (``--loader-workers 1``), and the stored pixels' dtype and largest rounding error beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def write_volumes(root: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """``n`` CT-like volumes: air around a body ellipse of soft tissue, lungs, bone, and 1-3 spherical lesions
    (label 1), int16 HU on 0.8 × 0.8 × 1.5 mm voxels, as a Decathlon folder."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    d, h, w = shape
    zz, yy, xx = np.ogrid[:d, :h, :w]
    body = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.46 * w)) ** 2 <= 1
    lungs = (((yy - h / 2) / (0.25 * h)) ** 2 + ((np.abs(xx - w / 2) - 0.2 * w) / (0.13 * w)) ** 2) <= 1
    entries = []
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    for i in range(n):
        vol = np.full(shape, -1000, np.int16)
        vol[:, body[0]] = 40
        vol[:, lungs[0]] = -850
        mask = np.zeros(shape, np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            c = (rng.integers(d // 5, 4 * d // 5), rng.integers(h // 3, 2 * h // 3), rng.integers(w // 4, 3 * w // 4))
            r = float(rng.uniform(3, max(4, min(shape) / 12)))
            ball = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
            mask[ball] = 1
            vol[ball] = 60
        vol = (vol + rng.normal(0, 15, shape)).astype(np.int16)
        name = f"ct{i:04d}.nii.gz"
        nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0), affine), root / "labelsTr" / name)
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "dataset.json").write_text(json.dumps({"name": "bench-ct", "labels": {"0": "background", "1": "lesion"},
                                                  "training": entries}))
    return root


def _written(root: Path, n: int, shape: tuple[int, int, int]) -> bool:
    """Whether ``root`` already holds ``n`` generated volumes of ``shape`` (a rerun with ``--work`` reuses them:
    160 CT-size volumes take half an hour to write on 2 cores)."""
    import nibabel as nib

    try:
        items = json.loads((root / "dataset.json").read_text())["training"]
    except (OSError, ValueError, KeyError):
        return False
    if len(items) != n or not all((root / item[k]).is_file() for item in items for k in ("image", "label")):
        return False
    return nib.load(str(root / items[-1]["image"])).shape == shape[::-1]


def subset(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` cases of a Decathlon folder, by links."""
    spec = json.loads((src / "dataset.json").read_text())
    for folder in ("imagesTr", "labelsTr"):
        (dst / folder).mkdir(parents=True, exist_ok=True)
    for item in spec["training"][:n]:
        for key in ("image", "label"):
            target = dst / item[key]
            if not target.exists():
                os.symlink((src / item[key]).resolve(), target)
    (dst / "dataset.json").write_text(json.dumps({**spec, "training": spec["training"][:n]}))
    return dst


def measured(cmd: list[str], env: dict[str, str]) -> tuple[int, float, float, str]:
    """Run a command; its exit status, peak RSS in MiB (the process and the children it waited for), wall s, stderr."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        err.seek(0)
        text = err.read().decode(errors="replace")
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024, wall, text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10, help="the smallest size; 4N and 16N follow (default 10)")
    parser.add_argument("--shape", default="200,512,512", help="volume size D,H,W (default 200,512,512)")
    parser.add_argument("--quick", action="store_true", help="N=4 volumes of 48x96x96")
    parser.add_argument("--kinds", default="volumes",
                        help="comma-separated: volumes (CT-like segmentation), images (2-D pairs), classify (2-D "
                             "classification)")
    parser.add_argument("--image-px", type=int, help="classify: generated image side (default 320; 160 --quick)")
    parser.add_argument("--input-px", type=int, help="classify: the network's input side (default 256; 128 --quick)")
    parser.add_argument("--n-images", type=int, help="classify: the smallest size (default 1000; 200 --quick)")
    parser.add_argument("--work", type=Path, help="folder for the generated data, runs and cache (default: a temp)")
    args = parser.parse_args()
    n = 4 if args.quick else args.n
    shape = (48, 96, 96) if args.quick else tuple(int(v) for v in args.shape.split(","))
    print(f"Data-scale benchmark; CPU: {cpu_summary()}")
    total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    work = args.work or Path(tempfile.mkdtemp(prefix="lepton-bench-scale-"))
    env = {**os.environ, "LEPTON_CACHE": str(work / "cache")}
    runs = work / "runs" / time.strftime("%Y%m%d-%H%M%S")  # a rerun with --work keeps the earlier runs
    sizes = [n, 4 * n, 16 * n]
    rows = []
    for kind in args.kinds.split(","):
        if kind == "classify":
            rows += classify(args, work, env, runs)
            continue
        t0 = time.perf_counter()
        if kind == "volumes":
            full = work / "data" / "volumes"
            case = "x".join(map(str, shape))
            if _written(full, sizes[-1], shape):
                print(f"\n{kind}: reusing the {sizes[-1]} cases of {case} in {full}")
            else:
                write_volumes(full, sizes[-1], shape)
                print(f"\n{kind}: wrote {sizes[-1]} cases of {case} in {time.perf_counter() - t0:.0f} s")
        else:
            from lepton.data.tools.synthetic import write_segmentation_cases

            full = write_segmentation_cases(work / "data" / "images", n=sizes[-1], dims=2, shape=(256,))
            case = "256x256"
            print(f"\n{kind}: wrote {sizes[-1]} cases of {case} in {time.perf_counter() - t0:.0f} s")
        for size in sizes:
            data = subset(full, work / "data" / f"{kind}-{size}", size) if kind == "volumes" else full
            if kind != "volumes":
                data = _paired_subset(full, work / "data" / f"{kind}-{size}", size)
            code, rss, wall, err = measured([sys.executable, "-m", "lepton.cli", "data", "cache", "build", str(data)],
                                            env)
            if code:
                print(err[-2000:])
                return 1
            row = {"kind": kind, "cases": size, "cache_build_s": wall, "cache_build_rss_mib": rss}
            voxels = size * float(np.prod(shape if kind == "volumes" else (256, 256)))
            for engine in ("memory", "cache"):
                need_gb = voxels * 21 / 2**30
                if engine == "memory" and need_gb > 0.6 * total_gb:
                    row[engine] = {"skipped": f"needs ~{need_gb:.0f} GB of {total_gb:.0f} GB"}
                    continue
                name = f"{kind}-{size}-{engine}"
                cmd = [sys.executable, "-m", "lepton.cli", "train", str(data), "--epochs", "1", "--time-budget", "0",
                       "--batch-size", "2", "--val-fraction", "0.05", "--test-fraction", "0", "--data-engine", engine,
                       "--output-dir", str(runs), "--name", name, "--quiet", "--no-tta"]
                code, rss, wall, err = measured(cmd, env)
                if code:
                    print(err[-3000:])
                    return 1
                info = json.loads((runs / name / "run.json").read_text())
                row[engine] = {"peak_rss_mib": rss, "images_per_s": info["images_per_s"], "wall_s": wall}
            rows.append(row)
            mem, cache = row["memory"], row["cache"]
            ratio = (f"{cache['images_per_s'] / mem['images_per_s']:.2f}x" if "images_per_s" in mem else "-")
            print(f"  {size:4d} cases: cache build {row['cache_build_s']:.0f} s "
                  f"({row['cache_build_rss_mib']:.0f} MiB) | memory: {_fmt(mem)} | cache: {_fmt(cache)} | "
                  f"cached/in-memory images/s {ratio}")
        first, last = next(r for r in rows if r["kind"] == kind and r["cases"] == n), rows[-1]
        print(f"  cached peak RSS {sizes[-1]} / {n} cases: "
              f"{last['cache']['peak_rss_mib'] / first['cache']['peak_rss_mib']:.2f}x (goal <= 1.15x); "
              f"at {sizes[-1]} cases {last['cache']['peak_rss_mib'] / 1024:.2f} GiB = "
              f"{last['cache']['peak_rss_mib'] * 2**20 / 1e9:.2f} GB (goal < 2.5 GB)")
        if "peak_rss_mib" in last["memory"] and "peak_rss_mib" in first["memory"]:
            print(f"  in-memory peak RSS {sizes[-1]} / {n} cases: "
                  f"{last['memory']['peak_rss_mib'] / first['memory']['peak_rss_mib']:.2f}x")
    out = work / "data_scale.json"
    out.write_text(json.dumps({"cpu": cpu_summary(), "shape": shape, "rows": rows}, indent=2))
    print(f"\nfigures written to {out}")
    if args.work is None:
        shutil.rmtree(work / "data", ignore_errors=True)
    return 0


def classify(args: argparse.Namespace, work: Path, env: dict[str, str], runs: Path) -> list[dict]:
    """The 2-D classification rows: N, 4N and 16N PNGs, an epoch in memory and from the cache per size."""
    from lepton.data.index.cache import CaseCache
    from lepton.data.tools.synthetic import write_png_classes

    n = args.n_images or (200 if args.quick else 1000)
    px = args.image_px or (160 if args.quick else 320)
    side = args.input_px or (128 if args.quick else 256)
    sizes = [n, 4 * n, 16 * n]
    t0 = time.perf_counter()
    full = work / "data" / "classify"
    for k in range(0, sizes[-1], 500):  # in slices, so that generating holds a few hundred images at a time
        write_png_classes(full, n=min(500, sizes[-1] - k), size=px, seed=k, start=k)
    print(f"\nclassify: wrote {sizes[-1]} PNGs of {px}x{px} in {time.perf_counter() - t0:.0f} s; input {side}x{side}")
    files = sorted((p.parent.name, p.name) for p in full.glob("*/*.png"))
    rows = []
    for size in sizes:
        data = work / "data" / f"classify-{size}"
        for label, name in sorted(files, key=lambda f: f[1])[:size]:
            (data / label).mkdir(parents=True, exist_ok=True)
            if not (data / label / name).exists():
                os.symlink(full / label / name, data / label / name)
        code, rss, wall, err = measured([sys.executable, "-m", "lepton.cli", "data", "cache", "build", str(data),
                                         "--image-size", str(side)], env)
        if code:
            print(err[-2000:])
            return rows
        row = {"kind": "classify", "cases": size, "cache_build_s": wall, "cache_build_rss_mib": rss}
        for engine in ("memory", "cache"):
            name = f"classify-{size}-{engine}"
            cmd = [sys.executable, "-m", "lepton.cli", "train", str(data), "--epochs", "1", "--time-budget", "0",
                   "--batch-size", "32", "--image-size", str(side), "--model", "lepton_cnn_tiny", "--val-fraction",
                   "0.1", "--test-fraction", "0", "--data-engine", engine, "--loader-workers",
                   "1" if engine == "cache" else "0", "--output-dir", str(runs), "--name", name, "--quiet",
                   "--no-tta"]
            code, rss, wall, err = measured(cmd, env)
            if code:
                print(err[-3000:])
                return rows
            info = json.loads((runs / name / "run.json").read_text())
            row[engine] = {"peak_rss_mib": rss, "images_per_s": info["images_per_s"], "wall_s": wall,
                           "val_auc": info.get("val_auc")}
        rows.append(row)
        mem, cache = row["memory"], row["cache"]
        speed, peak = cache["images_per_s"] / mem["images_per_s"], cache["peak_rss_mib"] / mem["peak_rss_mib"]
        print(f"  {size:6d} images: cache build {row['cache_build_s']:.0f} s ({row['cache_build_rss_mib']:.0f} MiB) | "
              f"memory: {_fmt(mem)} | cache: {_fmt(cache)} | cached/in-memory images/s {speed:.2f}x, "
              f"peak RSS {peak:.2f}x")
    if len(rows) == 3:
        for engine in ("cache", "memory"):
            print(f"  {engine} peak RSS {sizes[-1]} / {n} images: "
                  f"{rows[-1][engine]['peak_rss_mib'] / rows[0][engine]['peak_rss_mib']:.2f}x"
                  + (" (goal <= 1.15x)" if engine == "cache" else ""))
    stored = [e.meta for e in CaseCache(Path(env["LEPTON_CACHE"]) / "cases").entries() if "dtype" in e.meta]
    dtypes = sorted({m["dtype"] for m in stored})
    print(f"  stored pixels: {', '.join(dtypes)}; largest rounding error {max(m['max_error'] for m in stored):.5f} "
          f"(of [0, 1]) over {len(stored)} files")
    return rows


def _paired_subset(src: Path, dst: Path, n: int) -> Path:
    names = sorted(p.name for p in (src / "images").iterdir())[:n]
    for folder in ("images", "masks"):
        (dst / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            target = dst / folder / name
            if not target.exists():
                os.symlink((src / folder / name).resolve(), target)
    shutil.copy(src / "labels.json", dst / "labels.json")
    return dst


def _fmt(r: dict) -> str:
    if "skipped" in r:
        return f"skipped ({r['skipped']})"
    return f"peak {r['peak_rss_mib']:.0f} MiB, {r['images_per_s']:.2f} img/s, {r['wall_s']:.0f} s"


if __name__ == "__main__":
    sys.exit(main())
