"""A slide's report as a DICOM Structured Report, for a slide that came as a DICOM VL whole-slide image: a TID 1500
Measurement Report in a Comprehensive 3D SR (highdicom) with the slide-level finding, every class probability and the
decision threshold, and the regions the model attended to as planar ROIs — closed POLYLINEs (the first point repeated
last, as SR draws a polygon) in the level-0 instance's total pixel matrix (pixel origin ``VOLUME``), each with its
attention mass and mean tile score — referencing the source instance, so it files beside the slide in the PACS.

The codes are those of Lepton's classification SR (``lepton.pacs.sr``: the private scheme ``99LEPTON``), so one
reader reads both. The patient and study modules are copied from the source instance by highdicom, as the standard
requires for a report in the slide's study; nothing of them is logged or returned.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import DataError

#: Lepton's private coding scheme (the same as ``lepton.pacs.sr.SCHEME``).
SCHEME = "99LEPTON"
#: Series number of Lepton's slide reports in a study.
SERIES_NUMBER = 9903
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: Type 2 attributes of the patient and study modules highdicom copies from the source into the report; one missing
#: from the source is added empty (what type 2 allows), never filled with a value.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


def source_instance(slide_path: str | Path) -> Any:
    """The level-0 instance of a DICOM whole-slide image (a file, or the largest VOLUME instance of a folder), read
    without its pixels."""
    import pydicom

    path = Path(slide_path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    best, best_size = None, -1
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # not DICOM: wsidicom skipped it as well
            continue
        if str(ds.get("SOPClassUID", "")) != WSI_SOP_CLASS or "VOLUME" not in list(ds.get("ImageType", [])):
            continue
        size = int(ds.get("TotalPixelMatrixColumns", 0) or 0) * int(ds.get("TotalPixelMatrixRows", 0) or 0)
        if size > best_size:
            best, best_size = ds, size
    if best is None:
        raise DataError(f"{path}: no DICOM VL whole-slide VOLUME instance to reference in a report")
    for keyword in TYPE2_COPIED:  # type 2: present, possibly empty; some exporters leave them out altogether
        if keyword not in best:
            setattr(best, keyword, "")
    return best


def slide_sr(source: Any, report: dict[str, Any], *, model: str, version: str | int) -> Any:
    """The SR (a highdicom ``Comprehensive3DSR``) of ``report`` (``predict_slide``'s) on the level-0 ``source``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    p = report["prediction"]
    labels = list(report["labels"])
    probability = float(p["probability"])
    probs = {labels[0]: 1.0 - probability, labels[-1]: probability} if len(labels) == 2 else {labels[-1]: probability}
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"lepton:{model}"[:64], version=str(version),
        parameters=[f"decision: threshold {float(p['threshold']):.4f} on P({labels[-1]})",
                    f"tiles: {report['spec']['size']} px at {report['spec']['mpp']} um/px"])
    finding = hd.sr.QualitativeEvaluation(
        name=hd.sr.CodedConcept("LPT-FINDING", SCHEME, "AI classification"),
        value=hd.sr.CodedConcept(f"LPT-C{labels.index(p['label'])}", SCHEME, str(p["label"])[:64]))
    measurements = [hd.sr.Measurement(name=hd.sr.CodedConcept(f"LPT-P{labels.index(name)}", SCHEME,
                                                              f"Probability of {name}"[:64]),
                                      value=value, unit=codes.UCUM.NoUnits, algorithm_id=algorithm)
                    for name, value in probs.items()]
    measurements.append(hd.sr.Measurement(
        name=hd.sr.CodedConcept("LPT-THRESHOLD", SCHEME, f"Decision threshold on P({labels[-1]})"[:64]),
        value=float(p["threshold"]), unit=codes.UCUM.NoUnits, algorithm_id=algorithm))
    image = hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)
    groups: list[Any] = [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{model}@{version} slide"[:64]),
        algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=[finding], source_images=[image])]
    width = float(source.TotalPixelMatrixColumns)
    height = float(source.TotalPixelMatrixRows)
    for i, region in enumerate(report["regions"]):
        ring = np.asarray(region["polygon"], dtype=np.float64)
        ring[:, 0] = ring[:, 0].clip(0, width)
        ring[:, 1] = ring[:, 1].clip(0, height)
        roi = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=ring,
            source_image=hd.sr.SourceImageForRegion(source.SOPClassUID, source.SOPInstanceUID),
            pixel_origin_interpretation=hd.sr.PixelOriginInterpretationValues.VOLUME)
        values = [("LPT-ATTENTION", "Attention mass of the region", region["attention"]),
                  ("LPT-TILESCORE", f"Mean tile probability of {labels[-1]}"[:64], region["mean_score"])]
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"region {i + 1}"),
            referenced_region=roi, algorithm_id=algorithm,
            finding_type=hd.sr.CodedConcept("LPT-REGION", SCHEME, "Region the model attended to"),
            measurements=[hd.sr.Measurement(name=hd.sr.CodedConcept(code, SCHEME, meaning), value=float(value),
                                            unit=codes.UCUM.NoUnits, algorithm_id=algorithm)
                          for code, meaning, value in values]))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=f"Lepton {model}@{version}"[:64], manufacturer_name="Lepton", model_name=model[:64]))
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=hd.sr.CodedConcept("LPT-WSI", SCHEME, "Whole slide imaging"), imaging_measurements=groups)
    with warnings.catch_warnings():  # highdicom's warning on an odd person name quotes the name: never shown
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        return hd.sr.Comprehensive3DSR(evidence=[source], content=content, series_instance_uid=hd.UID(),
                                       series_number=SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
                                       manufacturer="Lepton", is_complete=True,
                                       series_description=f"AI slide report: {model}"[:64])


def write_slide_sr(path: str | Path, slide_path: str | Path, report: dict[str, Any], *, model: str,
                   version: str | int) -> Path:
    """Write the SR of ``report`` on the DICOM slide at ``slide_path`` to ``path`` (atomically)."""
    import io

    from lepton.utils import atomic_write_bytes

    sr = slide_sr(source_instance(slide_path), report, model=model, version=version)
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
