"""``lepton train``: a run from a data source (torchrun for several processes). Its options are derived from the
``TrainConfig`` fields' declarations (help, group, bounds, choices, flags): a new field is an option without an edit
here."""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from lepton.cli.common import (
    RegistryOpt,
    TrackOpt,
    _finite,
    _parse_steps,
    _registry,
    _track,
    app,
    console,
    err,
)
from lepton.config import FIELDS, GROUPS, PRESETS


def _registry_ref(value: str) -> bool:
    """Whether ``--pretrained`` names a registry version (``NAME``, ``NAME@3``, ``NAME@production``) rather than a
    weight file: no such file, no folder in it, no weight-file suffix."""
    path = Path(value).expanduser()
    return not path.exists() and "/" not in value and "\\" not in value and \
        path.suffix.lower() not in (".pt", ".pth", ".bin", ".safetensors")


def _task_options(values: list[str] | None, covariates: str | None) -> dict[str, object]:
    """``--task-option KEY=VALUE`` (numbers read as numbers) and ``--covariates`` as the run's task options."""
    out: dict[str, object] = {}
    for item in values or []:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--task-option expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = int(val) if val.strip().lstrip("-").isdigit() else float(val)
        except ValueError:
            out[key.strip()] = val.strip()
    if covariates:
        out["covariates"] = covariates
    return out


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


#: Options of `lepton train` that fill a config field from a syntax of their own (option → field).
OWN_SYNTAX = {"data": "data", "preset": "preset", "aug": "augment_options", "preprocess": "preprocess",
              "task_option": "task_options", "covariates": "task_options"}
#: Options of `lepton train` that are no config field: how to run, not what to train.
NOT_CONFIG = ("resume", "config", "registry", "nproc", "max_restarts", "quiet", "track")


def _own_options(
    data: Annotated[str | None, typer.Argument(help=FIELDS["data"].metadata["help"])] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run directory.")] = None,
    config: Annotated[Path | None, typer.Option(help="A config.yaml to start from (flat, or grouped by "
                                                     "concern).")] = None,
    preset: Annotated[str, typer.Option(help="Named recipe: auto (follows the task and data: segmentation, "
                                             "detection, medmnist3d or medmnist for .npz data, else default), "
                                             f"{', '.join(PRESETS)}.")] = "auto",
    registry: RegistryOpt = None,
    aug: Annotated[list[str] | None, typer.Option(help="Override one augmentation option, KEY=VALUE.",
                                                  rich_help_panel=GROUPS["augmentation"])] = None,
    preprocess: Annotated[list[str] | None, typer.Option(
        help="A volume preprocessing step, in order (repeat): spacing=X,Y,Z (mm), crop_foreground[=MARGIN], "
             "pad=D,H,W, crop_or_pad=D,H,W, resize=D,H,W. Saved with the run; predict and serve apply it.",
        rich_help_panel=GROUPS["data"])] = None,
    task_option: Annotated[list[str] | None, typer.Option(
        help="A task option, KEY=VALUE (the sequence task: fps, frames, size, target=class|value, encoder; with "
             "covariates, both tasks: fusion=late|film, covariate_missing=error|impute).",
        rich_help_panel=GROUPS["task"])] = None,
    covariates: Annotated[str | None, typer.Option(
        help="Manifest columns fused with the image: NAME:numeric[:UNIT] or NAME:categorical, comma-separated "
             "(e.g. age:numeric:years,sex:categorical; classification and sequence tasks).",
        rich_help_panel=GROUPS["task"])] = None,
    nproc: Annotated[int, typer.Option(
        help="Train data-parallel in N local processes under torchrun (gloo on CPU, NCCL on CUDA); "
             "--batch-size is per process.", min=1, max=4096, rich_help_panel=GROUPS["hardware"])] = 1,
    max_restarts: Annotated[int, typer.Option(
        help="With --nproc: torchrun restarts a failed job up to N times; it resumes from last.pt.", min=0,
        max=1000, rich_help_panel=GROUPS["hardware"])] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    track: TrackOpt = None,
) -> None:
    """The options that are not plain config fields (their signature is read, never called)."""


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _kind(f: dataclasses.Field) -> type:
    """A field's value type from its declared annotation (``float | None`` → float)."""
    return _TYPES[str(f.type).split("|")[0].strip()]


def config_option(name: str, help: str | None = None, *, panel: str | None = None) -> Any:
    """A typer option for config field ``name`` (this command's, or another's that sets the same field, such as the
    federation's): its flags, its help (or ``help``), its bounds refused while parsing, its choices."""
    meta = FIELDS[name].metadata
    kind = _kind(FIELDS[name])
    extra: dict[str, Any] = {}
    bounds = meta["bounds"]
    if bounds is not None and kind is float:
        extra["click_type"] = _finite(bounds.low, bounds.high, bounds.open_low, bounds.open_high)
    elif bounds is not None:
        extra.update(min=bounds.low, max=bounds.high)
    elif meta["choices"] is not None and kind is str:
        extra["click_type"] = click.Choice(meta["choices"])
    return typer.Option(*([meta["cli"]] if isinstance(meta["cli"], str) else []), help=help or meta["help"],
                        rich_help_panel=panel, **extra)


def field_option(f: dataclasses.Field) -> inspect.Parameter:
    """A config field as a `lepton train` option: its help, group (the --help panel), bounds (refused while
    parsing) and choices, and its flags (``--tta/--no-tta``; default ``--field-name``); None keeps the preset's."""
    option = config_option(f.name, panel=GROUPS[f.metadata["group"]])
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[_kind(f) | None, option])


def _signature() -> inspect.Signature:
    """`lepton train`'s options: the data argument, how to run, then every config field a user sets from the
    command line, derived from its declaration in ``TrainConfig``, then the options of a syntax of their own."""
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
           for p in inspect.signature(_own_options, eval_str=True).parameters.values()]
    head = [p for p in own if p.name in ("data", "resume", "config", "preset")]
    order = list(GROUPS)
    fields = [field_option(f) for f in sorted(FIELDS.values(), key=lambda f: order.index(f.metadata["group"]))
              if f.metadata["cli"] is not False]
    return inspect.Signature([*head, *fields, *(p for p in own if p not in head)], return_annotation=None)


def train(**options: Any) -> None:
    """Train a model for the task the data's layout picks (classification, segmentation, detection, sequence;
    --task to say it); writes a run directory with checkpoints, history and curves."""
    import os

    from lepton.config import TrainConfig, make_config
    from lepton.errors import ModelError
    from lepton.train import run_name, summary
    from lepton.train import train as train_fn

    data, resume, config, preset = (options.pop(k) for k in ("data", "resume", "config", "preset"))
    registry, nproc, max_restarts, quiet, track = (options.pop(k) for k in NOT_CONFIG[2:])
    aug, preprocess, task_option, covariates = (options.pop(k) for k in ("aug", "preprocess", "task_option",
                                                                          "covariates"))
    overrides: dict[str, Any] = {k: options.pop(k) for k in list(options) if k in FIELDS}
    if options:  # a declared option that reaches neither a field nor the command: a bug here, not the user's
        raise RuntimeError(f"lepton train: options {sorted(options)} are handled nowhere")
    name, task, pretrained = overrides["name"], overrides["task"], overrides["pretrained"]
    launching = nproc != 1 and "LOCAL_RANK" not in os.environ
    ref = None
    if pretrained and _registry_ref(pretrained):  # a registered backbone's name, resolved to its verified file
        ref, pretrained = pretrained, str(_registry(registry).backbone_file(pretrained))
        overrides["pretrained"] = pretrained
    _track(track)
    if not launching and max_restarts:
        raise typer.BadParameter("--max-restarts needs --nproc N (or torchrun's own --max-restarts)")
    if resume is not None:
        if launching:
            raise typer.Exit(_launch(nproc, max_restarts, None))
        run = train_fn(resume=resume, quiet=quiet, track=_track(track))
    else:
        overrides.update(augment_options=_parse_aug(aug) or None, preprocess=_parse_steps(preprocess),
                         task_options=_task_options(task_option, covariates) or None)
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
        try:
            run = train_fn(config=cfg, quiet=quiet, track=track)
        except ModelError as exc:
            if ref is None:
                raise
            raise ModelError(str(exc).replace(pretrained, f"the registered backbone {ref}")) from None
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


train.__signature__ = _signature()  # typer reads the options from it
app.command()(train)
