"""What a slide's prediction is given back as: a heatmap over the thumbnail (PNG), the regions the model attended to
as a GeoJSON FeatureCollection that QuPath imports (level-0 pixel coordinates, one annotation per region), and a
report (JSON and Markdown)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: Colour of the regions in QuPath (RGB).
REGION_COLOUR = [220, 40, 40]


def heatmap_png(path: str | Path, thumbnail: np.ndarray, thumb_downsample: float, coords: np.ndarray,
                values: np.ndarray, size0: float, *, alpha: float = 0.5, title: str | None = None) -> Path:
    """``values`` per tile (scaled to [0, 1] by rank) as a colour overlay on the thumbnail, with a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lepton.utils import atomic_write_bytes

    h, w = thumbnail.shape[:2]
    overlay = np.full((h, w), np.nan, np.float32)
    ranked = np.argsort(np.argsort(values)) / max(1, len(values) - 1) if len(values) > 1 else np.ones(len(values))
    side = max(1, round(size0 / thumb_downsample))
    for (x, y), v in zip(coords, ranked, strict=True):
        c, r = round(x / thumb_downsample), round(y / thumb_downsample)
        block = overlay[r:r + side, c:c + side]
        block[np.isnan(block) | (block < v)] = v
    fig, ax = plt.subplots(figsize=(8, 8 * h / max(w, 1) + 0.6), dpi=100)
    ax.imshow(thumbnail)
    shown = ax.imshow(np.ma.masked_invalid(overlay), cmap="inferno", alpha=alpha, vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, fraction=0.03, label="attention (rank within slide)")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def top_regions(coords: np.ndarray, attention: np.ndarray, scores: np.ndarray, stride0: float, size0: float, *,
                share: float = 0.1, max_regions: int = 10) -> list[dict[str, Any]]:
    """The top ``share`` of tiles by attention, joined into regions of touching tiles, each as an outline polygon in
    level-0 pixels with its tile count, attention mass and mean tile score; largest attention mass first."""
    from scipy.ndimage import label
    from skimage.measure import find_contours

    if not len(coords):
        return []
    keep = attention >= np.quantile(attention, 1 - share)
    cols = np.round(coords[:, 0] / stride0).astype(int)
    rows = np.round(coords[:, 1] / stride0).astype(int)
    grid = np.zeros((rows.max() + 3, cols.max() + 3), bool)
    grid[rows[keep] + 1, cols[keep] + 1] = True
    labelled, n = label(grid)
    regions = []
    scale = stride0
    for k in range(1, n + 1):
        inside = labelled[rows + 1, cols + 1] == k
        component = np.pad(labelled == k, 1)
        contour = max(find_contours(component.astype(float), 0.5), key=len)
        # contour points run half a cell around the kept cells' centres, on the grid padded twice by one cell; the
        # tile in row r, column c is centred on level-0 (c * stride0 + size0 / 2, r * stride0 + size0 / 2)
        pts = [[float((c - 2) * scale + size0 / 2), float((r - 2) * scale + size0 / 2)] for r, c in contour]
        if pts[0] != pts[-1]:
            pts.append(pts[0])
        regions.append({"polygon": pts, "tiles": int(inside.sum()), "attention": float(attention[inside].sum()),
                        "mean_score": float(scores[inside].mean())})
    regions.sort(key=lambda r: -r["attention"])
    return regions[:max_regions]


def geojson(regions: list[dict[str, Any]], *, name: str = "Tumour (attention)") -> dict[str, Any]:
    """A GeoJSON FeatureCollection QuPath imports (File → Import objects): one annotation per region."""
    features = []
    for i, region in enumerate(regions):
        features.append({
            "type": "Feature", "id": f"region-{i + 1}",
            "geometry": {"type": "Polygon", "coordinates": [region["polygon"]]},
            "properties": {"objectType": "annotation", "name": f"region {i + 1}",
                           "classification": {"name": name, "color": REGION_COLOUR},
                           "measurements": {"tiles": region["tiles"], "attention": round(region["attention"], 5),
                                            "mean tile score": round(region["mean_score"], 5)}}})
    return {"type": "FeatureCollection", "features": features}


def report_markdown(report: dict[str, Any]) -> str:
    """The slide report as Markdown."""
    s, p = report["slide"], report["prediction"]
    lines = [f"# Slide report: {Path(s['file']).name}", "",
             f"- Container: {s['container']} ({s['width']} x {s['height']} px, {len(s['levels'])} levels)",
             f"- Resolution: {s['mpp']} µm/px ({s['mpp_source']}); magnification "
             f"{s['magnification'] if s['magnification'] else 'not stated'}",
             f"- Tiles: {report['tiles']} at {report['spec']['mpp']} µm/px, {report['spec']['size']} px",
             "", "## Prediction", "",
             f"**{p['label']}** — P({report['labels'][-1]}) = {p['probability']:.3f} (threshold {p['threshold']:.3f})",
             "", "## Regions the model attended to", "",
             "| region | tiles | attention | mean tile score |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {r['tiles']} | {r['attention']:.3f} | {r['mean_score']:.3f} |"
              for i, r in enumerate(report["regions"])]
    lines += ["", f"Files: heatmap `{Path(report['files']['heatmap']).name}`, regions "
              f"`{Path(report['files']['geojson']).name}` (QuPath: File → Import objects).", "",
              "A research model: not a diagnosis."]
    return "\n".join(lines) + "\n"
