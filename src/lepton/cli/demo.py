"""``lepton demo``: the end-to-end demos on generated data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lepton.cli.common import (
    app,
    console,
)
from lepton.errors import ConfigError


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option(help="Where the data and run go.")] = Path("runs"),
    quick: Annotated[bool, typer.Option("--quick", help="A smaller, faster demo.")] = False,
    volumes: Annotated[bool, typer.Option("--volumes", help="CT volumes as DICOM series and NIfTI files, a 3-D "
                                                            "network.")] = False,
    task: Annotated[str, typer.Option(help="classification, segmentation (CT nodules: a 3-D U-Net, a DICOM SEG "
                                           "written and read back) or detection (boxes on radiograph-like images "
                                           "and CT-like volumes: RetinaNet), sequence (cine loops as multi-frame "
                                           "DICOM with age and sex: an EF-like score) or pathology (generated "
                                           "slide pyramids: attention MIL, heatmaps).")] = "classification",
    seed: Annotated[int, typer.Option(help="Random seed.", min=0, max=2**32 - 1)] = 0,
) -> None:
    """Synthetic chest X-rays (or CT volumes) → train → evaluate → predict, end to end on CPU."""
    from lepton.demo import DEMOS

    if task not in DEMOS:
        raise ConfigError(f"demo --task is one of {', '.join(DEMOS)} (got {task!r})")
    chosen = DEMOS[task]
    chosen = chosen.volumes if volumes and chosen.volumes is not None else chosen
    result = chosen.run(output_dir, quick=quick, seed=seed)
    console.print_json(json.dumps(result))
    console.print(chosen.done(result))
