"""Clinical validation verbs: ``calibrate`` (a local site's recalibration as a new run, registered), ``validate
report`` (the TRIPOD+AI / CLAIM report, attached to a version), and ``models settings`` / ``models report``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import click
import typer

from lepton.cli.common import RegistryOpt, _finite, _registry, app, console
from lepton.cli.models import models_app

validate_app = typer.Typer(help="Clinical validation: the validation report.", no_args_is_help=True)
app.add_typer(validate_app, name="validate")


def _columns(by: str | None) -> list[str] | None:
    return [c.strip() for c in by.split(",") if c.strip()] if by else None


@app.command()
def calibrate(
    run: Annotated[Path, typer.Argument(help="Run directory (a two-class classifier).")],
    data: Annotated[str, typer.Option(help="The local site's labelled data.")],
    method: Annotated[str, typer.Option(click_type=click.Choice(["platt", "isotonic"]),
                                        help="Platt scaling or isotonic regression.")] = "platt",
    split: Annotated[str, typer.Option(help="The split of --data to fit on, when it defines splits.")] = "val",
    output: Annotated[Path | None, typer.Option(help="The calibrated run's folder (default RUN-calibrated-METHOD).")
                      ] = None,
    register: Annotated[str | None, typer.Option(help="Register the calibrated run as the next version of NAME.")
                        ] = None,
    registry: RegistryOpt = None,
) -> None:
    """Fit a local recalibration of P(positive) and write it as a new run whose predictions, evaluations and served
    probabilities are the recalibrated ones (--register NAME: as the next version of NAME; its card says so)."""
    from lepton.validation.calibrate import calibrate as calibrate_fn

    result = calibrate_fn(run, data, method=method, split=split, output=output,
                          registry=_registry(registry) if register else None, name=register)
    before, after = result["before"], result["after"]
    console.print(f"{method} on {result['images']} images ({result['events']} positive, split {result['split']}): "
                  f"calibration slope {_n(before['slope'])} → {_n(after['slope'])}, in-the-large "
                  f"{_n(before['citl'])} → {_n(after['citl'])} (on the fitting data)", highlight=False)
    console.print(f"calibrated run: {result['output']}" + (f"; registered {result['version']}"
                                                              if result.get("version") else ""))


@validate_app.command("report")
def validate_report(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    data: Annotated[str | None, typer.Option(help="Data to evaluate (default: the run's own).")] = None,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    by: Annotated[str | None, typer.Option(help="Subgroup columns, comma-separated (sex, age_band, view, …).")
                  ] = None,
    external: Annotated[str | None, typer.Option(help="Another site's labelled data (external validation).")
                        ] = None,
    prevalence: Annotated[float | None, typer.Option(help="Prevalence for PPV, NPV and net benefit.",
                                                     click_type=_finite(0, 1, open_low=True))] = None,
    output: Annotated[Path | None, typer.Option(help="Report folder (default RUN/validation).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the CIs.", min=0, max=100_000)] = 1000,
    failures: Annotated[int, typer.Option(help="Failure cases shown with Grad-CAM.", min=0, max=50)] = 4,
    register: Annotated[str | None, typer.Option(help="Attach the report to this version (NAME@VERSION).")] = None,
    registry: RegistryOpt = None,
) -> None:
    """A validation report laid out by TRIPOD+AI and CLAIM: data sources, splits and leakage checks, performance,
    subgroups, calibration, decision curve, external validation, failure cases; Markdown and HTML."""
    from lepton.validation.report import validation_report

    result = validation_report(run, data, split=split, by=_columns(by), external=external, prevalence=prevalence,
                               output=output, n_bootstrap=bootstrap, failures=failures,
                               registry=_registry(registry) if register else None, ref=register)
    for key, value in result["summary"]["highlights"].items():
        console.print(f"{key}: {value}", highlight=False)
    console.print(f"report: {result['markdown']} and {result['html']}"
                  + (f"; attached to {result['version']}" if result.get("version") else ""))


@models_app.command("settings")
def models_settings(
    key: Annotated[str | None, typer.Argument(help="A setting to change: require_validation_report.")] = None,
    value: Annotated[str | None, typer.Argument(help="Its new value (true or false).")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Show the registry's settings, or set one (require_validation_report true: promotion to production needs an
    attached validation report)."""
    reg = _registry(registry)
    if key is not None and value is None:
        raise typer.BadParameter("give the setting's new value too (true or false)")
    settings = reg.set_setting(key, value) if key is not None else reg.settings()
    console.print_json(json.dumps(settings))


@models_app.command("report")
def models_report(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    html: Annotated[bool, typer.Option("--html", help="The HTML version.")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Print a version's attached validation report (Markdown, or HTML)."""
    typer.echo(_registry(registry).report(ref, "html" if html else "md"), nl=False)


def _n(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
