"""What is done with a trained run: ``evaluate``, ``predict``, ``explain``, ``robustness``, ``export``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from lepton.cli.common import (
    RegistryOpt,
    TrackOpt,
    _finite,
    _registry,
    _state,
    _track,
    app,
    console,
    err,
)
from lepton.errors import ConfigError, LeptonError


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
    by: Annotated[str | None, typer.Option(help="Subgroup columns, comma-separated: sex, age_band, view, "
                                                "manufacturer, model, site, slice_thickness or a manifest column.")
                  ] = None,
    external: Annotated[bool, typer.Option("--external", help="--data is another site's: compare it with the "
                                                              "training data and report calibration there.")] = False,
    prevalence: Annotated[float | None, typer.Option(help="Prevalence for PPV, NPV and net benefit (default: the "
                                                          "sample's).", click_type=_finite(0, 1, open_low=True))
                          ] = None,
    min_size: Annotated[int, typer.Option(help="Subgroups smaller than this are flagged too small to judge.",
                                          min=1)] = 30,
    stream: Annotated[bool, typer.Option("--stream", help="A held-out set too large for memory (a CSV manifest "
                                                          "path,label or class folders, as --data): streamed "
                                                          "through the batch engine into predictions.parquet in "
                                                          "the report folder (resumable), then scored.")] = False,
    workers: Annotated[int | None, typer.Option(min=0, help="With --stream: worker processes that decode and "
                                                            "answer (default one a core).")] = None,
) -> None:
    """Metrics with 95 % CIs, calibration and plots; writes report.json and report.md (and logs them to the run's
    trackers, or to --track). --by adds metrics per subgroup, --external a comparison with the training data; a
    two-class run also gets its decision curve."""
    if stream:
        from lepton.batch.scoring import evaluate_stream

        if data is None or by or external or skip_bad or prevalence is not None:
            raise ConfigError("--stream scores a whole held-out set given with --data (its unreadable images are "
                              "counted, not fatal); --by, --external and --prevalence are not streamed")
        report = evaluate_stream(run, data, output=output, n_bootstrap=bootstrap, workers=workers)
        if as_json:
            console.print_json(json.dumps(report))
            return
        for line in report["summary"]:
            console.print(f"{report['images']} images streamed, {line}", highlight=False)
        console.print(f"report: {Path(report['output']) / 'report.md'}")
        return
    from lepton.evaluate import evaluate as evaluate_fn

    report = evaluate_fn(run, data, split=split, output=output, n_bootstrap=bootstrap, skip_bad=skip_bad,
                         track=_track(track), by=[c.strip() for c in by.split(",") if c.strip()] if by else None,
                         external=external, prevalence=prevalence, min_size=min_size)
    if as_json:
        console.print_json(json.dumps(report))
        return
    for line in report["summary"]:
        console.print(f"{report['split']} ({report['images']} images), {line}", highlight=False)
    for column, entry in (report.get("subgroups") or {}).get("columns", {}).items():
        for metric, gap in entry["largest_gap"].items():
            if gap:
                console.print(f"by {column}: largest {metric} gap {gap['group']} {gap['gap']:+.3f}"
                              + (" (CI excludes 0)" if gap["clear"] else ""), highlight=False)
    if report.get("external"):
        dc = report["external"]["domain_classifier"]
        console.print(f"external: domain classifier AUC {dc['auc'] if dc.get('auc') is None else round(dc['auc'], 3)}"
                      f", shift {'flagged' if report['external']['shift_flagged'] else 'not flagged'}",
                      highlight=False)
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
    output: Annotated[Path | None, typer.Option(help="A results file ending in .parquet or .csv: batch mode (below). "
                                                     "Otherwise, for segmentation, the folder each label map is "
                                                     "written to (NIfTI for volumes, PNG for images).")] = None,
    dicom_seg: Annotated[bool, typer.Option("--dicom-seg", help="Segmentation of DICOM series folders: also write a "
                                                                 "DICOM SEG referencing the series (needs --output; "
                                                                 "in batch mode beside the label maps).")
                         ] = False,
    engine: Annotated[str, typer.Option(click_type=click.Choice(["local", "ray"]),
                                        help="Batch mode: this machine, or Ray Data (an actor pool of the model).")
                      ] = "local",
    workers: Annotated[int | None, typer.Option(min=0, help="Batch mode: worker processes (local: a classifier on "
                                                            "the CPU is decoded and answered in them, default one a "
                                                            "core; otherwise they decode, default cores - 1; 0 does "
                                                            "it all in the main process) or model actors (ray; "
                                                            "default 2).")] = None,
    address: Annotated[str | None, typer.Option(help="Batch mode, Ray: the cluster (auto, ray://HOST:10001); "
                                                     "default a local Ray.")] = None,
    cpus_per_actor: Annotated[float, typer.Option(min=0.1, help="Batch mode, Ray: CPUs per model actor.")] = 1.0,
    gpus_per_actor: Annotated[float, typer.Option(min=0.0, help="Batch mode, Ray: GPUs per model actor.")] = 0.0,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Batch mode: the forward pass's batch (default the "
                                                               "run's).")] = None,
    precision: Annotated[str, typer.Option(click_type=click.Choice(["fp32", "bf16", "fp16"]),
                                           help="Batch mode: the forward pass's precision (autocast).")] = "fp32",
    masks: Annotated[Path | None, typer.Option(help="Batch mode, segmentation: the label maps' folder (default "
                                                    "OUTPUT_masks/ beside the results).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Batch mode: discard an earlier output and its "
                                                                "unfinished parts instead of resuming.")] = False,
    flush_rows: Annotated[int | None, typer.Option(min=1, help="Batch mode: rows per part written (what a kill can "
                                                               "cost; default 4096, 64 for segmentation).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="Batch mode: no progress bar.")] = False,
    covariates: Annotated[str | None, typer.Option(help="Models that fuse clinical covariates: their values as a JSON "
                                                        "object, for every image (e.g. '{\"age\": 71, \"sex\": "
                                                        "\"M\"}').")] = None,
) -> None:
    """Print one JSON line per image: the model's answer (classifiers: label, probabilities, threshold;
    segmentation: sizes per class and the lesion list).

    Batch mode (--output results.parquet or results.csv), for archives: the sources (folders, CSV manifests with a
    path column, Decathlon folders, .txt lists, DICOMweb URLs) are streamed, decoded in parallel and predicted a
    batch at a time; one row per input (errors as rows) is written as it goes, and the same command after a kill
    resumes where it stopped, each input ending up exactly once. A summary is printed as JSON."""
    from lepton.runs import load_run

    batch = output is not None and output.suffix.lower() in (".parquet", ".csv")
    if not batch and (engine != "local" or workers is not None or address or masks or overwrite or batch_size
                      or precision != "fp32" or flush_rows):
        raise ConfigError("--engine, --workers, --address, --masks, --batch-size, --precision, --flush-rows and "
                          "--overwrite are batch options: give --output RESULTS.parquet (or .csv)")
    if dicom_seg and output is None:
        raise ConfigError("--dicom-seg writes files: give --output DIR")
    if batch and covariates is not None:
        raise ConfigError("--covariates is for predicting files one by one, not batch mode (--output)")
    if Path(model).is_dir():  # a run directory wins over a registry name that happens to match
        loaded, model_id = load_run(model, device=device), str(Path(model))
    else:
        reg = _registry(registry)
        loaded, model_id = reg.load_run(model, device=device), reg.get(model).ref
    if batch:
        from lepton.batch import predict_batch

        summary = predict_batch(loaded, images, output, engine=engine, workers=workers, address=address,
                                cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, batch_size=batch_size,
                                model_id=model_id, precision=precision, masks=masks, overwrite=overwrite,
                                progress=not quiet, flush_rows=flush_rows, dicom_seg=dicom_seg)
        print(json.dumps(summary.to_dict()))
        if summary.errors:
            err.print(f"{summary.errors} input(s) could not be predicted: their rows hold the reason (error column)",
                      highlight=False)
        return
    if dicom_seg and "dicom_seg" not in loaded.task.encodings:
        raise ConfigError(f"--dicom-seg: a {loaded.task.name} model writes no DICOM SEG (segmentation models do)")
    extra: dict[str, Any] = {"output": output, "dicom_seg": dicom_seg}  # files the task writes (Task.encodings)
    if covariates is not None:
        try:
            values = json.loads(covariates)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--covariates is not JSON: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError("--covariates takes a JSON object of values by name")
        extra["covariates"] = [values]
    paths: list[Path] = []
    for item in images:
        if item.startswith("dicomweb+"):
            from lepton.hospital.dicomweb import Source, fetch

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
    from lepton.data.readers.io import sniff_format

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
    """Grad-CAM heatmaps: an overlay PNG and the raw map (NPY) per image; one JSON line each. Detection runs: one
    HiResCAM map per box (an overlay PNG; for volumes also a NIfTI on the volume's grid)."""
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
