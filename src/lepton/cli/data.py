"""``lepton data``: inspect, cache and partition data sources."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lepton.cli.common import (
    CacheDirOpt,
    _finite,
    _parse_steps,
    app,
    console,
    err,
)

data_app = typer.Typer(help="Inspect and share data sources (classification and segmentation).", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("inspect")
def data_inspect(
    source: Annotated[str, typer.Argument(help="Classification: a .npz, medmnist:<name>, CSV manifest (path,label) or "
                                                "class folders; segmentation: a Decathlon folder, images/ + masks/ "
                                                "folders or a CSV manifest (path,mask).")],
    task: Annotated[str | None, typer.Option(help="Read the source as this task's data (default: the layout picks "
                                                  "it; a contradicting task is refused).")] = None,
    window: Annotated[str | None, typer.Option(help="CT window preset or CENTER,WIDTH for DICOM/NIfTI.")] = None,
    slices: Annotated[str, typer.Option(help="'middle' or 'all' slices of volumes/multi-frame.")] = "middle",
    series: Annotated[bool, typer.Option("--series", help="Report a folder of DICOM series per series "
                                                          "(automatic for a folder without sub-folders).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The task the source's layout picks and why; then counts per class and split, sizes, modalities, intensities,
    duplicates and unreadable files (segmentation: cases, label names, cases and voxel share per class, spacing);
    for DICOM series, each series' geometry (slices, spacing, orientation, gaps, tilt)."""
    if series:
        from lepton.data.index.inspection import inspect_source

        result = inspect_source(source, window=window, slices=slices, series=True)
    else:
        from lepton.tasks import inspect_data

        result = inspect_data(source, task=task, window=window, slices=slices)
    if as_json:
        console.print_json(json.dumps(result))
    elif "series" in result:
        _print_series(result)
    elif "cases" in result:
        _print_segmentation(result)
    else:
        _print_inspection(result)
    if result["problems"]:
        raise typer.Exit(1)


cache_app = typer.Typer(help="The on-disk case cache: decoded, preprocessed cases reused across runs.",
                        no_args_is_help=True)
data_app.add_typer(cache_app, name="cache")


@cache_app.command("build")
def data_cache_build(
    source: Annotated[str, typer.Argument(help="A segmentation source (Decathlon folder, images/ + masks/, CSV "
                                               "manifest path,mask), or a classification image folder or CSV "
                                               "manifest (path,label).")],
    window: Annotated[str | None, typer.Option(help="CT window preset or CENTER,WIDTH, as training will use.")] = None,
    preprocess: Annotated[list[str] | None, typer.Option(
        help="Volume preprocessing steps as training will use them (see `lepton train --help`).")] = None,
    image_size: Annotated[int | None, typer.Option(
        help="Classification: also store the pixels at this input size, as training with --image-size will read "
             "them.", min=8, max=1024)] = None,
    slices: Annotated[str, typer.Option(help="Classification: volume slices as training will read them.")] = "middle",
    workers: Annotated[int, typer.Option(help="Decoding processes (0 = one per core).", min=0, max=256)] = 0,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave out unreadable cases.")] = False,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Decode and preprocess every case into the cache in parallel (what is there is verified and reused); a
    training with the same window and steps then starts from it. An interrupted build resumes where it stopped."""
    from lepton.data.index.cache import CaseCache
    from lepton.data.transforms.pipeline import check_steps
    from lepton.errors import DataError
    from lepton.tasks import choose_task, get_task

    cache = CaseCache(cache_dir)
    task = get_task(choose_task(source)[0])
    store = task.load_cases(source, window=window, steps=check_steps(_parse_steps(preprocess)), skip_bad=skip_bad,
                            cache_dir=cache_dir, workers=workers, slices=slices, image_size=image_size)
    if store is None:
        raise DataError(f"{source}: the {task.name} task reads this source into memory as it is (MedMNIST .npz, a "
                        "partition, covariates); the case cache holds image folders, manifests and segmentation cases")
    console.print(f"{len(store)} case(s) of {store.source} in {cache.root} ({store.decoded} decoded now); labels "
                  f"{', '.join(store.label_names)}", highlight=False)


@cache_app.command("show")
def data_cache_show(cache_dir: CacheDirOpt = None,
                    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """What the cache holds: entries, size, sources and interrupted writes."""
    from lepton.data.index.cache import CaseCache

    shown = CaseCache(cache_dir).show()
    if as_json:
        console.print_json(json.dumps(shown))
        return
    console.print(f"{shown['root']}: {shown['entries']} entries, {shown['bytes'] / 2**20:.1f} MiB, "
                  f"{shown['interrupted_writes']} interrupted write(s)", highlight=False)
    for source in shown["sources"]:
        console.print(f"  {source}", highlight=False)


@cache_app.command("prune")
def data_cache_prune(
    older_than: Annotated[float | None, typer.Option(help="Remove entries written more than DAYS ago.", min=0,
                                                     max=36500)] = None,
    source: Annotated[str | None, typer.Option(help="Remove the entries of this source.")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Check every entry's checksums; remove corrupt ones.")]
    = False,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Remove interrupted writes, and entries by age, source or (with --verify) corruption."""
    from lepton.data.index.cache import CaseCache

    if source is not None and Path(source).exists():
        source = str(Path(source).expanduser().absolute())
    done = CaseCache(cache_dir).prune(older_than_days=older_than, source=source, verify=verify)
    console.print(f"removed {done['removed']} entr{'y' if done['removed'] == 1 else 'ies'}, "
                  f"{done['bytes'] / 2**20:.1f} MiB", highlight=False)


@data_app.command("partition")
def data_partition(
    source: Annotated[str, typer.Argument(help="A labelled source (see `lepton data inspect`).")],
    sites: Annotated[int, typer.Option(help="Number of sites to share the data between.", min=2, max=1000)],
    out: Annotated[Path, typer.Option(help="Folder for the site manifests site-0.json … site-{N-1}.json.")],
    scheme: Annotated[str, typer.Option(help="iid, label-skew (Dirichlet over classes) or by-patient.")] = "iid",
    alpha: Annotated[float, typer.Option(
        help="label-skew: Dirichlet concentration (0.1 strong, 100 near iid).",
        click_type=_finite(0, 1e6, open_low=True))] = 0.5,
    seed: Annotated[int, typer.Option(
        help="Random seed: the same seed gives the same partition.", min=0, max=2**32 - 1)] = 0,
    window: Annotated[str | None, typer.Option(help="CT window preset or CENTER,WIDTH for DICOM/NIfTI.")] = None,
    slices: Annotated[str | None, typer.Option(help="'middle', 'all' or 'volume' for volumes.")] = None,
) -> None:
    """Share a data set between N sites (for federated learning): one manifest per site that `lepton train` and
    `lepton data inspect` read like any source, reproducible from the seed."""
    from rich.table import Table

    from lepton.data import load_dataset
    from lepton.data.index.partition import write_partition

    load = {k: v for k, v in (("window", window), ("slices", slices)) if v is not None}
    data = load_dataset(source, **load)
    if Path(source).exists():
        source = str(Path(source).resolve())
    paths = write_partition(data, source, out, sites, scheme, alpha, seed, load)
    splits = sorted({str(s) or "all" for s in data.splits})
    table = Table("site", "manifest", *(f"{split} ({'/'.join(data.label_names)})" for split in splits))
    missing = []
    for path in paths:
        spec = json.loads(path.read_text())
        counts = spec["counts"]
        table.add_row(str(spec["site"]), str(path),
                      *("/".join(str(n) for n in counts.get(split, {}).values()) or "0" for split in splits))
        if 0 in counts.get("train", counts.get("all", {})).values():
            missing.append(str(spec["site"]))
    console.print(table)
    if missing:
        err.print(f"[yellow]warning[/]: site(s) {', '.join(missing)} have no training images of some "
                  "class (label skew); such a site cannot train a classifier alone", highlight=False)


def _print_series(r: dict) -> None:
    from rich.table import Table

    table = Table("series", "files", "slices", "shape", "spacing mm", "voxel axes", "tilt", "left out")
    for row in r["series"]:
        if row["ok"]:
            table.add_row(row["series"], str(row["files"]), str(row["slices"]), "x".join(map(str, row["shape"])),
                          " x ".join(f"{v:g}" for v in row["spacing_mm"]), row["orientation"],
                          f"{row['tilt_degrees']:g}", str(row["left_out"]))
        else:
            table.add_row(row["series"], str(row["files"]), "-", "-", "-", "-", "-", "-")
    console.print(f"[bold]{r['source']}[/]: {len(r['series'])} series")
    console.print(table)
    for row in r["series"]:
        for p in row["problems"]:
            console.print(f"[{'yellow' if row['ok'] else 'red'}]{'warning' if row['ok'] else 'problem'}[/] {p}",
                          highlight=False, soft_wrap=True)


def _print_segmentation(r: dict) -> None:
    from rich.table import Table

    console.print(f"task: {r['task']} — {r['evidence']}", highlight=False)
    console.print(f"[bold]{r['source']}[/]: {r['cases']} cases, labels {', '.join(r['labels'][1:])} "
                  f"(background: {r['labels'][0]}); cases per split {r['counts']}")
    table = Table("label", "cases showing it", "share of voxels")
    for name, row in r["classes"].items():
        table.add_row(name, str(row["cases"]), f"{row['voxel_share']:.4f}")
    console.print(table)
    console.print(f"sizes: {r['sizes']}  modalities: {r['modalities']}")
    if r["spacing_mm"]:
        console.print(f"spacing mm: median {r['spacing_mm']['median']} (min {r['spacing_mm']['min']}, "
                      f"max {r['spacing_mm']['max']})")
    d = r["duplicates"]
    console.print(f"exact duplicates: {d['cases']} cases in {d['groups']} groups, {d['across_splits']} across splits")
    for u in r["unreadable"]:
        console.print(f"[red]unreadable[/] {u['path']}: {u['reason']}")
    for p in r["problems"]:
        console.print(f"[yellow]problem[/] {p}")


def _print_inspection(r: dict) -> None:
    from rich.table import Table

    if "task" in r:
        console.print(f"task: {r['task']} — {r['evidence']}", highlight=False)
    console.print(f"[bold]{r['source']}[/]: {r['images']} images, classes {', '.join(r['classes'])}")
    table = Table("split", *r["classes"], "total")
    for split, counts in r["counts"].items():
        table.add_row(split, *(str(counts.get(c, 0)) for c in r["classes"]), str(sum(counts.values())))
    console.print(table)
    console.print(f"sizes: {r['sizes']}  channels: {r['channels']}  modalities: {r['modalities']}")
    if r["intensity"]:
        s = r["intensity"]
        console.print(f"intensity (0-1 scale): mean {s['mean']:.3f} std {s['std']:.3f} "
                      f"min {s['min']:.3f} max {s['max']:.3f} p1 {s['p1']:.3f} p99 {s['p99']:.3f}")
    d = r["duplicates"]
    console.print(f"exact duplicates: {d['images']} images in {d['groups']} groups, "
                  f"{d['across_splits']} across splits")
    for u in r["unreadable"]:
        console.print(f"[red]unreadable[/] {u['path']}: {u['reason']}")
    for p in r["problems"]:
        console.print(f"[yellow]problem[/] {p}")


