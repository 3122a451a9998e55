"""Burned-in annotations located from a DICOM header: the ultrasound scan regions (``SequenceOfUltrasoundRegions``)
and graphics overlay planes (60xx,3000), so the readers crop to the data and mask what lies outside it.

An ultrasound frame holds its image inside the scan regions and text, calipers and logos around them. One 2-D region:
the frame is cropped to it. Several 2-D regions (a dual or biplane view, a colour box beside the B-mode image): the
frame is cropped to the box around them and every pixel outside all of them is masked (set to zero), since the text
between them is inside that box. A graphics overlay (``OverlayType`` G: text and marks drawn over the image) marks
pixels that are masked as well. ``BurnedInAnnotation`` tells whether text is in the pixels at all; the header does not
locate text inside a region, so that stays — ``annotation_report`` says so for ``lepton data inspect``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Overlay groups 6000-601E (even), each with (60xx,3000) Overlay Data.
OVERLAY_GROUPS = tuple(range(0x6000, 0x6020, 2))

Rect = tuple[int, int, int, int]  # (x0, y0, x1, y1), inclusive


def regions(ds, rows: int, cols: int) -> list[tuple[bool, int, Rect]]:
    """Every usable region of ``SequenceOfUltrasoundRegions`` as (planar, area, (x0, y0, x1, y1)) clipped to the
    image; planar: 2-D spatial format (tissue, colour flow), as opposed to spectral, M-mode and waveform strips."""
    out = []
    for item in ds.get("SequenceOfUltrasoundRegions", None) or []:
        try:
            x0, y0 = int(item.RegionLocationMinX0), int(item.RegionLocationMinY0)
            x1, y1 = int(item.RegionLocationMaxX1), int(item.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):
            continue
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(cols - 1, x1), min(rows - 1, y1)
        if x1 <= x0 or y1 <= y0:
            continue
        planar = int(item.get("RegionSpatialFormat", 0) or 0) == 1
        out.append((planar, (x1 - x0 + 1) * (y1 - y0 + 1), (x0, y0, x1, y1)))
    return out


def crop_box(ds, rows: int, cols: int) -> tuple[Rect | None, list[Rect]]:
    """Where to crop and which regions to keep inside the crop: one 2-D region (or, without any, the largest region)
    is the crop itself; several 2-D regions give the box around them and the regions, outside which pixels are
    masked. (None, []) when the header has no region."""
    found = regions(ds, rows, cols)
    planar = [r for p, _, r in found if p]
    if len(planar) > 1:
        box = (min(r[0] for r in planar), min(r[1] for r in planar), max(r[2] for r in planar),
               max(r[3] for r in planar))
        return box, planar
    return (max(found)[2] if found else None), []


def overlay_groups(ds) -> list[int]:
    """The overlay groups with Overlay Data that mark graphics (``OverlayType`` G, or unset)."""
    out = []
    for group in OVERLAY_GROUPS:
        if (group, 0x3000) not in ds:
            continue
        kind = str(ds[group, 0x0040].value).strip().upper() if (group, 0x0040) in ds else "G"
        if kind != "R":  # ROI overlays outline a region of interest; they are not drawn over the image
            out.append(group)
    return out


def keep_mask(ds, rows: int, cols: int, n_frames: int, box: Rect, keep: list[Rect]
              ) -> tuple[np.ndarray | None, list[str]]:
    """Pixels of the cropped frames to keep, (F, H, W) bool with F = 1 (every frame) or ``n_frames``, or None when
    nothing is masked; and what was masked, in words. Regions are ``keep`` (full-image coordinates); overlays come
    from the header (an unreadable overlay is skipped and said so)."""
    x0, y0, x1, y1 = box
    mask = None
    notes = []
    if keep:
        mask = np.zeros((1, rows, cols), bool)
        for rx0, ry0, rx1, ry1 in keep:
            mask[0, ry0:ry1 + 1, rx0:rx1 + 1] = True
        notes.append(f"pixels outside the {len(keep)} scan regions")
    for group in overlay_groups(ds):
        plane = _overlay(ds, group, rows, cols, n_frames)
        if plane is None:
            notes.append(f"overlay {group:04X} unreadable, not masked")
            continue
        if mask is None:
            mask = np.ones((1, rows, cols), bool)
        if plane.shape[0] > 1 and mask.shape[0] == 1:
            mask = np.repeat(mask, plane.shape[0], axis=0)
        mask &= ~plane
        notes.append(f"overlay {group:04X} ({int(plane.sum())} pixels)")
    if mask is None:
        return None, notes
    return mask[:, y0:y1 + 1, x0:x1 + 1], notes


def _overlay(ds, group: int, rows: int, cols: int, n_frames: int) -> np.ndarray | None:
    """An overlay plane placed on the image grid: (1, rows, cols) for a one-frame overlay (every frame), (n_frames,
    rows, cols) for a multi-frame one; None when it cannot be read."""
    from pydicom.overlays import get_overlay_array

    try:
        data = np.asarray(get_overlay_array(ds, group)).astype(bool)
        origin = ds.get((group, 0x0050))
        r0, c0 = (int(origin.value[0]) - 1, int(origin.value[1]) - 1) if origin is not None else (0, 0)
        first = int(ds.get((group, 0x0051)).value) - 1 if (group, 0x0051) in ds else 0
    except Exception:
        return None
    if data.ndim == 2:
        data = data[None]
    frames = n_frames if data.shape[0] > 1 else 1
    out = np.zeros((frames, rows, cols), bool)
    ys, xs = slice(max(r0, 0), min(rows, r0 + data.shape[1])), slice(max(c0, 0), min(cols, c0 + data.shape[2]))
    part = data[:, ys.start - r0:ys.stop - r0, xs.start - c0:xs.stop - c0]
    if frames == 1:
        out[0, ys, xs] = part[0]
    else:
        for i in range(min(part.shape[0], n_frames - first)):
            out[first + i, ys, xs] = part[i]
    return out


def annotation_report(ds) -> dict[str, Any]:
    """What a header says about burned-in annotations: ``burned_in`` (BurnedInAnnotation YES/NO or None), the scan
    regions and the overlay groups — for ``lepton data inspect``; identifiers are never read."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    value = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    found = regions(ds, rows, cols) if rows and cols else []
    return {"burned_in": {"YES": True, "NO": False}.get(value),
            "regions": len(found), "planar_regions": sum(p for p, _, _ in found),
            "overlays": [f"{g:04X}" for g in overlay_groups(ds)]}
