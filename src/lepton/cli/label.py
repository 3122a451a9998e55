"""``lepton label``: active learning — cases to label next with pre-annotations, and corrected labels brought back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lepton.cli.common import app, console

label_app = typer.Typer(help="Active learning: suggest the cases to label next (with pre-annotations), import the "
                             "corrected labels round by round.", no_args_is_help=True)
app.add_typer(label_app, name="label")

LabelsOpt = Annotated[Path | None, typer.Option("--labels", help="The labelling folder (labels.csv, rounds.json): "
                                                                  "what has been labelled, by round.")]


@label_app.command("suggest")
def label_suggest(
    run: Annotated[Path, typer.Argument(help="A trained run directory, or a slide model folder (lepton slides "
                                             "train): then SOURCE holds whole slides.")],
    source: Annotated[str, typer.Argument(help="Unlabelled cases: a folder, a CSV with a path column, or a .npz.")],
    n: Annotated[int, typer.Option("--n", help="How many cases to suggest.", min=1, max=1_000_000)] = 50,
    strategy: Annotated[str, typer.Option(help="entropy (uncertain answers), tta (disagreement under test-time "
                                               "augmentation), coreset (farthest from the labelled cases in feature "
                                               "space; classifiers) or random.")] = "entropy",
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for suggestions.csv and "
                                                                "preannotations/.")] = Path("suggestions"),
    labels: LabelsOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of random and tta.")] = 0,
    mpp: Annotated[float | None, typer.Option(help="Slides: level-0 µm/px for slides that do not state it "
                                                   "(default: the model's).", min=0.01)] = None,
) -> None:
    """Rank unlabelled cases (never one labelled in the run's data or the labelling folder) and write the first N with
    pre-annotations: the predicted class in suggestions.csv's label column, or a label map per case (NIfTI, PNG
    for 2-D, DICOM SEG for DICOM series) named in its mask column, or for a detection run its boxes as
    preannotations.csv and preannotations.coco.json; for a slide model the regions it attended to per slide as QuPath
    GeoJSON (entropy or random). Correct them, then `lepton label import`."""
    from lepton.label.slides import is_slide_model

    if is_slide_model(run):
        from lepton.errors import ConfigError
        from lepton.label.slides import suggest_slides

        if labels is not None:
            raise ConfigError("--labels records image cases; a slide model's labelled slides are its manifest's "
                              "(splits.csv), which suggest already leaves out: drop --labels")
        rows = suggest_slides(run, source, n=n, strategy=strategy, output=output, seed=seed, mpp=mpp)
        console.print_json(json.dumps({"suggested": len(rows), "csv": str(output / "suggestions.csv"),
                                       "first": rows[:5]}))
        return
    from lepton.label.suggest import suggest

    rows = suggest(run, source, n=n, strategy=strategy, output=output, labels=labels, seed=seed)
    console.print_json(json.dumps({"suggested": len(rows), "csv": str(output / "suggestions.csv"),
                                   "first": rows[:5]}))


@label_app.command("import")
def label_import(
    run: Annotated[Path, typer.Argument(help="The run the labels are for.")],
    file: Annotated[Path, typer.Argument(help="The corrected suggestions.csv (path and label, or path and mask), or "
                                              "a corrected COCO JSON file (segmentation); for a detection run the "
                                              "corrected box CSV or COCO JSON.")],
    labels: Annotated[Path, typer.Option("--labels", help="The labelling folder to record the round in.")]
    = Path("labelling"),
    round_no: Annotated[int | None, typer.Option("--round", help="Round number (default: the next).", min=1)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace labels given before.")] = False,
    column: Annotated[str | None, typer.Option(help="The CSV column holding the corrected labels (default: label, or "
                                                    "mask for segmentation; geojson for QuPath's shapes).")] = None,
) -> None:
    """Check corrected labels (label names, mask geometry and values, earlier labels) and record them as a round;
    every refused row is named with its fix and nothing is recorded then."""
    from lepton.label.importer import import_labels

    console.print_json(json.dumps(import_labels(run, file, labels, round_no=round_no, overwrite=overwrite,
                                                column=column)))


@label_app.command("report")
def label_report(
    labels: Annotated[Path, typer.Argument(help="The labelling folder (rounds.json) the rounds were imported into.")],
    runs: Annotated[list[Path], typer.Argument(help="The runs trained after each round, in round order: the starting "
                                                    "run (round 0) first.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for report.md, report.json and "
                                                                "rounds.png.")] = Path("label-report"),
    match: Annotated[bool, typer.Option("--match/--no-match", help="Pair runs with rounds by each round's cases found "
                                                                   "in the run's data (reads each run's source), "
                                                                   "or by position.")] = True,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Evaluate on val (with CIs; writes RUN/eval/val) the "
                                                              "runs that have no val report yet.")] = False,
) -> None:
    """What each round cost (labels added) and gained (the run's validation headline figure with its 95 % CI): a
    table, a JSON report and a plot against the labels in total. Runs without an evaluation on val show run.json's
    figure without a CI unless --evaluate."""
    from lepton.label.report import round_report

    report = round_report(labels, runs, output, match=match, evaluate_missing=evaluate)
    console.print((output / "report.md").read_text(), markup=False)
    console.print(f"report: {output / 'report.json'}, plot: {report['plot']}")
