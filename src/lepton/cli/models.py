"""``lepton models``: networks, and the registry's versions, stages, cards and bundles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lepton.cli.common import (
    RegistryOpt,
    _finite,
    _print_version,
    _registry,
    app,
    console,
)

models_app = typer.Typer(help="Network architectures.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("available")
def models_available() -> None:
    """List the networks create_model knows."""
    from rich.table import Table

    from lepton.models import list_models
    from lepton.tasks import get_task, list_tasks

    trains: dict[tuple[str, str], list[str]] = {}  # the tasks that train each kind of network
    for name in list_tasks():
        trains.setdefault(get_task(name).network_kind, []).append(name)
    table = Table("name", "task", "dims", "description", "pretrained weights")
    for info in list_models():
        table.add_row(info.name, ", ".join(trains.get(info.kind, ["-"])),
                      "/".join(f"{d}-D" for d in info.spatial_dims), info.description,
                      info.pretrained_layout or "-")
    console.print(table)



@models_app.command("register")
def models_register(
    run: Annotated[str, typer.Argument(help="A finished run directory, a slide model folder (`lepton slides "
                                            "train`), a pretraining folder (`lepton pretrain`: a backbone for "
                                            "`train --pretrained NAME@STAGE`), or the MLflow run it was tracked "
                                            "to: runs:/RUN_ID (tracking URI from $MLFLOW_TRACKING_URI).")],
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
    elif (Path(run) / "slide_model.json").is_file():  # a `lepton slides train` folder: served as slide jobs
        v = reg.register_slide_model(Path(run), name, description=description)
    elif (Path(run) / "backbone.pt").is_file() or Path(run).name == "backbone.pt":  # `lepton pretrain`'s output
        v = reg.register_backbone(Path(run), name, description=description)
    else:
        v = reg.register_run(Path(run), name, description=description, onnx=onnx)
    if tenant is not None:
        reg.set_tenant(name, tenant)
    console.print(f"registered [bold]{v.ref}[/] ({v.format}); card: lepton models card {v.ref}")
    if precision:
        _check_precisions(reg, v.ref, precision)


def _check_precisions(reg, ref: str, precisions: list[str]) -> None:
    from lepton.precision import PrecisionError, check_precision, describe, refusal

    refused = []
    for p in precisions:
        record = check_precision(reg, ref, p)
        name, value, fp32, _ = describe(record)
        line = f"{ref} {p}: {name} {value:.4f} (fp32 {fp32:.4f}, delta {value - fp32:+.4f})"
        if record["threshold"] is not None:
            line += f", threshold {record['threshold']}"
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
    """Check serving precisions of a version on its stored val set (classifiers: AUC at most 0.005 below fp32;
    segmentation: mean Dice at most 0.01 below) and record each; exits non-zero naming both values when one is
    refused."""
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
    """List registered versions with stage and headline metrics (a slide model's are its test slides', marked)."""
    from rich.table import Table

    def figure(v, key: str) -> str:
        value, split = v.metrics.get(f"val_{key}"), ""
        if value is None and v.metrics.get(f"test_{key}") is not None:  # slide models: test slides only
            value, split = v.metrics[f"test_{key}"], " (test)"
        return f"{value:.4f}{split}" if value is not None else "-"

    table = Table("model", "version", "stage", "format", "val AUC", "val ACC", "created", "parent")
    for v in _registry(registry).list(name):
        table.add_row(v.name, str(v.version), v.stage, v.format, figure(v, "auc"), figure(v, "acc"),
                      v.created_at[:19], str(v.parent_version or "-"))
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


