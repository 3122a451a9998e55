"""A labelled image source of any kind into an ``ImageSet``: the one entry point the kinds are dispatched from.

The kinds live in their own modules (``folder``, ``manifest``, ``medmnist``, ``partition``); a new kind is one
branch in ``load_dataset``.
"""

from __future__ import annotations

from pathlib import Path

from lepton.data.index.dataset import ImageSet
from lepton.data.readers.covariates import CovariateSchema
from lepton.errors import DataError

__all__ = ["load_dataset"]


def load_dataset(
    source: str | Path,
    *,
    window: str | None = None,
    slices: str = "middle",
    skip_bad: bool = False,
    validate: bool = True,
    steps: list[dict] | None = None,
    covariates: CovariateSchema | None = None,
) -> ImageSet:
    """Load a labelled image source into memory.

    ``source`` is a MedMNIST ``.npz`` file, ``medmnist:<name>`` (from ``~/.medmnist``), a CSV
    manifest (``path,label[,patient_id][,split]``), a site's partition manifest (``site-K.json`` from
    ``lepton data partition``), or a folder with one sub-folder per class
    (optionally under ``train/``, ``val/``, ``test/``) holding PNG, JPEG, BMP, TIFF, DICOM, NIfTI
    or NPY files. Unreadable files fail the load with a list of every one, unless ``skip_bad``. ``steps`` are
    volume preprocessing steps (``lepton.data.transforms.pipeline``) applied to every volume as it is read.
    ``covariates`` declares a CSV manifest's other columns as clinical covariates (``ImageSet.covariates``); other
    sources have none.

    >>> data = load_dataset("chest_xrays/")             # doctest: +SKIP
    >>> data.label_names, len(data)                     # doctest: +SKIP
    (['normal', 'pneumonia'], 5856)
    """
    from lepton.data.index.partition import is_partition, read_partition
    from lepton.data.readers.folder import read_folder
    from lepton.data.readers.manifest import read_manifest
    from lepton.data.readers.medmnist import read_npz, resolve_medmnist

    text = str(source)
    if covariates is not None and Path(text).suffix.lower() not in (".csv", ".tsv"):
        raise DataError(f"{text}: covariates ({', '.join(covariates.names)}) are read from a CSV manifest's columns; "
                        "list the images in a manifest (path,label,…) with those columns")
    if text.startswith("medmnist:"):
        data = _npz_steps(read_npz(resolve_medmnist(text.split(":", 1)[1]), source=text), steps)
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        if path.is_dir():
            data = read_folder(path, window=window, slices=slices, skip_bad=skip_bad, steps=steps)
        elif is_partition(path):  # one site's share of a source (`lepton data partition`)
            data = read_partition(path, lambda src, **load: load_dataset(src, validate=False, steps=steps, **load))
        elif path.suffix.lower() == ".npz":
            data = _npz_steps(read_npz(path), steps)
        elif path.suffix.lower() in (".csv", ".tsv"):
            data = read_manifest(path, window=window, slices=slices, skip_bad=skip_bad, steps=steps,
                                 covariates=covariates)
        else:
            raise DataError(
                f"{path}: a labelled data source must be a .npz file, a .csv manifest or a folder "
                "with one sub-folder per class; to classify single images use `lepton predict`"
            )
    return data.validate() if validate else data


def _npz_steps(data: ImageSet, steps: list[dict] | None) -> ImageSet:
    """Arrays from an ``.npz`` through the volume steps (they have no geometry: 1 mm voxels)."""
    if not steps or data.spatial_dims != 3:
        return data
    import numpy as np

    from lepton.data.transforms.pipeline import apply_steps

    images = [apply_steps(im, None, steps, f"{data.source} ({name})")[0]
              for im, name in zip(data.images, data.names, strict=True)]
    shapes = {im.shape for im in images}
    data.images = np.stack(images) if len(shapes) == 1 else images
    return data
