"""The ``lepton`` command line: thin verbs over the library API."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console

from lepton.errors import ConfigError, LeptonError


def _finite(low: float, high: float, open_low: bool = False) -> click.FloatRange:
    """A float option's bounds for typer's ``click_type`` (stated in --help). NaN and infinities are refused: click's
    FloatRange alone lets NaN through every bound."""

    class Finite(click.FloatRange):
        def convert(self, value, param, ctx):
            number = super().convert(value, param, ctx)
            if not math.isfinite(number):
                self.fail(f"{value!r} is not a finite number", param, ctx)
            return number

    return Finite(low, high, min_open=open_low)

app = typer.Typer(help="Lepton: medical images to trained, evaluated, explained and served models. Tasks: "
                       "classification (2-D images, 2.5-D and 3-D volumes) and segmentation (2-D and 3-D label "
                       "maps); the data's layout picks the task.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Inspect and share data sources (classification and segmentation).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys for the inference server.", no_args_is_help=True)
route_app = typer.Typer(help="Traffic routes between model versions (A/B, canary, shadow).", no_args_is_help=True)
models_app = typer.Typer(help="Network architectures.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
app.add_typer(route_app, name="route")
federate_app = typer.Typer(help="Federated training on Flower: sites keep their images.", no_args_is_help=True)
app.add_typer(federate_app, name="federate")
dicom_app = typer.Typer(help="DICOM for hospital integration: de-identification.", no_args_is_help=True)
app.add_typer(dicom_app, name="dicom")
pacs_app = typer.Typer(help="Data from a PACS over DICOMweb.", no_args_is_help=True)
app.add_typer(pacs_app, name="pacs")
console = Console(soft_wrap=True)
if not console.is_terminal:  # pipes and files get whole tables, not an 80-column squeeze
    console = Console(soft_wrap=True, width=200)
err = Console(stderr=True, soft_wrap=True)
_state = {"debug": False}
#: Libraries whose INFO logs are noise for a user: shown with --debug only.
QUIET_LOGGERS = ("alembic", "httpx", "httpcore", "matplotlib", "PIL", "urllib3", "filelock")


def _version(value: bool) -> None:
    if value:
        from lepton import __version__

        console.print(f"lepton {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version.")] = False,
) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in QUIET_LOGGERS:  # third-party INFO lines only with --debug
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)


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
        from lepton.data.inspection import inspect_source

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
CacheDirOpt = Annotated[str | None, typer.Option("--cache-dir", help="The cache's folder (default $LEPTON_CACHE, "
                                                                     "else ~/.cache/lepton).")]


@cache_app.command("build")
def data_cache_build(
    source: Annotated[str, typer.Argument(help="A segmentation source: Decathlon folder, images/ + masks/, or a "
                                               "CSV manifest (path,mask).")],
    window: Annotated[str | None, typer.Option(help="CT window preset or CENTER,WIDTH, as training will use.")] = None,
    preprocess: Annotated[list[str] | None, typer.Option(
        help="Volume preprocessing steps as training will use them (see `lepton train --help`).")] = None,
    workers: Annotated[int, typer.Option(help="Decoding processes (0 = one per core).", min=0, max=256)] = 0,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave out unreadable cases.")] = False,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Decode and preprocess every case into the cache in parallel (what is there is verified and reused); a
    training with the same window and steps then starts from it. An interrupted build resumes where it stopped."""
    from lepton.data.cache import CaseCache
    from lepton.data.cases import cache_segmentation
    from lepton.data.pipeline import check_steps

    cache = CaseCache(cache_dir)
    store = cache_segmentation(source, window=window, steps=check_steps(_parse_steps(preprocess)), skip_bad=skip_bad,
                               cache=cache, workers=workers or None)
    size = sum(e.nbytes() for e in store.entries)
    console.print(f"{len(store)} case(s) of {store.source} in {cache.root} ({size / 2**20:.1f} MiB); labels "
                  f"{', '.join(store.label_names[1:])}", highlight=False)


@cache_app.command("show")
def data_cache_show(cache_dir: CacheDirOpt = None,
                    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """What the cache holds: entries, size, sources and interrupted writes."""
    from lepton.data.cache import CaseCache

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
    from lepton.data.cache import CaseCache

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
    from lepton.data.partition import write_partition

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


@models_app.command("available")
def models_available() -> None:
    """List the networks create_model knows."""
    from rich.table import Table

    from lepton.models import list_models

    table = Table("name", "task", "dims", "description", "pretrained weights")
    for info in list_models():
        table.add_row(info.name, info.task, "/".join(f"{d}-D" for d in info.spatial_dims), info.description,
                      info.pretrained_layout or "-")
    console.print(table)


RegistryOpt = Annotated[str | None, typer.Option("--registry", help="Registry folder or database URL "
                                                 "(default: $LEPTON_DB_URL, else $LEPTON_HOME or ~/.lepton).")]


TrackOpt = Annotated[list[str] | None, typer.Option(
    "--track", help="Log to a tracker (repeatable): tensorboard (event files in the run directory: tensorboard "
                    "--logdir runs/), mlflow (the tracking URI in $MLFLOW_TRACKING_URI, else a local store beside the "
                    "runs; experiment $MLFLOW_EXPERIMENT_NAME, else lepton) or mlflow=URI; none for none. Needs "
                    "pip install 'lepton-imaging[tracking]'.")]


def _track(values: list[str] | None) -> list[str] | None:
    """``--track`` checked before anything runs (a typo fails at once, not after an epoch)."""
    if values:
        from lepton.tracking.base import parse_track

        parse_track(values)
    return values


def _registry(location: str | None):
    from lepton.registry import Registry

    return Registry.open(location)


def _print_version(v, card: bool = False) -> None:
    console.print_json(json.dumps({k: val for k, val in v.to_dict().items() if k not in ("config",)}))


@models_app.command("register")
def models_register(
    run: Annotated[str, typer.Argument(help="A finished run directory, or the MLflow run it was tracked to: "
                                            "runs:/RUN_ID "
                                            "(tracking URI from $MLFLOW_TRACKING_URI).")],
    name: Annotated[str, typer.Option("--name", help="Model name.")],
    description: Annotated[str, typer.Option(help="Model description.")] = "",
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys may see and call the model.")] = None,
    onnx: Annotated[bool, typer.Option("--onnx", help="Also store an ONNX export (for serve --backend onnx).")]
    = False,
    precision: Annotated[list[str] | None, typer.Option(
        help="Check a serving precision (bf16, int8) on the run's val set and record it (repeatable).")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Register a run as the next version of NAME (weights, spec, labels, metrics, card); a run tracked to MLflow is
    linked both ways (the version records its MLflow run; the MLflow run gets the card and the version's tag)."""
    reg = _registry(registry)
    if run.startswith("runs:/"):
        import tempfile

        from lepton.tracking.mlflow_tracker import download_run

        with tempfile.TemporaryDirectory() as tmp:
            v = reg.register_run(download_run(run, Path(tmp)), name, description=description, onnx=onnx,
                                 source=run)
    else:
        v = reg.register_run(Path(run), name, description=description, onnx=onnx)
    if tenant is not None:
        reg.set_tenant(name, tenant)
    console.print(f"registered [bold]{v.ref}[/] ({v.format}); card: lepton models card {v.ref}")
    if precision:
        _check_precisions(reg, v.ref, precision)


def _check_precisions(reg, ref: str, precisions: list[str]) -> None:
    from lepton.precision import PrecisionError, check_precision, refusal

    refused = []
    for p in precisions:
        record = check_precision(reg, ref, p)
        line = (f"{ref} {p}: val AUC {record['val_auc']:.4f} (fp32 {record['fp32_val_auc']:.4f}, "
                f"delta {record['auc_delta']:+.4f}), threshold {record['threshold']}")
        if record["accepted"]:
            console.print(f"{line}: accepted")
        else:
            refused.append(refusal(ref, p, record))
    if refused:
        raise PrecisionError("; ".join(refused))


@models_app.command("precision")
def models_precision(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION (or NAME@production, NAME).")],
    precision: Annotated[list[str], typer.Option(help="bf16, int8 or fp32 (repeatable).")],
    registry: RegistryOpt = None,
) -> None:
    """Check serving precisions of a version on its stored val set (AUC at most 0.005 below fp32) and record each
    with its own val-selected threshold; exits non-zero naming both AUCs when one is refused."""
    reg = _registry(registry)
    _check_precisions(reg, reg.get(ref).ref, precision)


@models_app.command("register-onnx")
def models_register_onnx(
    path: Annotated[Path, typer.Argument(help="ONNX file taking (N, C, H, W) images.")],
    name: Annotated[str, typer.Option("--name", help="Model name.")],
    labels: Annotated[str, typer.Option(help="Comma-separated class names, in output order.")],
    image_size: Annotated[int, typer.Option(help="Square input size in pixels.", min=8, max=4096)],
    channels: Annotated[int, typer.Option(help="Input channels.", min=1, max=4)] = 1,
    mean: Annotated[str | None, typer.Option(help="Comma-separated normalisation mean (default 0.5).")] = None,
    std: Annotated[str | None, typer.Option(help="Comma-separated normalisation std (default 0.5).")] = None,
    threshold: Annotated[float | None, typer.Option(
        help="Binary decision threshold on P(last class).", click_type=_finite(0, 1))] = None,
    registry: RegistryOpt = None,
) -> None:
    """Register a model trained elsewhere (e.g. Keras/TF exported to ONNX) with its input spec."""
    def floats(text: str | None) -> list[float] | None:
        return [float(x) for x in text.split(",")] if text else None

    v = _registry(registry).register_onnx(path, name, labels=[x.strip() for x in labels.split(",")],
                                          image_size=image_size, channels=channels, mean=floats(mean),
                                          std=floats(std), threshold=threshold)
    console.print(f"registered [bold]{v.ref}[/] (onnx)")


@models_app.command("list")
def models_list(
    name: Annotated[str | None, typer.Argument(help="Only this model.")] = None,
    registry: RegistryOpt = None,
) -> None:
    """List registered versions with stage and headline metrics."""
    from rich.table import Table

    table = Table("model", "version", "stage", "format", "val AUC", "val ACC", "created", "parent")
    for v in _registry(registry).list(name):
        auc, acc = v.metrics.get("val_auc"), v.metrics.get("val_acc")
        table.add_row(v.name, str(v.version), v.stage, v.format, f"{auc:.4f}" if auc is not None else "-",
                      f"{acc:.4f}" if acc is not None else "-", v.created_at[:19], str(v.parent_version or "-"))
    console.print(table)


@models_app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION, NAME@staging or NAME@production.")],
    registry: RegistryOpt = None,
) -> None:
    """Show one version as JSON."""
    _print_version(_registry(registry).get(ref))


@models_app.command("card")
def models_card(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION.")],
    set_file: Annotated[Path | None, typer.Option("--set", help="Replace the card with this Markdown file.")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Print a version's model card, or replace it with an edited file."""
    reg = _registry(registry)
    if set_file is not None:
        reg.set_card(ref, set_file.read_text(encoding="utf-8"))
    print(reg.card(ref))


@models_app.command("promote")
def models_promote(
    name: Annotated[str, typer.Argument()], version: Annotated[int, typer.Argument()],
    stage: Annotated[str, typer.Option(help="staging or production.")] = "production",
    registry: RegistryOpt = None,
) -> None:
    """Move a version to staging or production (the previous holder is archived)."""
    v = _registry(registry).promote(name, version, stage)
    console.print(f"{v.ref} is now {v.stage}")


@models_app.command("rollback")
def models_rollback(name: Annotated[str, typer.Argument()], registry: RegistryOpt = None) -> None:
    """Return production to the previous production version."""
    v = _registry(registry).rollback(name)
    console.print(f"{v.ref} is production again")


@models_app.command("archive")
def models_archive(name: Annotated[str, typer.Argument()], version: Annotated[int, typer.Argument()],
                   registry: RegistryOpt = None) -> None:
    """Archive a version."""
    v = _registry(registry).archive(name, version)
    console.print(f"{v.ref} archived")


@models_app.command("delete")
def models_delete(
    name: Annotated[str, typer.Argument()], version: Annotated[int, typer.Argument()],
    force: Annotated[bool, typer.Option("--force", help="Also delete a production version.")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Delete a version (refused for the production version unless --force)."""
    _registry(registry).delete(name, version, force=force)
    console.print(f"{name}@{version} deleted")


@models_app.command("diff")
def models_diff(name: Annotated[str, typer.Argument()], a: Annotated[int, typer.Argument()],
                b: Annotated[int, typer.Argument()], registry: RegistryOpt = None) -> None:
    """Config, preprocessing, label and metric changes between two versions."""
    console.print_json(json.dumps(_registry(registry).diff(name, a, b)))


@models_app.command("export")
def models_export(ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
                  path: Annotated[Path, typer.Argument(help="Bundle file, e.g. model.lepton")],
                  registry: RegistryOpt = None) -> None:
    """Write a portable bundle (weights, spec, card, manifest of hashes)."""
    out = _registry(registry).export_bundle(ref, path)
    console.print(f"wrote {out}")


@models_app.command("import")
def models_import(path: Annotated[Path, typer.Argument(help="A .lepton bundle.")],
                  name: Annotated[str | None, typer.Option(help="Register under this name.")] = None,
                  registry: RegistryOpt = None) -> None:
    """Verify a bundle and register it as a new version."""
    v = _registry(registry).import_bundle(path, name)
    console.print(f"imported as [bold]{v.ref}[/]")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to.")],
    scope: Annotated[str, typer.Option(help="predict or admin.")] = "predict",
    registry: RegistryOpt = None,
) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    key = _registry(registry).create_key(tenant, scope)
    err.print(f"API key for tenant {tenant} ({scope}); store it now, it cannot be shown again:")
    print(key)


@keys_app.command("list")
def keys_list(registry: RegistryOpt = None) -> None:
    """List key ids, tenants and scopes (never the keys)."""
    console.print_json(json.dumps(_registry(registry).list_keys()))


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The id shown by `lepton keys list`.")],
                registry: RegistryOpt = None) -> None:
    """Revoke a key."""
    _registry(registry).revoke_key(key_id)
    console.print(f"revoked {key_id}")


@route_app.command("set")
def route_set(
    name: Annotated[str, typer.Argument(help="Model name.")],
    weights: Annotated[list[str], typer.Argument(help="VERSION=WEIGHT pairs, e.g. v3=90 v4=10.")],
    shadow: Annotated[int | None, typer.Option(
        help="A version that sees copies of traffic; answers recorded only.", min=1, max=2**31 - 1)]
    = None,
    registry: RegistryOpt = None,
) -> None:
    """Split a model's traffic between versions (sticky per X-Lepton-Client header)."""
    parsed = {}
    for item in weights:
        version, sep, weight = item.lower().removeprefix("v").partition("=")
        if not sep or not version.isdigit():
            raise typer.BadParameter(f"expected VERSION=WEIGHT such as v3=90, got {item!r}")
        try:
            parsed[int(version)] = float(weight)
        except ValueError:
            raise typer.BadParameter(f"weight of {item!r} is not a number") from None
    route = _registry(registry).set_route(name, parsed, shadow)
    console.print(f"{name}: {route.weights} shadow={route.shadow}; running servers pick it up on reload")


@route_app.command("clear")
def route_clear(name: Annotated[str, typer.Argument()], registry: RegistryOpt = None) -> None:
    """Send all traffic to the served reference again."""
    _registry(registry).set_route(name, {})
    console.print(f"{name}: route cleared")


@app.command()
def serve(
    model: Annotated[list[str] | None, typer.Option(
        "--model", help="NAME, NAME@VERSION or NAME@production (repeatable).")] = None,
    registry: RegistryOpt = None,
    model_dir: Annotated[Path | None, typer.Option(
        "--model-dir", "--model_dir", help="Serve the Lepton bundle in this folder (a KServe runtime's /mnt/models) "
                                           "from a private registry instead of --registry.")] = None,
    model_name: Annotated[str | None, typer.Option(
        "--model-name", "--model_name", help="With --model-dir: the name it is served as.")] = None,
    keys_file: Annotated[Path | None, typer.Option(
        help="With --model-dir: API keys, one 'TENANT SCOPE KEY' line each (a mounted secret).")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "--http-port", "--http_port", help="Port.", min=0, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes on one port; each loads the models, batches "
                                               "on its own and polls the registry for swaps.", min=1, max=256)] = 1,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Disable API keys (loopback only).")] = False,
    backend: Annotated[str, typer.Option(help="auto or onnx.")] = "auto",
    precision: Annotated[str, typer.Option(
        help="fp32 (answers identical to the run's), bf16, int8, or auto (the fastest on this CPU that passes its "
             "check on the version's val set: AUC at most 0.005 below fp32).")] = "fp32",
    max_batch_size: Annotated[int, typer.Option(help="Largest dynamic batch.", min=1, max=1024)] = 32,
    max_wait_ms: Annotated[float, typer.Option(
        help="Longest wait to fill a batch.", click_type=_finite(0, 10_000))] = 5.0,
    batch_idle_ms: Annotated[float, typer.Option(help="Also close a batch when no request arrived for this "
                                                      "long (0 = off); lets --max-wait-ms be large.",
                                                      click_type=_finite(0, 10_000))] = 0.0,
    max_queue: Annotated[int, typer.Option(help="Queued requests per version before 503.", min=1, max=1_000_000)] = 256,
    model_concurrency: Annotated[int, typer.Option(
        help="Batches of a version run at once (0: 1 when batching, one per core with --max-batch-size 1).",
        min=0, max=1024)] = 0,
    rate_limit: Annotated[float, typer.Option(
        help="Requests per second per key (0 = off).", click_type=_finite(0, 1e6))] = 50.0,
    rate_burst: Annotated[int, typer.Option(
        help="Requests a key may send at once before the rate applies.", min=1, max=10**9)] = 100,
    poll_seconds: Annotated[float, typer.Option(
        help="Re-read the registry every N seconds (0 = admin call).", click_type=_finite(0, 86_400))] = 0,
    redis: Annotated[str | None, typer.Option(
        envvar="LEPTON_REDIS_URL", help="redis://HOST:PORT/DB: rate limits and admin reloads shared by replicas on "
                                        "several hosts (default: per host).")] = None,
    redis_prefix: Annotated[str, typer.Option(help="Prefix of this deployment's Redis keys.")] = "lepton",
    research_notice: Annotated[bool, typer.Option(
        "--research-notice/--no-research-notice",
        help="The web console's 'research use — not for diagnosis' notice on every page.")] = True,
) -> None:
    """Serve registered models over HTTP (native API, Open Inference Protocol v2, /metrics, the web console at
    /ui)."""
    import os

    # OpenMP threads that spin between batches starve the event loop; passive waiting measured
    # +18 % requests/s in benchmarks/serve_load.py. Must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from lepton.serve import ServeConfig
    from lepton.serve import serve as serve_fn

    if workers < 1:
        raise typer.BadParameter(f"--workers must be at least 1 (got {workers})")
    if model_dir is not None:
        from lepton.serve.modeldir import registry_from_model_dir

        if model or registry:
            raise typer.BadParameter("--model-dir serves its own bundle: leave out --model and --registry")
        if not model_name:
            raise typer.BadParameter("--model-dir needs --model-name (KServe passes --model_name={{.Name}})")
        if keys_file is None and not no_auth:
            raise typer.BadParameter("--model-dir needs --keys-file (the API keys) or --no-auth on loopback")
        registry, model = registry_from_model_dir(model_dir, model_name, keys_file), [model_name]
    elif not model:
        raise typer.BadParameter("give --model NAME (repeatable), or --model-dir DIR --model-name NAME")
    elif keys_file is not None or model_name:
        raise typer.BadParameter("--keys-file and --model-name go with --model-dir")
    if no_auth:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise typer.BadParameter("--no-auth is only allowed on loopback (--host 127.0.0.1)")
        err.print("[bold red]WARNING: authentication is OFF; anyone on this machine can call the models.[/]")
    serve_fn(ServeConfig(models=model, registry=registry, auth=not no_auth, backend=backend,
                         precision=precision, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                         max_queue=max_queue, model_concurrency=model_concurrency,
                         batch_idle_ms=batch_idle_ms, rate_limit=rate_limit, rate_burst=rate_burst,
                         poll_seconds=poll_seconds, redis=redis or None, redis_prefix=redis_prefix,
                         ui_notice=research_notice),
             host=host, port=port, workers=workers)


def _parse_steps(items: list[str] | None) -> list[dict] | None:
    if not items:
        return None
    from lepton.data.pipeline import parse_step

    return [parse_step(text) for text in items]


def _parse_aug(values: list[str] | None) -> dict[str, float]:
    out = {}
    for item in values or []:
        key, sep, val = item.partition("=")
        try:
            out[key.strip()] = float(val)
        except ValueError:
            raise typer.BadParameter(f"--aug expects KEY=NUMBER, got {item!r}") from None
        if not sep:
            raise typer.BadParameter(f"--aug expects KEY=NUMBER, got {item!r}")
    return out


@app.command()
def train(
    data: Annotated[str | None, typer.Argument(help="Training data source (see `lepton data inspect`).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run directory.")] = None,
    config: Annotated[Path | None, typer.Option(help="A config.yaml to start from.")] = None,
    preset: Annotated[str, typer.Option(help="Named recipe: auto (follows the task and data: segmentation, "
                                             "medmnist3d or medmnist for .npz data, else default), default, demo, "
                                             "medmnist, medmnist3d, segmentation.")] = "auto",
    name: Annotated[str | None, typer.Option(help="Run name (default: data-model-time).")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Parent folder of run directories.")] = None,
    task: Annotated[str | None, typer.Option(help="What the model learns: classification or segmentation (or a task "
                                                  "registered in lepton.tasks). Default: the data's layout picks it "
                                                  "(a Decathlon folder, images/ + masks/ or a CSV with a mask column "
                                                  "→ segmentation; class folders, a label CSV or .npz → "
                                                  "classification); a contradicting --task is refused.")] = None,
    model: Annotated[str | None, typer.Option(help="Network name (`lepton models available`).")] = None,
    pretrained: Annotated[str | None, typer.Option(help="Local state-dict file for transfer learning.")] = None,
    freeze_backbone: Annotated[bool | None, typer.Option("--freeze-backbone", help="Train the head only.")] = None,
    backbone_lr: Annotated[float | None, typer.Option(help="Learning rate of the backbone.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (AdamW).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay.")] = None,
    schedule: Annotated[str | None, typer.Option(help="cosine, step or none.")] = None,
    warmup_epochs: Annotated[float | None, typer.Option(help="Linear warm-up epochs.")] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Label smoothing.")] = None,
    imbalance: Annotated[str | None, typer.Option(help="none, weighted (loss) or balanced (sampling).")] = None,
    augment: Annotated[str | None, typer.Option(help="Preset: none, light, xray, corrupt, strong.")] = None,
    aug: Annotated[list[str] | None, typer.Option(help="Override one augmentation option, KEY=VALUE.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Square input size (default: data's native).")] = None,
    channels: Annotated[int | None, typer.Option(help="Input channels, 1 or 3.")] = None,
    window: Annotated[str | None, typer.Option(help="CT window for DICOM/NIfTI: lung, mediastinum, "
                                                    "bone, brain, soft-tissue or C,W.")] = None,
    slices: Annotated[str | None, typer.Option(help="Volumes: the middle slice, all slices, or volume "
                                                    "(whole volumes for 3-D networks).")] = None,
    preprocess: Annotated[list[str] | None, typer.Option(
        help="A volume preprocessing step, in order (repeat): spacing=X,Y,Z (mm), crop_foreground[=MARGIN], "
             "pad=D,H,W, crop_or_pad=D,H,W, resize=D,H,W. Saved with the run; predict and serve apply it.")] = None,
    slab: Annotated[bool | None, typer.Option("--slab", help="2.5-D: a 2-D network reads a volume's slices as "
                                                             "channels (cheaper than 3-D).")] = None,
    ema_decay: Annotated[float | None, typer.Option(help="EMA of weights (0 = off).")] = None,
    early_stopping: Annotated[int | None, typer.Option(help="Patience in epochs (0 = off).")] = None,
    time_budget: Annotated[float | None, typer.Option(help="Seconds the training loop may take; the epochs "
                                                           "are fitted to it after epoch 1 (0 = none).")] = None,
    ensemble: Annotated[int | None, typer.Option(
        help="Up to N members (other seeds) while the time budget has room for whole ones; their mean is kept "
             "unless it scores below a typical member on val.")] = None,
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="Flip test-time augmentation.")] = None,
    adversarial: Annotated[str | None, typer.Option(help="Adversarial training: fgsm or pgd.")] = None,
    adv_epsilon: Annotated[float | None, typer.Option(help="Attack budget on the 0-1 pixel scale.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    deterministic: Annotated[bool | None, typer.Option("--deterministic", help="Deterministic kernels.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    precision: Annotated[str | None, typer.Option(
        help="auto (bf16 on CPUs with AMX/AVX512-BF16 and bf16 GPUs, else fp32), fp32, bf16, fp16 (CUDA).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    skip_bad: Annotated[bool | None, typer.Option("--skip-bad", help="Skip unreadable files.")] = None,
    data_engine: Annotated[str | None, typer.Option(
        help="Segmentation: memory (all cases as tensors), cache (patches read from memory-mapped cases in the "
             "on-disk case cache; memory does not grow with the data) or auto (memory while it fits "
             "--memory-limit).")] = None,
    memory_limit: Annotated[float | None, typer.Option(
        help="GB the in-memory path may take before auto switches to the cache.", min=0.001, max=4096)] = None,
    cache_dir: Annotated[str | None, typer.Option(
        help="The case cache's folder (default $LEPTON_CACHE, else ~/.cache/lepton).")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Processes that decode cases into the cache (0 = one per core).", min=0, max=256)] = None,
    loader_workers: Annotated[int | None, typer.Option(
        help="With the cache: DataLoader processes reading patches ahead of each step (0 = in the loop).", min=0,
        max=64)] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Val share when the data has no val split.")] = None,
    test_fraction: Annotated[float | None, typer.Option(help="Test share when the data has no splits.")] = None,
    lr_scaling: Annotated[str | None, typer.Option(
        help="With several processes: none (--lr as given), linear (x processes) or sqrt.")] = None,
    sync_bn: Annotated[bool | None, typer.Option(
        "--sync-bn/--no-sync-bn", help="With several processes: BatchNorm over the global batch (default) or over "
                                       "each process's share (faster on CPUs).")] = None,
    nproc: Annotated[int, typer.Option(
        help="Train data-parallel in N local processes under torchrun (gloo on CPU, NCCL on CUDA); "
             "--batch-size is per process.")] = 1,
    max_restarts: Annotated[int, typer.Option(
        help="With --nproc: torchrun restarts a failed job up to N times; it resumes from last.pt.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    track: TrackOpt = None,
) -> None:
    """Train a model for the task the data's layout picks (classification or segmentation; --task to say it);
    writes a run directory with checkpoints, history and curves."""
    import os

    from lepton.config import TrainConfig, make_config
    from lepton.train import run_name, summary
    from lepton.train import train as train_fn

    launching = nproc != 1 and "LOCAL_RANK" not in os.environ
    _track(track)
    if not launching and max_restarts:
        raise typer.BadParameter("--max-restarts needs --nproc N (or torchrun's own --max-restarts)")
    if resume is not None:
        if launching:
            raise typer.Exit(_launch(nproc, max_restarts, None))
        run = train_fn(resume=resume, quiet=quiet, track=_track(track))
    else:
        overrides = dict(
            name=name, output_dir=output_dir, task=task, model=model, pretrained=pretrained,
            freeze_backbone=freeze_backbone, backbone_lr=backbone_lr, epochs=epochs, batch_size=batch_size,
            lr=lr, weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
            label_smoothing=label_smoothing, imbalance=imbalance, augment=augment,
            augment_options=_parse_aug(aug) or None, image_size=image_size, channels=channels,
            window=window, slices=slices, preprocess=_parse_steps(preprocess), slab=slab,
            ema_decay=ema_decay, early_stopping=early_stopping, tta=tta, ensemble=ensemble,
            time_budget_s=time_budget, lr_scaling=lr_scaling, sync_batchnorm=sync_bn,
            adversarial=adversarial, adv_epsilon=adv_epsilon,
            seed=seed, deterministic=deterministic, device=device, precision=precision, threads=threads,
            skip_bad=skip_bad, val_fraction=val_fraction, test_fraction=test_fraction, data_engine=data_engine,
            memory_limit_gb=memory_limit, cache_dir=cache_dir, workers=workers, loader_workers=loader_workers,
        )
        if config is not None:
            base = TrainConfig.from_yaml(config).to_dict()
            base.update({k: v for k, v in overrides.items() if v is not None})
            if data:
                base["data"] = data
            base["name"] = name or ""
            cfg = TrainConfig.from_dict(base).validate()
        else:
            if not data:
                raise typer.BadParameter("give a DATA source, --config, or --resume RUN")
            from lepton.tasks import choose_task

            overrides["task"], layout = choose_task(data, task)
            if os.environ.get("RANK", "0") == "0":
                err.print(layout.describe(), highlight=False)
            cfg = make_config(preset, data=data, **overrides)
        if launching:  # every worker and every restart must agree on the run directory: name it now
            raise typer.Exit(_launch(nproc, max_restarts, None if name else run_name(cfg)))
        run = train_fn(config=cfg, quiet=quiet, track=track)
    if os.environ.get("RANK", "0") == "0":
        console.print_json(json.dumps(summary(run)))


def _launch(nproc: int, max_restarts: int, name: str | None) -> int:
    """This very command under torchrun, less --nproc/--max-restarts (plus --name): torchrun's exit status."""
    from lepton.train.distributed import launch

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in ("--nproc", "--max-restarts"):
            skip = True
        elif not arg.startswith(("--nproc=", "--max-restarts=")):
            argv.append(arg)
    return launch(argv + (["--name", name] if name else []), nproc, max_restarts)


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    data: Annotated[str | None, typer.Option(help="Data source (default: the run's own).")] = None,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    output: Annotated[Path | None, typer.Option(help="Report folder (default RUN/eval/SPLIT).")] = None,
    bootstrap: Annotated[int, typer.Option(
        help="Bootstrap resamples for the CIs (0 = none).", min=0, max=100_000)] = 1000,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip unreadable files.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full report as JSON.")] = False,
    track: TrackOpt = None,
) -> None:
    """Metrics with 95 % CIs, calibration and plots; writes report.json and report.md (and logs them to the run's
    trackers, or to --track)."""
    from lepton.evaluate import evaluate as evaluate_fn

    report = evaluate_fn(run, data, split=split, output=output, n_bootstrap=bootstrap, skip_bad=skip_bad,
                         track=_track(track))
    if as_json:
        console.print_json(json.dumps(report))
        return
    for line in report["summary"]:
        console.print(f"{report['split']} ({report['images']} images), {line}", highlight=False)
    console.print(f"report: {Path(report['output']) / 'report.md'}")


@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="A run directory, or a registry reference: NAME, NAME@VERSION or "
                                              "NAME@STAGE (e.g. pneu@production).")],
    images: Annotated[list[str], typer.Argument(help="Image files (PNG, JPEG, BMP, TIFF, DICOM, NIfTI, NPY), "
                                                     "folders of them, or DICOMweb sources: "
                                                     "dicomweb+http://HOST/dicom-web?StudyInstanceUID=… (QIDO "
                                                     "filters; the series are fetched into a local cache).")],
    registry: RegistryOpt = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    output: Annotated[Path | None, typer.Option(help="Segmentation: write each label map here (NIfTI for volumes, "
                                                     "PNG for images).")] = None,
    dicom_seg: Annotated[bool, typer.Option("--dicom-seg", help="Segmentation of DICOM series folders: also write a "
                                                                 "DICOM SEG referencing the series (needs --output).")
                         ] = False,
) -> None:
    """Print one JSON line per image: the model's answer (classifiers: label, probabilities, threshold;
    segmentation: sizes per class and the lesion list)."""
    from lepton.runs import load_run

    if dicom_seg and output is None:
        raise ConfigError("--dicom-seg writes files: give --output DIR")
    if Path(model).is_dir():  # a run directory wins over a registry name that happens to match
        loaded = load_run(model, device=device)
    else:
        loaded = _registry(registry).load_run(model, device=device)
    extra = {"output": output, "dicom_seg": dicom_seg} if loaded.task.dense else {}
    paths: list[Path] = []
    for item in images:
        if item.startswith("dicomweb+"):
            from lepton.data.dicomweb import Source, fetch

            paths.extend(fetch(Source.parse(item)))  # one cached folder per series, named by a pseudonym
        else:
            paths.append(Path(item))
    for image in _expand(paths, series=loaded.preprocessing.spatial_dims == 3):
        try:  # one file at a time, so a bad file names itself and the rest still run
            rows = loaded.predict([image], **extra)
        except LeptonError as exc:
            err.print(f"[red]error[/]: {exc}", highlight=False, soft_wrap=True)
            _state["failed"] = True
            continue
        for row in rows:
            print(json.dumps(row))
    if _state.get("failed"):
        raise typer.Exit(2)


def _expand(paths: list[Path], series: bool = False) -> list[Path]:
    """Files as given, folders as their visible files (recursively, sorted); a missing path stays, to be reported.
    With ``series`` (a volume model) a folder that directly holds DICOM files is one input: a series."""
    from lepton.data.io import sniff_format

    out: list[Path] = []
    for path in paths:
        if series and path.is_dir() and any(p.is_file() and not p.name.startswith(".") and sniff_format(p) == "dicom"
                                            for p in path.iterdir()):
            out.append(path)
        elif path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file()
                          and not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            out.append(path)
    return out


@app.command()
def explain(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    images: Annotated[list[Path], typer.Argument(help="Image files to explain.")],
    method: Annotated[str, typer.Option(help="gradcam or gradcam++.")] = "gradcam",
    target: Annotated[str | None, typer.Option("--class", help="Class to explain (default: predicted).")] = None,
    output: Annotated[Path, typer.Option(help="Folder for overlays (PNG) and raw maps (NPY).")] = Path("explanations"),
) -> None:
    """Grad-CAM heatmaps: an overlay PNG and the raw map (NPY) per image; one JSON line each."""
    from lepton.explain import explain as explain_fn

    for row in explain_fn(run, images, method=method, output=output, target=target):
        print(json.dumps(row))


@app.command()
def robustness(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    data: Annotated[str | None, typer.Option(help="Data source (default: the run's own).")] = None,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "val",
    corruption: Annotated[list[str] | None, typer.Option(help="Only these corruptions (repeatable).")] = None,
    attack: Annotated[list[str] | None, typer.Option(help="fgsm and/or pgd (repeatable).")] = None,
    max_images: Annotated[int | None, typer.Option(help="Score a random subset of this size.", min=1)] = None,
    output: Annotated[Path | None, typer.Option(help="Report folder (default RUN/robustness/SPLIT).")] = None,
    track: TrackOpt = None,
) -> None:
    """ACC/AUC under 9 corruptions x 5 severities and FGSM/PGD at several epsilons; table, JSON, plot."""
    from lepton.robustness import render_markdown
    from lepton.robustness import robustness as robustness_fn

    report = robustness_fn(run, data, split=split, corruptions=tuple(corruption) if corruption else None,
                           attacks=tuple(attack or ("fgsm", "pgd")), max_images=max_images, output=output,
                           track=_track(track))
    print(render_markdown(report))
    console.print(f"report: {report['output']}/robustness.md")


@app.command("export")
def export_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    fmt: Annotated[list[str] | None, typer.Option("--format", help="onnx and/or torchscript (repeatable).")] = None,
    quantize: Annotated[str | None, typer.Option(help="int8: ONNX Runtime static quantization.")] = None,
    prune: Annotated[float | None, typer.Option(
        help="Fraction of conv/linear weights to prune (L1).",
        click_type=click.FloatRange(0, 1, min_open=True, max_open=True))] = None,
    finetune_epochs: Annotated[int, typer.Option(help="Fine-tune epochs after pruning.", min=0, max=10_000)] = 0,
    output: Annotated[Path | None, typer.Option(help="Output folder (default RUN/export).")] = None,
    track: TrackOpt = None,
) -> None:
    """Export to ONNX/TorchScript, optionally int8-quantize and prune; print the comparison table."""
    from lepton.export import export_run, format_table

    report = export_run(run, formats=tuple(fmt or ["onnx"]), quantize=quantize, prune=prune,
                        finetune_epochs=finetune_epochs, output=output, track=_track(track))
    console.print(format_table(report), highlight=False)
    console.print(f"report: {(output or run / 'export') / 'export_report.json'}")


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option(help="Where the data and run go.")] = Path("runs"),
    quick: Annotated[bool, typer.Option("--quick", help="A smaller, faster demo.")] = False,
    volumes: Annotated[bool, typer.Option("--volumes", help="CT volumes as DICOM series and NIfTI files, a 3-D "
                                                            "network.")] = False,
    task: Annotated[str, typer.Option(help="classification, or segmentation (CT nodules: a 3-D U-Net, a DICOM SEG "
                                           "written and read back).")] = "classification",
    seed: Annotated[int, typer.Option(help="Random seed.", min=0, max=2**32 - 1)] = 0,
) -> None:
    """Synthetic chest X-rays (or CT volumes) → train → evaluate → predict, end to end on CPU."""
    from lepton.demo import run_demo, run_segmentation_demo, run_volume_demo

    if task == "segmentation":
        result = run_segmentation_demo(output_dir, quick=quick, seed=seed)
        console.print_json(json.dumps(result))
        console.print(f"[bold green]Segmentation demo done[/] in {result['wall_seconds']:.0f} s: test Dice "
                      f"{result['test_dice']:.3f} on {result['test_cases']} cases; DICOM SEG: "
                      f"{result['new_case']['prediction']['dicom_seg']}")
        return
    if task != "classification":
        raise ConfigError(f"demo --task is classification or segmentation (got {task!r})")
    result = (run_volume_demo if volumes else run_demo)(output_dir, quick=quick, seed=seed)
    console.print_json(json.dumps(result))
    console.print(
        f"[bold green]Demo done[/] in {result['wall_seconds']:.0f} s: test ACC {result['test_acc']:.3f}, "
        f"AUC {result['test_auc']:.3f} on {result['test_images']} images.\n"
        f"  run directory: {result['run']}\n  report: {result['report']}\n"
        f"  next: lepton predict {result['run']} {'SERIES_FOLDER' if volumes else 'IMAGE.png'}")



@federate_app.command("site")
def federate_site(
    superlink: Annotated[str, typer.Option(help="The SuperLink's Fleet address, HOST:PORT.")],
    data: Annotated[str, typer.Option(help="This site's data: any source `lepton train` reads (e.g. site-0.json).")],
    port: Annotated[int, typer.Option(
        help="This SuperNode's own port (one per site on a machine).", min=1, max=65535)] = 9094,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS (loopback or a trusted network only).")] = False,
    root_certificates: Annotated[Path | None, typer.Option(help="CA certificate of the SuperLink's TLS.")] = None,
) -> None:
    """Join a federation as a site: a Flower SuperNode whose ClientApp trains Lepton's loop on DATA."""
    import os

    from lepton.federated.deploy import supernode_command

    cmd = supernode_command(superlink, data, port, insecure, root_certificates)
    os.execv(cmd[0], cmd)


@federate_app.command("simulate")
def federate_simulate(
    source: Annotated[str, typer.Argument(help="A labelled source, shared between the virtual sites.")],
    sites: Annotated[int, typer.Option(help="Virtual sites.", min=2, max=1000)] = 4,
    scheme: Annotated[str, typer.Option(help="How the source is shared: iid, label-skew or by-patient.")] = "iid",
    alpha: Annotated[float, typer.Option(
        help="label-skew: Dirichlet concentration.", click_type=_finite(0, 1e6, open_low=True))] = 0.5,
    strategy: Annotated[str, typer.Option(help="fedavg, fedprox or fedadam (Flower's).")] = "fedavg",
    rounds: Annotated[int, typer.Option(help="Federated rounds.", min=1, max=10_000)] = 3,
    local_epochs: Annotated[int, typer.Option(help="Epochs each site trains per round.", min=1, max=10_000)] = 1,
    fraction: Annotated[float, typer.Option(
        help="Share of the sites that train each round.", click_type=_finite(0, 1, open_low=True))] = 1.0,
    model: Annotated[str, typer.Option(help="Network (`lepton models available`).")] = "lepton_cnn",
    lr: Annotated[float, typer.Option(
        help="Sites' learning rate (AdamW).", click_type=_finite(0, 10, open_low=True))] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Sites' batch size.", min=1, max=65_536)] = 64,
    proximal_mu: Annotated[float, typer.Option(
        help="FedProx: weight of the proximal term.", click_type=_finite(0, 1e6))] = 0.01,
    seed: Annotated[int, typer.Option(help="Random seed (partition and training).", min=0, max=2**32 - 1)] = 0,
    output_dir: Annotated[str, typer.Option(help="Parent of the run directory.")] = "runs",
    name: Annotated[str, typer.Option(help="Run name; the site manifests go to OUTPUT/NAME-sites.")] = "federated",
    secagg: Annotated[bool, typer.Option("--secagg", help="Secure aggregation (Flower's SecAgg+), 3 sites or "
                                                          "more.")] = False,
    track: TrackOpt = None,
) -> None:
    """Simulate a federation on this machine with Flower's simulation engine (Ray): SOURCE shared between
    virtual sites, each a ClientApp; the same run directory as `lepton federate run`."""
    from lepton.federated.apps import STRATEGIES
    from lepton.federated.simulation import simulate

    if strategy not in STRATEGIES:
        raise typer.BadParameter(f"--strategy must be one of {', '.join(STRATEGIES)}")
    run_dir = simulate(source, sites, {
        "strategy": strategy, "rounds": rounds, "local-epochs": local_epochs, "fraction": fraction,
        "min-sites": max(1, int(sites * fraction)), "model": model, "lr": lr, "batch-size": batch_size,
        "proximal-mu": proximal_mu if strategy == "fedprox" else 0.0, "seed": seed, "output-dir": output_dir,
        "name": name, "secagg": secagg, "track": " ".join(_track(track) or [])}, scheme=scheme, alpha=alpha,
        seed=seed)
    console.print(f"run directory: {run_dir}")


@federate_app.command("run")
def federate_run(
    superlink: Annotated[str, typer.Option(help="The SuperLink's Control address, HOST:PORT.")],
    strategy: Annotated[str, typer.Option(help="fedavg, fedprox or fedadam (Flower's).")] = "fedavg",
    rounds: Annotated[int, typer.Option(help="Federated rounds.", min=1, max=10_000)] = 3,
    local_epochs: Annotated[int, typer.Option(help="Epochs each site trains per round.", min=1, max=10_000)] = 1,
    fraction: Annotated[float, typer.Option(
        help="Share of the sites that train each round.", click_type=_finite(0, 1, open_low=True))] = 1.0,
    min_sites: Annotated[int, typer.Option(help="Sites needed to start and in every round.", min=1, max=10_000)] = 2,
    model: Annotated[str, typer.Option(help="Network (`lepton models available`).")] = "lepton_cnn",
    lr: Annotated[float, typer.Option(
        help="Sites' learning rate (AdamW).", click_type=_finite(0, 10, open_low=True))] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Sites' batch size.", min=1, max=65_536)] = 64,
    proximal_mu: Annotated[float, typer.Option(
        help="FedProx: weight of the proximal term.", click_type=_finite(0, 1e6))] = 0.01,
    image_size: Annotated[int, typer.Option(
        help="Input size for every site (0: the sites' native size).", min=0, max=1024)] = 0,
    seed: Annotated[int, typer.Option(help="Random seed.", min=0, max=2**32 - 1)] = 0,
    dp_noise: Annotated[float, typer.Option(help="Differential privacy: Gaussian noise multiplier (0 = off; Flower's "
                                                  "server-side fixed clipping).", click_type=_finite(0, 1e6))] = 0.0,
    dp_clip: Annotated[float, typer.Option(
        help="Differential privacy: clipping norm of each site's update.", click_type=_finite(0, 1e9))] = 0.0,
    secagg: Annotated[bool, typer.Option("--secagg", help="Secure aggregation (Flower's SecAgg+): the server sees only "
                                                          "the sum of the sites' weights (3 sites or more).")] = False,
    secagg_shares: Annotated[float, typer.Option(help="SecAgg+: secret shares per site, a fraction of the sampled "
                                                      "sites or a count above 2.",
                                                      click_type=_finite(0, 10_000, open_low=True))] = 1.0,
    secagg_threshold: Annotated[float, typer.Option(help="SecAgg+: shares needed to reconstruct a secret, a fraction "
                                                         "of the shares or a count; sites that may drop out: shares "
                                                         "minus this.",
                                                         click_type=_finite(0, 10_000, open_low=True))] = 0.6,
    secagg_clip: Annotated[float, typer.Option(help="SecAgg+: every weight must lie in ±this (a site refuses to send "
                                                    "one outside it).",
                                                    click_type=_finite(0, 1e9, open_low=True))] = 64.0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for sites each round; a site that does not answer "
                                                "in time is left out of that round.",
                                                click_type=_finite(0, 7 * 86_400, open_low=True))] = 600.0,
    output_dir: Annotated[str, typer.Option(help="Parent of the run directory (on the SuperLink's machine).")] = "runs",
    name: Annotated[str, typer.Option(help="Run name (default: federated-STRATEGY-time).")] = "",
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS (loopback or a trusted network only).")] = False,
    root_certificates: Annotated[Path | None, typer.Option(help="CA certificate of the SuperLink's TLS.")] = None,
    track: TrackOpt = None,
) -> None:
    """Run a federation: Lepton's Flower app submitted to a SuperLink; the global model becomes a run directory.
    With --track the server logs every round, pooled and per site."""
    from lepton.federated.apps import STRATEGIES
    from lepton.federated.deploy import run

    if strategy not in STRATEGIES:
        raise typer.BadParameter(f"--strategy must be one of {', '.join(STRATEGIES)}")
    for label, value in (("--rounds", rounds), ("--local-epochs", local_epochs), ("--min-sites", min_sites)):
        if value < 1:
            raise typer.BadParameter(f"{label} must be at least 1 (got {value})")
    if not 0 < fraction <= 1:
        raise typer.BadParameter(f"--fraction must be in (0, 1] (got {fraction})")
    settings = {"strategy": strategy, "rounds": rounds, "local-epochs": local_epochs, "fraction": fraction,
                "min-sites": min_sites, "model": model, "lr": lr, "batch-size": batch_size,
                "proximal-mu": proximal_mu if strategy == "fedprox" else 0.0, "image-size": image_size, "seed": seed,
                "output-dir": output_dir, "name": name, "dp-noise": dp_noise, "dp-clip": dp_clip, "timeout": timeout,
                "secagg": secagg, "secagg-shares": secagg_shares, "secagg-threshold": secagg_threshold,
                "secagg-clip": secagg_clip, "track": " ".join(_track(track) or [])}
    if dp_noise < 0 or dp_clip < 0 or (dp_noise > 0 and dp_clip <= 0):
        raise typer.BadParameter("--dp-noise needs --dp-clip > 0 (and neither may be negative)")
    if secagg:
        from lepton.federated.secure import SecAggSettings

        SecAggSettings.from_config(settings)  # a bad value named here, before anything is submitted
    raise typer.Exit(run(superlink, settings, insecure, root_certificates))

@app.command("dicom-node")
def dicom_node(
    pacs: Annotated[str, typer.Option(help="The PACS's DICOMweb base URL, e.g. http://orthanc:8042/dicom-web.")],
    model: Annotated[str, typer.Option(help="A registered classifier: NAME@production, NAME@3, …")],
    registry: RegistryOpt = None,
    filter_: Annotated[list[str] | None, typer.Option(
        "--filter", help="Which series to run on: modality=CT,DX (repeatable). Default: every series except "
                         "Lepton's own reports.")] = None,
    name: Annotated[str, typer.Option(help="This node's name in the registry's record (one record per name).")] =
    "default",
    interval: Annotated[float, typer.Option(
        help="Seconds between polls of the PACS.", click_type=_finite(0.01, 86_400))] = 10.0,
    max_attempts: Annotated[int, typer.Option(
        help="Attempts per study before it is parked with its reason.", min=1, max=1000)] = 5,
    backoff: Annotated[float, typer.Option(
        help="Seconds before the first retry (doubling each time).", click_type=_finite(0, 86_400))] = 30.0,
    metrics_port: Annotated[int, typer.Option(
        help="Prometheus /metrics on 127.0.0.1:PORT (0 = off).", min=0, max=65535)] = 0,
    once: Annotated[bool, typer.Option("--once", help="Poll once and exit (for cron or a test).")] = False,
    explain: Annotated[str | None, typer.Option(help="Also store a Grad-CAM overlay as a Secondary Capture: "
                                                     "gradcam or gradcam++.")] = None,
    settle: Annotated[float, typer.Option(help="Seconds a study's series and instance counts must stay unchanged "
                                               "before it is processed (studies arrive instance by instance; 0 = "
                                               "at once). --once processes what is there: run it when studies are "
                                               "complete.", click_type=_finite(0, 86_400))] = 30.0,
) -> None:
    """Watch a PACS over DICOMweb: run MODEL on new studies and store each answer back as a DICOM Structured
    Report (STOW-RS). Restartable: the registry records every study (as a pseudonym), so none is processed twice;
    failures are retried with backoff, then parked with the reason."""
    from lepton.pacs.node import DicomNode

    modalities: list[str] = []
    for item in filter_ or []:
        key, _, value = item.partition("=")
        if key.strip().lower() != "modality" or not value.strip():
            raise typer.BadParameter(f"--filter {item!r}: use modality=CT,DX")
        modalities += [m.strip() for m in value.split(",") if m.strip()]
    if max_attempts < 1 or interval <= 0 or backoff < 0 or settle < 0:
        raise typer.BadParameter("--max-attempts must be >= 1, --interval > 0, --backoff and --settle >= 0")
    node = DicomNode(pacs, model, _registry(registry), name=name, modalities=modalities, max_attempts=max_attempts,
                     backoff_seconds=backoff, explain=explain, settle_seconds=0.0 if once else settle)
    node.run_model()  # a model that cannot be loaded stops here, before the first poll
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr="127.0.0.1", registry=node.metrics.registry)
    if once:
        poll = node.poll_once()
        console.print(f"{poll.seen} studies seen, {poll.processed} processed, {poll.failed} failed "
                      f"({poll.parked} parked), {poll.skipped} skipped, {poll.waiting} still arriving"
                      + (f"; {poll.error}" if poll.error else ""))
        raise typer.Exit(1 if poll.error or poll.failed else 0)
    console.print(f"watching {node.base} every {interval:g} s with {model} (Ctrl-C stops)")
    import contextlib
    import signal

    def _stop(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM (Kubernetes, systemd) stop the node even when it was started with SIGINT ignored (a
    # background job or a supervisor that ignores it inherits that to its children)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the loop between studies' records
        node.run(interval)


@pacs_app.command("export")
def pacs_export(
    source: Annotated[str, typer.Argument(help="dicomweb+http://HOST/dicom-web?PatientID=…&Modality=CT&StudyDate=… "
                                               "(QIDO filters).")],
    out: Annotated[Path, typer.Argument(help="Where the de-identified series go, one folder each.")],
    key_file: Annotated[Path, typer.Option(help="Secret key for remapping UIDs (made if absent; keep it in the "
                                                "hospital: later exports with it join up).")],
) -> None:
    """Build a training set from the PACS: fetch the series SOURCE selects, de-identify them (PS3.15 Basic
    Profile) into OUT. Nothing identifying is printed."""
    from lepton.data.deid import load_key
    from lepton.pacs.export import export

    result = export(source, out, key=load_key(key_file))
    console.print(f"{len(result.series)} series, {result.written} files de-identified into {out}; "
                  f"{len(result.refused)} refused")
    for rel, why in result.refused:
        console.print(f"  refused {rel}: {why}")


@dicom_app.command("deidentify")
def dicom_deidentify(
    source: Annotated[Path, typer.Argument(help="A DICOM file or a folder of them (searched recursively).")],
    out: Annotated[Path, typer.Argument(help="Where the de-identified copies go (outside SOURCE).")],
    key_file: Annotated[Path | None, typer.Option(
        help="Secret key for remapping UIDs (made with 0600 permissions if absent). The same key gives the same "
             "new UIDs in every run, so later exports still join up; keep it inside the hospital. Without it UIDs "
             "are consistent within this run only.")] = None,
) -> None:
    """De-identify DICOM with the PS3.15 Basic Application Level Confidentiality Profile: listed attributes
    removed, emptied or replaced, private attributes removed, UIDs remapped consistently; images with burned-in
    annotation refused. Files are written as NEW_SOP_INSTANCE_UID.dcm."""
    from lepton.data.deid import deidentify, load_key

    report = deidentify(source, out, key=load_key(key_file))
    console.print(f"{report.written} written to {out}; {len(report.refused)} refused")
    for rel, reason in report.refused:
        console.print(f"  refused {rel}: {reason}")
    actions = ", ".join(f"{code} {n}" for code, n in sorted(report.actions.items()))
    console.print(f"actions (PS3.15 codes): {actions}")
    if report.written == 0:
        raise typer.Exit(1)


runs_app = typer.Typer(help="Run directories side by side: list, compare, and tracking sent later.",
                       no_args_is_help=True)
app.add_typer(runs_app, name="runs")


@runs_app.command("list")
def runs_list(
    root: Annotated[Path, typer.Argument(help="The folder of run directories.")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Every run under ROOT, newest first: state, task, network, epochs, best epoch, validation and test figures,
    where it was tracked."""
    from rich.table import Table

    from lepton.tracking.compare import list_runs

    rows = list_runs(root)
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("run", "status", "task", "model", "epochs", "best", "validation", "test", "tracking")
    for r in rows:
        test = r["eval"].get("test", {})
        table.add_row(r["name"], r["status"], r["task"], str(r["model"]), str(r["epochs"]), str(r["best_epoch"] or "-"),
                      " ".join(f"{k[4:]} {v:.4f}" for k, v in r["val"].items() if k != "val_loss") or "-",
                      " ".join(f"{k} {v:.4f}" for k, v in test.items() if "." not in k) or "-",
                      ", ".join(r["tracking"]) or "-")
    console.print(table)


@runs_app.command("compare")
def runs_compare(
    runs: Annotated[list[Path], typer.Argument(help="Two run directories or more.")],
    plot: Annotated[Path | None, typer.Option("--plot", help="Write the runs' curves overlaid to this PNG (and the "
                                                             "plotted values beside it as JSON).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (histories included).")] = False,
) -> None:
    """Runs side by side: the configuration that differs, every figure (test figures with their 95 % CIs from
    `lepton evaluate`), and with --plot the curves overlaid, one line per run."""
    from rich.table import Table

    from lepton.tracking.compare import compare_runs, plot_compare

    compared = compare_runs(runs)
    drawn = plot_compare(compared, plot) if plot is not None else None
    if as_json:
        console.print_json(json.dumps({**compared, "plot": drawn}))
        return
    table = Table("setting", *compared["runs"], title="configuration (differences)")
    for key, values in compared["config"].items():
        table.add_row(key, *(str(v) if v is not None else "-" for v in values))
    console.print(table if compared["config"] else "configuration: the same")

    def cell(f) -> str:
        if f is None:
            return "-"
        ci = f" [{f['ci95'][0]:.4f}, {f['ci95'][1]:.4f}]" if f["ci95"] else ""
        return f"{f['value']:.4g}{ci}"

    figures = Table("figure", *compared["runs"], title="figures (95 % CI)")
    for key, values in compared["metrics"].items():
        figures.add_row(key, *map(cell, values))
    console.print(figures)
    if drawn:
        console.print(f"curves: {plot}")


@runs_app.command("sync")
def runs_sync(
    run: Annotated[Path, typer.Argument(help="A run whose MLflow server was away (RUN/tracking/"
                                             "mlflow-offline.jsonl).")],
    uri: Annotated[str | None, typer.Option("--uri", help="Send to this tracking URI instead of the run's.")] = None,
) -> None:
    """Send what a run wrote down while its MLflow tracking server was away; the file is removed once it is there."""
    from lepton.tracking.mlflow_tracker import sync_offline

    done = sync_offline(run, uri)
    console.print(f"{done['figures']} figures sent to MLflow run {done['run_id']} at {done['tracking_uri']}",
                  highlight=False)


def main() -> None:
    """Console-script entry point: LeptonError → message and exit code 2, no traceback."""
    try:
        app()
    except LeptonError as exc:
        if _state["debug"] or "--debug" in sys.argv:
            raise
        err.print(f"[red]error[/]: {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
