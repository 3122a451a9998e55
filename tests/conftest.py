"""Shared fixtures: small generated datasets and one tiny trained run reused across tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("OMP_NUM_THREADS", "2")
PYDICOM_FILES = Path(__import__("pydicom").__file__).parent / "data" / "test_files"
NIBABEL_FILES = Path(__import__("nibabel").__file__).parent / "tests" / "data"


def pydicom_file(name: str) -> Path:
    """A DICOM file shipped inside pydicom (never the network-backed get_testdata_file)."""
    path = PYDICOM_FILES / name
    if not path.is_file():
        pytest.skip(f"pydicom does not ship {name}")
    return path


def nibabel_file(name: str) -> Path:
    path = NIBABEL_FILES / name
    if not path.is_file():
        pytest.skip(f"nibabel does not ship {name}")
    return path


def lepton_cmd(*args: str) -> list[str]:
    """Run the CLI through the current interpreter, as a user would run `lepton ...`."""
    return [sys.executable, "-m", "lepton.cli", *args]


@pytest.fixture(scope="session")
def synthetic_npz(tmp_path_factory) -> Path:
    from lepton.data.synthetic import write_synthetic_npz

    return write_synthetic_npz(tmp_path_factory.mktemp("npz") / "synth.npz", n=240, size=32, seed=1)


def write_png_folder(root: Path, n_per_class: int = 12, size: int = 20, seed: int = 0) -> Path:
    """Two classes of PNGs that differ in mean brightness, so a model can learn them."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(("normal", "pneumonia")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 100, (size, size)) + 100 * label
            Image.fromarray(arr.astype(np.uint8)).save(root / name / f"{name}_{i:03d}.png")
    return root


@pytest.fixture
def png_folder(tmp_path) -> Path:
    return write_png_folder(tmp_path / "pngs")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synthetic_npz):
    """A trained lepton_cnn run on the synthetic npz (3 epochs, ~10 s)."""
    from lepton.train import train

    out = tmp_path_factory.mktemp("runs")
    return train(synthetic_npz, preset="default", name="tiny", output_dir=str(out), epochs=3, batch_size=32,
                 lr=2e-3, quiet=True, seed=0)
