"""Label maps as shapes that annotation tools open, and back: COCO JSON (CVAT, Label Studio, most detection tools)
and GeoJSON (QuPath's File → Import objects).

A 2-D label map becomes one shape per class and connected component: its outline traced by scikit-image's
``find_contours`` half a pixel outside the component's pixel centres, with the outlines of its holes. Coordinates are
image pixels with (0, 0) the top-left corner of the first pixel, x along columns — COCO's and QuPath's convention.
In COCO a component becomes a polygon (``segmentation``: its outline as ``[x1, y1, x2, y2, …]``), or, where it has
holes that a COCO polygon cannot carry, an uncompressed run-length encoding (``{"counts", "size"}``, column-major);
``bbox`` and ``area`` come with it. In GeoJSON it becomes a ``Polygon`` feature (outline, then holes) with QuPath's
``objectType`` and ``classification`` properties.

Reading back rasterises the shapes onto the image's grid (``skimage.draw.polygon2mask``: pixels whose centres lie
inside; holes cut out) and refuses, naming the file and the fix, a class name that is not the run's, a shape reaching
outside the image, and a COCO image whose size differs from the image file's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import ConfigError, DataError

#: RGB colours QuPath shows the classes in (cycled).
COLOURS = [[220, 40, 40], [40, 160, 60], [40, 90, 220], [230, 160, 20], [150, 60, 200], [20, 180, 190]]
#: QuPath's object types (GeoJSON ``objectType``) read as drawn shapes; the others (tiles, TMA cores) are skipped.
QUPATH_SHAPES = frozenset({"annotation", "detection", "cell"})


def _skimage():
    try:
        import skimage.draw
        import skimage.measure
    except ImportError:
        raise ConfigError("COCO and GeoJSON annotations need scikit-image (pip install 'lepton[label]')") from None
    return skimage


# -- masks to shapes ------------------------------------------------------------------------------------------------
def mask_shapes(labels: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    """The shapes of a 2-D label map (H, W) of class indices: per foreground class and connected component, its
    ``label``, ``rings`` (outline first, then holes; each a closed list of ``[x, y]``), ``bbox`` ([x, y, w, h]),
    ``area`` (pixels) and the component's boolean ``mask``."""
    from scipy.ndimage import find_objects, label

    sk = _skimage()
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise DataError(f"COCO and GeoJSON shapes are 2-D; this label map is {labels.ndim}-D (volumes are written as "
                        "NIfTI or DICOM SEG)")
    shapes = []
    for k in range(1, len(names)):
        components, _ = label(labels == k)  # 4-connected, as the outlines are traced
        for c, box in enumerate(find_objects(components), start=1):
            if box is None:
                continue
            part = components[box] == c
            padded = np.pad(part, 1)
            rings = []
            for contour in sk.measure.find_contours(padded.astype(np.float32), 0.5):
                ring = [[round(float(col) - 1 + box[1].start + 0.5, 2), round(float(row) - 1 + box[0].start + 0.5, 2)]
                        for row, col in contour]
                if ring[0] != ring[-1]:
                    ring.append(ring[0])
                rings.append(ring)
            rings.sort(key=lambda r: -abs(_ring_area(r)))  # the outline encloses the most
            mask = np.zeros(labels.shape, bool)
            mask[box] = part
            shapes.append({"label": names[k], "rings": rings, "mask": mask, "area": int(part.sum()),
                           "bbox": [box[1].start, box[0].start, box[1].stop - box[1].start,
                                    box[0].stop - box[0].start]})
    return shapes


def _ring_area(ring: list[list[float]]) -> float:
    x, y = np.asarray(ring, dtype=float).T
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed run-length encoding of a boolean mask (column-major; counts start with a background
    run)."""
    flat = np.asarray(mask, bool).ravel(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[False], flat, [False]]).astype(np.int8))) if flat.size else []
    edges = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[-1] and counts and counts[-1] == 0:
        counts = counts[:-1]
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def coco_document(cases: list[tuple[str, np.ndarray]], names: list[str]) -> dict[str, Any]:
    """A COCO JSON document for ``(file name, label map)`` pairs: images, the run's foreground classes as categories
    (ids = class indices), and an annotation per class component."""
    images, annotations = [], []
    for image_id, (file_name, labels) in enumerate(cases, start=1):
        images.append({"id": image_id, "file_name": file_name, "height": int(labels.shape[0]),
                       "width": int(labels.shape[1])})
        for shape in mask_shapes(labels, names):
            segmentation: Any = ([_flat(r) for r in shape["rings"][:1]] if len(shape["rings"]) == 1
                                 else rle(shape["mask"]))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": names.index(shape["label"]), "segmentation": segmentation,
                                "area": shape["area"], "bbox": shape["bbox"], "iscrowd": 0})
    return {"info": {"description": "Lepton pre-annotations (lepton label suggest)"}, "images": images,
            "annotations": annotations,
            "categories": [{"id": k, "name": n, "supercategory": "label"} for k, n in enumerate(names) if k]}


def _flat(ring: list[list[float]]) -> list[float]:
    return [v for point in ring[:-1] for v in point]


def geojson_document(labels: np.ndarray, names: list[str]) -> dict[str, Any]:
    """A GeoJSON FeatureCollection QuPath imports: a ``Polygon`` annotation per class component of a 2-D label map."""
    features = []
    for i, shape in enumerate(mask_shapes(labels, names), start=1):
        k = names.index(shape["label"])
        features.append({"type": "Feature", "id": f"{shape['label']}-{i}",
                         "geometry": {"type": "Polygon", "coordinates": shape["rings"]},
                         "properties": {"objectType": "annotation", "name": shape["label"],
                                        "classification": {"name": shape["label"],
                                                           "color": COLOURS[(k - 1) % len(COLOURS)]},
                                        "measurements": {"area px": shape["area"]}}})
    return {"type": "FeatureCollection", "features": features}


# -- shapes back to masks -------------------------------------------------------------------------------------------
def _fill(rings: list, shape: tuple[int, int], where: str) -> np.ndarray:
    """Pixels whose centres lie inside the outline and outside its holes; rings reaching outside the image refused."""
    sk = _skimage()
    h, w = shape
    out = np.zeros(shape, bool)
    for n, ring in enumerate(rings):
        try:
            pts = np.asarray(ring, dtype=float).reshape(-1, 2)
        except (TypeError, ValueError):
            raise DataError(f"{where}: a ring is not a list of [x, y] points; fix the geometry") from None
        if len(pts) < 3 or not np.isfinite(pts).all():
            raise DataError(f"{where}: a ring needs at least 3 finite [x, y] points; fix the geometry")
        if pts.min() < 0 or pts[:, 0].max() > w or pts[:, 1].max() > h:
            raise DataError(f"{where}: the shape reaches outside the image ({w} x {h} px; points from "
                            f"({pts[:, 0].min():g}, {pts[:, 1].min():g}) to ({pts[:, 0].max():g}, "
                            f"{pts[:, 1].max():g})); draw it inside the image, or check that the shape belongs to "
                            "this image")
        inside = sk.draw.polygon2mask(shape, pts[:, ::-1] - 0.5)  # (row, col) of pixel centres
        out = out | inside if n == 0 else out & ~inside
    return out


def _label_index(name: Any, names: list[str], where: str) -> int:
    if name not in names[1:]:
        raise DataError(f"{where}: label {name!r} is not one of the run's labels ({', '.join(names[1:])}); rename "
                        "the class to one of them")
    return names.index(name)


def read_geojson(path: str | Path, shape: tuple[int, ...], names: list[str]) -> np.ndarray:
    """A GeoJSON file's polygon annotations (QuPath's export: ``Polygon`` or ``MultiPolygon`` features classified by
    name) rasterised onto an image of ``shape`` (H, W) as a uint8 label map (1, H, W)."""
    path = Path(path)
    if len(shape) != 2:
        raise DataError(f"{path}: GeoJSON shapes are 2-D; this image is {len(shape)}-D (give a NIfTI or DICOM SEG "
                        "label map for volumes)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a readable GeoJSON file ({exc})") from exc
    features = doc.get("features") if isinstance(doc, dict) and doc.get("type") == "FeatureCollection" else \
        [doc] if isinstance(doc, dict) and doc.get("type") == "Feature" else None
    if features is None:
        raise DataError(f"{path}: not a GeoJSON FeatureCollection or Feature (QuPath: File > Export objects as "
                        "GeoJSON)")
    out = np.zeros(shape, np.uint8)
    for i, feature in enumerate(features, start=1):
        where = f"{path}: feature {i}"
        props = feature.get("properties") or {}
        if props.get("objectType", "annotation") not in QUPATH_SHAPES:
            continue
        cls = props.get("classification") or {}
        name = cls.get("name") if isinstance(cls, dict) else cls
        if name is None:
            raise DataError(f"{where}: has no classification; classify it with one of the run's labels "
                            f"({', '.join(names[1:])})")
        k = _label_index(name, names, where)
        geometry = feature.get("geometry") or {}
        kind, coords = geometry.get("type"), geometry.get("coordinates")
        polygons = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else None
        if not polygons:
            raise DataError(f"{where}: geometry {kind!r} is not a Polygon or MultiPolygon; draw areas, not points or "
                            "lines")
        for rings in polygons:
            out[_fill(rings, shape, where)] = k
    return out[None]


def read_coco(path: str | Path, names: list[str]) -> list[tuple[int, str, tuple[int, int], Any]]:
    """A COCO JSON file as ``(image id, file name, (height, width), label map builder)`` per image: the builder
    rasterises that image's annotations (polygons, RLE, or boxes when an annotation has only a ``bbox``) as a uint8
    label map (1, H, W), checking class names and that every shape lies inside the image."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a readable COCO JSON file ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or \
            not isinstance(doc.get("annotations"), list) or not isinstance(doc.get("categories"), list):
        raise DataError(f"{path}: a COCO file needs images, annotations and categories lists")
    categories = {}
    for c in doc["categories"]:
        categories[c.get("id")] = _label_index(c.get("name"), names, f"{path}: category {c.get('id')}")
    by_image: dict[Any, list[dict]] = {}
    for a in doc["annotations"]:
        by_image.setdefault(a.get("image_id"), []).append(a)
    out = []
    for image in doc["images"]:
        try:
            image_id, file_name, size = image["id"], str(image["file_name"]), (int(image["height"]),
                                                                                int(image["width"]))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: every image needs id, file_name, height and width") from None

        def build(shape: tuple[int, ...], image_id=image_id, file_name=file_name, size=size) -> np.ndarray:
            if tuple(shape) != size:
                raise DataError(f"{path}: image {image_id} ({file_name}) is {size[1]} x {size[0]} px in the COCO "
                                f"file but {shape[-1]} x {shape[0]} px on disk; annotate the image it names")
            mask = np.zeros(size, np.uint8)
            for a in by_image.get(image_id, []):
                where = f"{path}: annotation {a.get('id')} (image {file_name})"
                if a.get("category_id") not in categories:
                    raise DataError(f"{where}: category_id {a.get('category_id')!r} is not in the file's categories; "
                                    "add the category or fix the id")
                mask[_coco_area(a, size, where)] = categories[a["category_id"]]
            return mask[None]

        out.append((image_id, file_name, size, build))
    return out


def _coco_area(annotation: dict, size: tuple[int, int], where: str) -> np.ndarray:
    seg = annotation.get("segmentation")
    if isinstance(seg, dict):  # run-length encoded, uncompressed counts
        if list(seg.get("size", [])) != list(size) or not isinstance(seg.get("counts"), list):
            raise DataError(f"{where}: its RLE needs size {list(size)} (the image's) and a counts list (compressed "
                            "RLE strings are not read; export uncompressed or as polygons)")
        counts = np.asarray(seg["counts"], dtype=np.int64)
        if counts.min(initial=0) < 0 or counts.sum() != size[0] * size[1]:
            raise DataError(f"{where}: its RLE counts cover {int(counts.sum())} pixels, not the image's "
                            f"{size[0] * size[1]}; fix the mask")
        values = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
        return values.reshape(size, order="F")
    if isinstance(seg, list) and seg:
        area = np.zeros(size, bool)
        for polygon in seg:  # several polygons of one object: their union
            area |= _fill([np.asarray(polygon, dtype=float).reshape(-1, 2)], size, where)
        return area
    box = annotation.get("bbox")
    if isinstance(box, list) and len(box) == 4:
        x, y, w, h = (float(v) for v in box)
        return _fill([[[x, y], [x + w, y], [x + w, y + h], [x, y + h]]], size, where)
    raise DataError(f"{where}: has neither a segmentation (polygons or RLE) nor a bbox")
