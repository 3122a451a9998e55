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
    from lepton.demo import run_demo, run_segmentation_demo, run_volume_demo

    if task == "pathology":
        from lepton.pathology.demo import run_pathology_demo

        result = run_pathology_demo(output_dir, quick=quick, seed=seed)
        console.print_json(json.dumps(result))
        low, high = result["auc_ci95"]
        console.print(f"[bold green]Pathology demo done[/] in {result['wall_seconds']:.0f} s: slide AUC "
                      f"{result['test_auc']:.3f} (95% CI {low:.3f}-{high:.3f}) on {result['split']['test']} test "
                      f"slides; heatmaps, GeoJSON and reports in {result['model']}/predictions")
        return
    if task == "sequence":
        from lepton.demo import run_sequence_demo

        result = run_sequence_demo(output_dir, quick=quick, seed=seed)
        console.print_json(json.dumps(result))
        example = result["example"]
        console.print(f"[bold green]Sequence demo done[/] in {result['wall_seconds']:.0f} s: test MAE "
                      f"{result['test_mae']:.2f} (predicting the mean: {result['baseline_mae']:.2f}), R² "
                      f"{result['test_r2']:.3f} on {result['test_clips']} clips; served == offline: {example['agree']}")
        return
    if task == "segmentation":
        result = run_segmentation_demo(output_dir, quick=quick, seed=seed)
        console.print_json(json.dumps(result))
        console.print(f"[bold green]Segmentation demo done[/] in {result['wall_seconds']:.0f} s: test Dice "
                      f"{result['test_dice']:.3f} on {result['test_cases']} cases; DICOM SEG: "
                      f"{result['new_case']['prediction']['dicom_seg']}")
        return
    if task == "detection":
        from lepton.demo import run_detection_demo

        result = run_detection_demo(output_dir, quick=quick, seed=seed)
        console.print_json(json.dumps(result))
        console.print(f"[bold green]Detection demo done[/] in {result['wall_seconds']:.0f} s: test mAP "
                      f"{result['images']['map']:.3f} (images), {result['volumes']['map']:.3f} (volumes); CPM "
                      f"{result['images']['cpm']:.3f}, {result['volumes']['cpm']:.3f}")
        return
    if task != "classification":
        raise ConfigError(f"demo --task is classification, segmentation, detection, pathology or sequence "
                          f"(got {task!r})")
    result = (run_volume_demo if volumes else run_demo)(output_dir, quick=quick, seed=seed)
    console.print_json(json.dumps(result))
    console.print(
        f"[bold green]Demo done[/] in {result['wall_seconds']:.0f} s: test ACC {result['test_acc']:.3f}, "
        f"AUC {result['test_auc']:.3f} on {result['test_images']} images.\n"
        f"  run directory: {result['run']}\n  report: {result['report']}\n"
        f"  next: lepton predict {result['run']} {'SERIES_FOLDER' if volumes else 'IMAGE.png'}")
