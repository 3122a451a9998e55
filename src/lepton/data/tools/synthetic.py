"""A synthetic chest-X-ray-like dataset with known lesion locations, for the demo and tests.

Each image is a frontal projection: a bright body outline, two dark lung fields of varying size
and position, a bright mediastinum/heart shadow, faint rib arcs, and film noise and blur. Class 1
("opacity") adds one or two soft, irregular bright consolidations inside a lung field, like a
pneumonia opacity; its mask is returned so explanations can be scored against the true location.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LABEL_NAMES = ["normal", "opacity"]


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(img, sigma, mode="reflect")


def synth_chest_xray(rng: np.random.Generator, size: int, opacity: bool) -> tuple[np.ndarray, np.ndarray]:
    """One image (size, size) float32 in [0, 1] and its lesion mask (bool)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx = 0.5 + rng.normal(0, 0.02)
    body = (((xx - cx) / (0.46 + rng.normal(0, 0.02))) ** 2 + ((yy - 0.55) / 0.55) ** 2) < 1
    img = 0.15 + 0.45 * body
    lungs = np.zeros_like(img, dtype=bool)
    lung_fields = []
    for side in (-1, 1):
        lx = cx + side * (0.19 + rng.normal(0, 0.015))
        ly = 0.47 + rng.normal(0, 0.02)
        rx, ry = 0.13 + rng.normal(0, 0.012), 0.27 + rng.normal(0, 0.02)
        field = ((xx - lx) / rx) ** 2 + ((yy - ly) / ry) ** 2 < 1
        lungs |= field
        lung_fields.append((lx, ly, rx, ry))
    img = np.where(lungs, 0.12 + rng.normal(0, 0.02), img)
    heart = ((xx - cx - 0.04) / (0.12 + rng.normal(0, 0.01))) ** 2 + ((yy - 0.68) / 0.14) ** 2 < 1
    img = np.where(heart, 0.55, img)
    for k in range(6):  # rib arcs
        y0 = 0.25 + 0.09 * k + rng.normal(0, 0.005)
        arc = np.abs(yy - (y0 + 0.35 * (xx - cx) ** 2)) < 0.012
        img = img + 0.08 * (arc & body)
    mask = np.zeros((size, size), dtype=bool)
    if opacity:
        for _ in range(rng.integers(1, 3)):
            lx, ly, rx, ry = lung_fields[rng.integers(0, 2)]
            ox = lx + rng.uniform(-0.5, 0.5) * rx
            oy = ly + rng.uniform(-0.5, 0.6) * ry
            sr = rng.uniform(0.05, 0.10)
            blob = np.exp(-(((xx - ox) ** 2 + ((yy - oy) / 1.3) ** 2) / (2 * sr**2)))
            blob *= 1 + 0.35 * rng.standard_normal(blob.shape).astype(np.float32)
            blob = _blur(blob.astype(np.float32), 1.2) * lungs
            img = img + rng.uniform(0.22, 0.40) * blob
            mask |= blob > 0.35
    img = _blur(img.astype(np.float32), rng.uniform(0.6, 1.2))
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 0.04)  # exposure
    img = img + rng.normal(0, 0.03, img.shape)  # quantum noise
    return np.clip(img, 0, 1).astype(np.float32), mask


def make_synthetic(
    n: int = 600, size: int = 64, positive_fraction: float = 0.4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate ``n`` images (uint8, N×size×size), labels (N,) and lesion masks (N×size×size)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < positive_fraction).astype(np.int64)
    images = np.empty((n, size, size), np.uint8)
    masks = np.zeros((n, size, size), bool)
    for i, label in enumerate(labels):
        img, mask = synth_chest_xray(rng, size, bool(label))
        images[i] = np.round(img * 255).astype(np.uint8)
        masks[i] = mask
    return images, labels, masks


def write_synthetic_npz(
    path: str | Path, n: int = 1000, size: int = 64, seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> Path:
    """Write a MedMNIST-format ``.npz`` with train/val/test splits, label names and lesion masks."""
    from lepton.utils import atomic_write_bytes

    images, labels, masks = make_synthetic(n, size, seed=seed)
    n_train = int(fractions[0] * n)
    n_val = int(fractions[1] * n)
    cuts = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val),
            "test": slice(n_train + n_val, n)}
    arrays = {"label_names": np.array(LABEL_NAMES)}
    for split, sl in cuts.items():
        arrays[f"{split}_images"] = images[sl]
        arrays[f"{split}_labels"] = labels[sl, None]
        arrays[f"{split}_masks"] = masks[sl]
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_png_classes(root: str | Path, n: int = 100, size: int = 64, seed: int = 0, start: int = 0) -> Path:
    """Write ``n`` synthetic chest radiographs (``make_synthetic``) as 8-bit PNGs in a class folder
    (``root/normal``, ``root/pneumonia``); ``start`` numbers the files, so that a larger set can grow from a smaller
    one."""
    from PIL import Image

    images, labels, _ = make_synthetic(n, size, seed=seed)
    root = Path(root)
    for name in LABEL_NAMES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(img).save(root / LABEL_NAMES[int(label)] / f"img{start + i:06d}.png")
    return root


def write_dicom_series(folder: str | Path, slices: np.ndarray, *, spacing: tuple[float, float, float] = (1.0, 1.0, 2.0),
                       origin: tuple[float, float, float] = (-100.0, -100.0, 0.0),
                       orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0), series_uid: str | None = "auto",
                       patient_id: str = "SYNTH-0001", modality: str = "CT", positions: np.ndarray | None = None,
                       instance_numbers: list[int] | None = None, file_names: list[str] | None = None,
                       compress: bool = False) -> list[Path]:
    """Write ``slices`` (K, rows, cols) in Hounsfield units as a DICOM CT series, one file per slice.

    Slice k sits at ``origin + k * spacing[2]`` along the normal of ``orientation`` (LPS, DICOM's patient
    coordinates) unless ``positions`` (K, 3) are given; ``spacing`` is (column, row, slice) in mm. Values are
    stored as uint16 with RescaleIntercept -1024. ``series_uid=None`` leaves the UIDs blank (as some
    de-identification tools do); ``compress`` stores JPEG 2000 lossless. For tests and the volume demo.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    iop = np.asarray(orientation, float)
    normal = np.cross(iop[:3], iop[3:])
    study, frame_of_reference = generate_uid(), generate_uid()
    series = generate_uid() if series_uid == "auto" else (series_uid or "")
    written = []
    for k, plane in enumerate(np.asarray(slices)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID if series else ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID = (study, series) if series else ("", "")
        ds.Modality, ds.PatientID, ds.PatientName = modality, patient_id, "Synthetic^Phantom"
        ds.FrameOfReferenceUID = frame_of_reference if series else ""
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "", "O", "20260101", "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName, ds.SeriesNumber = "1", "", "", 1
        ds.InstanceNumber = instance_numbers[k] if instance_numbers else k + 1
        ds.ImageOrientationPatient = [float(v) for v in iop]
        pos = positions[k] if positions is not None else np.asarray(origin, float) + k * spacing[2] * normal
        ds.ImagePositionPatient = [round(float(v), 4) for v in pos]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = int(plane.shape[0]), int(plane.shape[1])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        ds.PixelData = np.clip(np.round(plane + 1024), 0, 65535).astype(np.uint16).tobytes()
        if compress:
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        path = folder / (file_names[k] if file_names else f"slice_{k:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def ct_phantom(rng: np.random.Generator, shape: tuple[int, int, int] = (16, 32, 32),
               nodule: bool = False) -> np.ndarray:
    """A chest-CT-like phantom (K slices, rows, cols) in Hounsfield units: air outside an elliptic body of soft
    tissue, two lungs, a spine, noise; ``nodule`` adds a soft-tissue ball (radius 2-3.5 voxels) inside a lung."""
    k, rows, cols = shape
    z, y, x = np.mgrid[:k, :rows, :cols].astype(np.float32)
    cy, cx = rows / 2 + rng.normal(0, 0.8), cols / 2 + rng.normal(0, 0.8)
    vol = np.full(shape, -1000.0, np.float32)
    body = ((y - cy) / (rows * 0.42)) ** 2 + ((x - cx) / (cols * 0.46)) ** 2 <= 1
    vol[body] = 40.0
    lung_r = rows * rng.uniform(0.20, 0.24), cols * rng.uniform(0.13, 0.16)
    centres = []
    for side in (-1, 1):
        ly, lx = cy - rows * 0.02, cx + side * cols * 0.2
        lung = ((y - ly) / lung_r[0]) ** 2 + ((x - lx) / lung_r[1]) ** 2 <= 1
        vol[lung & body] = -850.0
        centres.append((ly, lx))
    vol[((y - (cy + rows * 0.3)) / 2.5) ** 2 + ((x - cx) / 2.5) ** 2 <= 1] = 700.0  # spine
    if nodule:
        ly, lx = centres[int(rng.integers(2))]
        cz = rng.uniform(k * 0.3, k * 0.7)
        r = rng.uniform(2.0, 3.5)
        ball = (z - cz) ** 2 + (y - ly - rng.normal(0, 1)) ** 2 + (x - lx - rng.normal(0, 1)) ** 2 <= r * r
        vol[ball] = 30.0
    return vol + rng.normal(0, 15, shape).astype(np.float32)


def write_ct_cases(root: str | Path, n: int = 40, *, shape: tuple[int, int, int] = (16, 32, 32), seed: int = 0,
                   spacing: tuple[float, float, float] = (1.0, 1.0, 2.0)) -> Path:
    """``n`` CT phantoms (half with a nodule), alternately as DICOM series folders and NIfTI files, and a CSV
    manifest ``path,label,patient_id,split`` (70/15/15) beside them. Returns the manifest."""
    import csv

    import nibabel as nib

    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    labels = np.array([i % 2 for i in range(n)])
    split_of: dict[int, str] = {}
    for label in (0, 1):  # stratified: each class 70/15/15
        members = rng.permutation(np.flatnonzero(labels == label))
        n_train, n_val = round(len(members) * 0.7), round(len(members) * 0.15)
        for j, i in enumerate(members):
            split_of[int(i)] = "train" if j < n_train else "val" if j < n_train + n_val else "test"
    for i in range(n):
        case, nodule = f"case{i:03d}", bool(labels[i])
        hu = ct_phantom(rng, shape, nodule)
        if i % 2 == 0:
            write_dicom_series(root / case, hu, spacing=spacing, patient_id=f"PAT-{i:03d}")
            path = case
        else:
            affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # (col, row, slice) like the series
            nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0).copy(), affine), root / f"{case}.nii.gz")
            path = f"{case}.nii.gz"
        rows.append({"path": path, "label": "nodule" if nodule else "clear", "patient_id": f"PAT-{i:03d}",
                     "split": split_of[i]})
    with open(root / "cases.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "patient_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "cases.csv"


def nodule_phantom(rng: np.random.Generator, shape: tuple[int, int, int] = (16, 32, 32),
                   count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A chest-CT phantom (``ct_phantom``) with ``count`` soft-tissue nodules in the lungs, and their mask (uint8,
    1 inside a nodule)."""
    vol = ct_phantom(rng, shape, nodule=False)
    k, rows, cols = shape
    z, y, x = np.mgrid[:k, :rows, :cols].astype(np.float32)
    lungs = np.abs(vol + 850.0) < 75.0  # lung (-850 HU), not the air around the body (-1000 HU)
    mask = np.zeros(shape, np.uint8)
    for _ in range(count):
        inside = np.argwhere(lungs & (z >= 2) & (z < k - 2))
        cz, cy, cx = inside[rng.integers(len(inside))]
        r = rng.uniform(1.8, 3.0)
        ball = (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= r * r
        vol[ball] = 30.0 + rng.normal(0, 15, int(ball.sum()))
        mask[ball] = 1
    return vol, mask


def write_segmentation_cases(root: str | Path, n: int = 24, *, dims: int = 3, seed: int = 0,
                             shape: tuple[int, ...] | None = None) -> Path:
    """Synthetic segmentation data; returns the folder.

    ``dims=3``: a Decathlon folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``) of CT phantoms as NIfTI with 0-2
    lung nodules each (label 1, ``nodule``), 1 x 1 x 2 mm voxels. ``dims=2``: ``images/`` and ``masks/`` PNGs of chest
    X-ray-like images with their opacity masks (label 1, ``opacity``; about a fifth without one) and ``labels.json``.
    """
    import json

    import nibabel as nib
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    if dims == 3:
        shape = shape or (16, 32, 32)
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        entries = []
        affine = np.diag([-1.0, -1.0, 2.0, 1.0])  # (col, row, slice) like a DICOM series' voxels, in RAS
        for i in range(n):
            vol, mask = nodule_phantom(rng, shape, count=int(rng.integers(0, 3)) if i >= 2 else 1)
            name = f"case{i:03d}.nii.gz"
            nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0).copy(), affine), root / "imagesTr" / name)
            nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0).copy(), affine), root / "labelsTr" / name)
            entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        (root / "dataset.json").write_text(json.dumps({"name": "lepton-nodules", "modality": {"0": "CT"},
                                                      "labels": {"0": "background", "1": "nodule"},
                                                      "numTraining": n, "training": entries}, indent=1))
        return root
    size = (shape or (64,))[0]
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, mask = synth_chest_xray(rng, size, opacity=i % 5 != 4)
        Image.fromarray((img * 255).astype(np.uint8)).save(root / "images" / f"case{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"case{i:03d}.png")
    (root / "labels.json").write_text(json.dumps(["background", "opacity"]))
    return root


def write_detection_cases(root: str | Path, n: int = 24, *, dims: int = 2, seed: int = 0,
                          shape: tuple[int, ...] | None = None, min_voxels: int = 4) -> Path:
    """Synthetic box-labelled detection data beside the segmentation data it is cut from; returns the box CSV.

    The cases of ``write_segmentation_cases`` (chest X-ray-like PNGs with opacities for ``dims=2``, CT phantoms with
    lung nodules as a Decathlon folder for ``dims=3``), and ``boxes.csv``: one row per connected component of a mask
    (at least ``min_voxels``), its bounding box in the image as Lepton reads it (``path,x0,y0,x1,y1[,z0,z1],label``),
    and a row without coordinates for each case without one. The same folder trains a segmentation model, so the two
    ways of finding lesions can be compared on the same images.
    """
    import csv

    from scipy.ndimage import find_objects
    from scipy.ndimage import label as components

    from lepton.data.readers.masks import read_mask

    root = Path(root)
    write_segmentation_cases(root, n, dims=dims, seed=seed, shape=shape)
    name = "nodule" if dims == 3 else "opacity"
    masks = sorted((root / ("labelsTr" if dims == 3 else "masks")).iterdir())
    rows = []
    for mask_path in masks:
        image = f"{'imagesTr' if dims == 3 else 'images'}/{mask_path.name}"
        mask = read_mask(mask_path)[0][0] > 0
        found, _ = components(mask)
        boxes = [s for k, s in enumerate(find_objects(found), start=1) if (found[s] == k).sum() >= min_voxels]
        for s in boxes:
            lo, hi = [a.start for a in s], [a.stop for a in s]
            coords = [lo[-1], lo[-2], hi[-1], hi[-2]] + ([lo[0], hi[0]] if dims == 3 else [])
            rows.append([image, *coords, name])
        if not boxes:
            rows.append([image] + [""] * (6 if dims == 3 else 4) + [""])
    out = root / "boxes.csv"
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "x0", "y0", "x1", "y1", *(["z0", "z1"] if dims == 3 else []), "label"])
        writer.writerows(rows)
    return out
