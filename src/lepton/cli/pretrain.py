"""``lepton pretrain``: a backbone pretrained on unlabelled images (self-supervised) for ``train --pretrained``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lepton.cli.common import app, console


@app.command()
def pretrain(
    source: Annotated[str, typer.Argument(help="Unlabelled images: a folder (any layout), a CSV with a path column "
                                               "(patient_id optional) or a .npz (images, else train_images).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder of the pretraining run: backbone.pt, "
                                                                "last.pt (resumable), history.csv.")]
    = Path("pretrain"),
    model: Annotated[str, typer.Option(help="Network whose backbone is pretrained (`lepton models available`).")]
    = "lepton_cnn",
    method: Annotated[str, typer.Option(help="contrastive (SimCLR: two augmented views, NT-Xent) or masked "
                                             "(reconstruct 60 % blanked patches).")] = "contrastive",
    epochs: Annotated[int, typer.Option(help="Passes over the source.", min=1, max=100_000)] = 10,
    batch_size: Annotated[int, typer.Option(help="Images per step (contrastive negatives come from the batch).",
                                            min=4, max=65_536)] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).", min=1e-7, max=10)]
    = 1e-3,
    image_size: Annotated[int | None, typer.Option(help="Square input size (default: the first image's, at most "
                                                        "224; volumes at most 128 per axis).", min=8, max=1024)]
    = None,
    channels: Annotated[int, typer.Option(help="Input channels, 1 or 3 (must match the training run's).")] = 1,
    slices: Annotated[str, typer.Option(help="Volumes: middle (2-D slices) or volume (3-D networks).")] = "middle",
    window: Annotated[str | None, typer.Option(help="CT window for DICOM/NIfTI (lung, bone, … or C,W).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: PyTorch's).", min=1, max=4096)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Self-supervised pretraining on unlabelled images. Killed, the same command resumes from OUTPUT/last.pt; the
    result OUTPUT/backbone.pt starts `lepton train --model MODEL --pretrained OUTPUT/backbone.pt`."""
    from lepton.pretrain import backbone_info
    from lepton.pretrain import pretrain as pretrain_fn

    path = pretrain_fn(source, output, model=model, method=method, epochs=epochs, batch_size=batch_size, lr=lr,
                       image_size=image_size, channels=channels, slices=slices, window=window, seed=seed,
                       device=device, threads=threads, quiet=quiet)
    console.print_json(json.dumps({"backbone": str(path), **backbone_info(path)}))
