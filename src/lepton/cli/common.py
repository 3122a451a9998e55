"""What every verb module of the command line shares: the root Typer app, its consoles, common options."""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import Annotated

import click
import typer
from rich.console import Console


def _finite(low: float, high: float, open_low: bool = False, open_high: bool = False) -> click.FloatRange:
    """A float option's bounds for typer's ``click_type`` (stated in --help). NaN and infinities are refused: click's
    FloatRange alone lets NaN through every bound."""

    class Finite(click.FloatRange):
        def convert(self, value, param, ctx):
            number = super().convert(value, param, ctx)
            if not math.isfinite(number):
                self.fail(f"{value!r} is not a finite number", param, ctx)
            return number

    return Finite(low, high, min_open=open_low, max_open=open_high)

app = typer.Typer(help="Lepton: medical images to trained, evaluated, explained and served models. Tasks: "
                       "classification (2-D images, 2.5-D and 3-D volumes), segmentation (2-D and 3-D label maps), "
                       "detection (boxes) and sequence (cine loops, signals; with clinical covariates); the data's "
                       "layout picks the task. Whole slides: lepton slides.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

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



CacheDirOpt = Annotated[str | None, typer.Option("--cache-dir", help="The cache's folder (default $LEPTON_CACHE, "
                                                                     "else ~/.cache/lepton).")]


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


def _parse_steps(items: list[str] | None) -> list[dict] | None:
    if not items:
        return None
    from lepton.data.transforms.pipeline import parse_step

    return [parse_step(text) for text in items]
