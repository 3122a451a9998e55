"""Subgroup columns for a data set: a manifest's extra columns and a few DICOM header fields, read without keeping
identifiers (no names, ids, dates or UIDs; the institution only as a salted hash).

The canonical columns are ``sex``, ``age`` (years), ``age_band``, ``view``, ``manufacturer``, ``model``,
``slice_thickness`` and ``site``; a manifest may name them so or by the aliases below, and any other manifest
column is available by its own name.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import DataError

#: DICOM keywords read for subgroups (never PatientName, PatientID, dates or UIDs) → canonical column.
DICOM_FIELDS = {"PatientSex": "sex", "PatientAge": "age", "Manufacturer": "manufacturer",
                "ManufacturerModelName": "model", "ViewPosition": "view", "SliceThickness": "slice_thickness",
                "InstitutionName": "site", "PixelSpacing": "pixel_spacing"}
#: Other spellings of the canonical columns in manifests (lower-cased).
ALIASES = {"sex": ("patient_sex", "patientsex", "gender"), "age": ("patient_age", "patientage", "age_years"),
           "view": ("view_position", "viewposition"), "manufacturer": ("scanner", "vendor"),
           "model": ("manufacturer_model", "manufacturermodelname", "scanner_model"),
           "site": ("institution", "institution_name", "hospital", "centre", "center")}
#: Age bands (years, lower bound inclusive): the label each age falls in.
AGE_BANDS = ((0, "0-17"), (18, "18-39"), (40, "40-59"), (60, "60-79"), (80, "80+"))
MISSING = "unknown"
_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_PER_YEAR = {"D": 365.25, "W": 365.25 / 7, "M": 12.0, "Y": 1.0, "": 1.0}


def parse_age(text: Any) -> float | None:
    """An age in years from a DICOM Age String (``045Y``, ``006M``, ``010W``, ``003D``) or a plain number; None when
    missing or unreadable. Ages above 150 years are taken as unreadable."""
    if text is None:
        return None
    if isinstance(text, int | float) and not isinstance(text, bool):
        years = float(text)
    else:
        m = _AGE.match(str(text))
        if not m:
            try:
                years = float(str(text).strip())
            except ValueError:
                return None
        else:
            years = int(m.group(1)) / _PER_YEAR[m.group(2).upper()]
    return years if math.isfinite(years) and 0 <= years <= 150 else None


def age_band(years: float | None) -> str:
    """The band of ``AGE_BANDS`` an age falls in, or ``unknown``."""
    if years is None or not math.isfinite(years):
        return MISSING
    label = AGE_BANDS[0][1]
    for low, name in AGE_BANDS:
        if years >= low:
            label = name
    return label


def hash_site(name: str, salt: str | None = None) -> str:
    """An institution name as a salted hash (``site-`` and 10 hex digits): the same site groups together, the name
    is not kept. The salt is ``$LEPTON_SITE_SALT`` when set."""
    salt = salt if salt is not None else os.environ.get("LEPTON_SITE_SALT", "lepton-site")
    return "site-" + hashlib.sha256(f"{salt}:{name.strip().lower()}".encode()).hexdigest()[:10]


def normalise_sex(value: Any) -> str:
    text = str(value or "").strip().upper()
    return {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}.get(text, MISSING)


def dicom_covariates(path: str | Path) -> dict[str, Any]:
    """The subgroup fields of one DICOM file's header (pixel data not read); identifiers are never read out."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(DICOM_FIELDS),
                             force=str(path).lower().endswith(".dcm"))
    except Exception as exc:
        raise DataError(f"{path}: cannot read the DICOM header ({exc})") from exc
    out: dict[str, Any] = {}
    for keyword, column in DICOM_FIELDS.items():
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        if column == "site":
            out["site"] = hash_site(str(value))
        elif column == "pixel_spacing":
            with contextlib.suppress(TypeError, ValueError, IndexError):
                out["pixel_spacing"] = float(value[0])
        elif column == "slice_thickness":
            with contextlib.suppress(TypeError, ValueError):
                out[column] = float(value)
        else:
            out[column] = str(value).strip()
    return out


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _manifest_rows(source: Path) -> dict[str, dict[str, str]]:
    """A manifest's rows by the image path they name (resolved as ``lepton.data.readers.manifest`` resolves it)."""
    with open(source, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    out = {}
    for row in rows:
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        text = row.get("path", "")
        path = Path(text) if Path(text).is_absolute() else source.parent / text
        out[str(path)] = row
    return out


def _canonical(row: dict[str, Any]) -> dict[str, Any]:
    """A row's columns with the canonical names filled from their aliases, sex normalised, age in years and its
    band derived."""
    lower = {k.lower(): v for k, v in row.items()}
    out = dict(row)
    for name, aliases in ALIASES.items():
        if name not in out:
            for alias in (name, *aliases):
                if lower.get(alias) not in (None, ""):  # an institution's name is kept only as a hash
                    out[name] = hash_site(lower[alias]) if name == "site" and alias != "site" else lower[alias]
                    break
    if "sex" in out:
        out["sex"] = normalise_sex(out["sex"])
    if "age" in out:
        out["age"] = parse_age(out["age"])
    if "age_band" not in out and "age" in out:
        out["age_band"] = age_band(out["age"])
    return out


_IDENTIFYING = {"institution", "institution_name", "patient_id", "patientid", "patient_name", "patientname",
                "accession", "accessionnumber",
                "studyinstanceuid", "seriesinstanceuid", "sopinstanceuid", "birth_date", "patientbirthdate"}


def covariate_table(data) -> dict[str, np.ndarray]:
    """Every subgroup column known for ``data`` (an ``ImageSet`` or a segmentation set; its ``names`` are the image
    paths, ``#frame=…`` stripped), as arrays of strings with ``unknown`` where an image lacks the value. Values come
    from the source's manifest when it is a CSV, then from DICOM headers; identifier columns are left out."""
    source = Path(str(data.source))
    rows = _manifest_rows(source) if source.suffix.lower() in (".csv", ".tsv") and source.is_file() else {}
    per_image: list[dict[str, Any]] = []
    headers: dict[str, dict[str, Any]] = {}
    for name in data.names:
        path = str(name).split("#frame=")[0]
        row = dict(rows.get(path, {}))
        file = Path(path)
        if file.is_file() and _is_dicom(file):
            if path not in headers:
                headers[path] = dicom_covariates(file)
            row = {**headers[path], **{k: v for k, v in row.items() if v not in ("", None)}}
        per_image.append(_canonical(row))
    available = sorted({k for r in per_image for k, v in r.items() if v not in (None, "")}
                       - {"path", "label", "split"} - _IDENTIFYING)
    out = {}
    for n in available:
        values = []
        for r in per_image:
            v = r.get(n)
            values.append(MISSING if v in (None, "") else (f"{v:g}" if isinstance(v, float) else str(v)))
        out[n] = np.asarray(values, dtype=object)
    return out


def subgroup_columns(data, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The subgroup columns ``names`` for every image of ``data`` (see ``covariate_table``). A column no image has
    is an error naming it and listing those available."""
    table = covariate_table(data)
    missing = [n for n in names if n not in table]
    if missing:
        raise DataError(f"{data.source}: no subgroup column {', '.join(repr(m) for m in missing)}; available: "
                        f"{', '.join(table) or 'none (add columns to a CSV manifest, or use DICOM files)'}")
    return {n: table[n] for n in names}
