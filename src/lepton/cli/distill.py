"""``lepton distill``: a run's ensemble and flip TTA taught to one network, a run like any other."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lepton.cli.common import (
    RegistryOpt,
    _finite,
    _registry,
    app,
    console,
    err,
)


@app.command()
def distill(
    run: Annotated[Path | None, typer.Argument(help="The teacher: a finished run directory (its ensemble members "
                                                    "and flip TTA, as it predicts).")] = None,
    student: Annotated[str | None, typer.Option(help="The student's network (`lepton models available`); default: "
                                                     "the teacher's.")] = None,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the soft targets.",
                                               click_type=_finite(0.5, 50))] = 4.0,
    alpha: Annotated[float, typer.Option(help="Weight of the soft-target (KL) loss; 1 - alpha goes to the labels.",
                                         click_type=_finite(0, 1))] = 0.7,
    unlabelled: Annotated[str | None, typer.Option(help="More images without labels for the soft targets: a folder "
                                                        "of image files, or a MedMNIST-format .npz (its "
                                                        "train_images).")] = None,
    consistent: Annotated[bool, typer.Option("--consistent", help="The teacher answers on every augmented batch as "
                                                                  "the student sees it (costs its forward passes each "
                                                                  "step), instead of its cached outputs on the "
                                                                  "un-augmented images.")] = False,
    epochs: Annotated[int | None, typer.Option(help="Student epochs (default: the teacher's).", min=1,
                                               max=100_000)] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: the teacher's).",
                                             click_type=_finite(0, 10, open_low=True))] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default: the teacher's).", min=1,
                                                   max=65_536)] = None,
    name: Annotated[str | None, typer.Option(help="Student run name (default: TEACHER-distilled).")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Parent folder of the student run (default: the "
                                                        "teacher's).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted distillation (its run "
                                                     "directory).")] = None,
    register: Annotated[str | None, typer.Option(help="Register the student as the next version of this model "
                                                      "(its card names the teacher).")] = None,
    registry: RegistryOpt = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the CIs of the val report.", min=0,
                                           max=100_000)] = 1000,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Distil a run's ensemble and TTA into one network trained on the teacher's soft targets (KL at a temperature,
    mixed with the labels); the student is a run directory, evaluated on val beside its teacher
    (distill_report.md), that export, quantisation, serving and registration take like any run."""
    from lepton.distill import distill as distill_fn
    from lepton.train import summary

    if run is None and resume is None:
        raise typer.BadParameter("give the teacher RUN, or --resume STUDENT_RUN")
    teacher_version = None
    reg = _registry(registry) if register else None
    if reg is not None and run is not None:  # the teacher's own registered version, when it has one
        source = str(run.resolve())
        teacher_version = next((v.ref for v in reversed(reg.list()) if v.source_run == source), None)
    student_run = distill_fn(run, student=student, temperature=temperature, alpha=alpha, unlabelled=unlabelled,
                             consistent=consistent, epochs=epochs, lr=lr, batch_size=batch_size, name=name,
                             output_dir=output_dir, resume=resume, teacher_version=teacher_version,
                             n_bootstrap=bootstrap, quiet=quiet)
    err.print((student_run.path / "distill_report.md").read_text(), highlight=False)
    if reg is not None:
        v = reg.register_run(student_run.path, register)
        err.print(f"registered [bold]{v.ref}[/]; card: lepton models card {v.ref}")
    console.print_json(json.dumps(summary(student_run)))
