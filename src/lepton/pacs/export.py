"""A training set from the PACS for use outside the hospital: the series a DICOMweb source selects, fetched and
de-identified (``lepton.hospital.deid``), one folder per series named by its new (keyed) Series Instance UID."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lepton.hospital.deid import Report, deidentify
from lepton.hospital.dicomweb import Source, fetch


@dataclass
class Export:
    series: list[Path] = field(default_factory=list)
    written: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)


def export(url: str, out: str | Path, *, key: bytes, cache: Path | None = None) -> Export:
    """Fetch (QIDO + WADO, cached) and de-identify into ``out``; refused files are reported, never copied."""
    import pydicom

    out = Path(out)
    result = Export()
    for folder in fetch(Source.parse(url), cache):
        staging = out / f".incoming-{folder.name}"
        shutil.rmtree(staging, ignore_errors=True)
        report: Report = deidentify(folder, staging, key=key)
        result.written += report.written
        result.refused += [(f"series {folder.name}/{rel}", why) for rel, why in report.refused]
        files = sorted(staging.glob("*.dcm"))
        if not files:
            shutil.rmtree(staging, ignore_errors=True)
            continue
        target = out / str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        result.series.append(target)
    return result
