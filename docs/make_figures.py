"""Regenerate the README's example figures from synthetic data: ``python docs/make_figures.py``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import lepton
    from lepton.data.tools.synthetic import write_synthetic_npz
    from lepton.explain import overlay_png, saliency_maps

    tmp = Path(tempfile.mkdtemp())
    data = write_synthetic_npz(tmp / "synthetic.npz", n=700, size=48, seed=11)
    run = lepton.train(data, preset="default", name="figures", output_dir=str(tmp), epochs=6, batch_size=32,
                       lr=2e-3, augment="light", quiet=True)
    npz = np.load(data)
    positive = np.flatnonzero(npz["test_labels"].ravel() == 1)[:4]
    images = npz["test_images"][positive][:, None].astype(np.float32) / 255
    maps, _ = saliency_maps(run, list(images), method="gradcam", class_idx=1)
    fig, axes = plt.subplots(3, 4, figsize=(8, 6.2))
    for col, (img, heat, mask) in enumerate(zip(images, maps, npz["test_masks"][positive], strict=True)):
        from io import BytesIO

        from PIL import Image

        axes[0, col].imshow(img[0], cmap="gray")
        axes[1, col].imshow(Image.open(BytesIO(overlay_png(img[0], heat))))
        axes[2, col].imshow(mask, cmap="gray")
        for row in range(3):
            axes[row, col].axis("off")
    for row, title in enumerate(("input", "Grad-CAM overlay", "true lesion mask")):
        axes[row, 0].set_title(title, loc="left", fontsize=9)
    fig.tight_layout()
    fig.savefig(HERE / "gradcam_example.png", dpi=90)
    report = lepton.robustness(run, split="test", max_images=200, output=tmp / "rob")
    shutil.copy(Path(report["output"]) / "robustness.png", HERE / "robustness_example.png")
    print("wrote", HERE / "gradcam_example.png", HERE / "robustness_example.png")


if __name__ == "__main__":
    main()
