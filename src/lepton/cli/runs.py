"""``lepton runs``: run directories side by side, and tracking sent later."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lepton.cli.common import (
    app,
    console,
)

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


