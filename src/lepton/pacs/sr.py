"""A classification as a DICOM Structured Report (highdicom; TID 1500 Measurement Report in a Comprehensive 3D SR):
the finding (the predicted label), every class probability, the model's name and version and the decision
threshold, referencing the source study, series and images — so it files beside them in the PACS and a viewer
shows it with the study."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: Lepton's private coding scheme for its findings and probabilities (no standard code names a model's classes).
SCHEME = "99LEPTON"
#: Series number of Lepton's reports in a study (high, apart from the modality's own series).
SERIES_NUMBER = 9901


def classification_sr(evidence: Sequence, result: dict[str, Any], *, model: str, version: int | str):
    """The SR for one series' answer. ``evidence`` are the series' instances (pydicom datasets, pixel data not
    needed); ``result`` is the classifier's answer (``label``, ``probabilities``, ``threshold``)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    evidence = [_with_sop_class(ds) for ds in evidence]
    labels = list(result["probabilities"])
    threshold = result.get("threshold")
    rule = f"threshold {threshold:.4f} on P({labels[-1]})" if threshold is not None else "arg-max"
    algorithm = hd.sr.AlgorithmIdentification(name=f"lepton:{model}", version=str(version),
                                              parameters=[f"decision: {rule}"])
    finding = hd.sr.QualitativeEvaluation(
        name=hd.sr.CodedConcept("LPT-FINDING", SCHEME, "AI classification"),
        value=hd.sr.CodedConcept(f"LPT-C{labels.index(result['label'])}", SCHEME, str(result["label"])[:64]))
    measurements = [hd.sr.Measurement(name=hd.sr.CodedConcept(f"LPT-P{i}", SCHEME, f"Probability of {name}"[:64]),
                                      value=float(result["probabilities"][name]), unit=codes.UCUM.NoUnits,
                                      algorithm_id=algorithm)
                    for i, name in enumerate(labels)]
    if threshold is not None:
        measurements.append(hd.sr.Measurement(
            name=hd.sr.CodedConcept("LPT-THRESHOLD", SCHEME, f"Decision threshold on P({labels[-1]})"[:64]),
            value=float(threshold), unit=codes.UCUM.NoUnits, algorithm_id=algorithm))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{model}@{version}"),
        algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=[finding],
        source_images=[hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID) for ds in evidence])
    return _report(evidence, [group], model, version)


def answer_sr(evidence: Sequence, result: dict[str, Any], *, model: str, version: int | str):
    """The SR for one answer of a model that is not a segmentation: its boxes as ROIs (``boxes_sr``) where it
    answers boxes, else its classification (``classification_sr``)."""
    build = boxes_sr if "boxes" in result else classification_sr
    return build(evidence, result, model=model, version=version)


def boxes_sr(evidence: Sequence, result: dict[str, Any], *, model: str, version: int | str):
    """A detector's answer as a TID 1500 Measurement Report: one ROI measurement group per box, its label as the
    finding type and its score as a measurement. A volume's box (``world``, RAS mm, from a series with a geometry) is
    a volumetric ROI — a volume surface of the box's six faces as SCOORD3D polygons in the series' frame of reference
    (DICOM patient coordinates, LPS) — referencing the source series; a 2-D image's box (``box``: fractions of the
    image) a planar ROI, a closed SCOORD polyline in the referenced image's pixels."""
    import highdicom as hd
    import numpy as np
    from pydicom.sr.codedict import codes

    evidence = [_with_sop_class(ds) for ds in evidence]
    threshold = result.get("threshold")
    algorithm = hd.sr.AlgorithmIdentification(name=f"lepton:{model}", version=str(version), parameters=[
        f"decision: boxes scoring at least {threshold:.4f}" if threshold is not None else "decision: all boxes"])
    groups = []
    for k, box in enumerate(result["boxes"]):
        common = {"tracking_identifier": hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"box {k + 1}"),
                  "finding_type": hd.sr.CodedConcept(f"LPT-F{_slug(box['label'])}", SCHEME,
                                                     str(box["label"])[:64]),
                  "algorithm_id": algorithm,
                  "measurements": [hd.sr.Measurement(
                      name=hd.sr.CodedConcept("LPT-SCORE", SCHEME, "Detection score"), value=float(box["score"]),
                      unit=codes.UCUM.NoUnits, algorithm_id=algorithm)]}
        if "world" in box:
            w = box["world"]
            lo = np.array([-w["x1"], -w["y1"], w["z0"]])  # RAS -> LPS: x and y change sign (and ends)
            hi = np.array([-w["x0"], -w["y0"], w["z1"]])
            surface = hd.sr.VolumeSurface(
                graphic_type=hd.sr.GraphicTypeValues3D.POLYGON, graphic_data=_faces(lo, hi),
                frame_of_reference_uid=str(evidence[0].FrameOfReferenceUID),
                source_series=hd.sr.SourceSeriesForSegmentation(str(evidence[0].SeriesInstanceUID)))
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_volume_surface=surface, **common))
        else:
            if len(evidence) != 1:
                from lepton.errors import DataError

                raise DataError("a 2-D box refers to one image; the report was given "
                                f"{len(evidence)} instances")
            ref = evidence[0]
            b = box["box"]
            x0, x1 = b["x0"] * int(ref.Columns), b["x1"] * int(ref.Columns)
            y0, y1 = b["y0"] * int(ref.Rows), b["y1"] * int(ref.Rows)
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], np.float64),
                source_image=hd.sr.SourceImageForRegion(str(ref.SOPClassUID), str(ref.SOPInstanceUID)))
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region,
                                                                               **common))
    return _report(evidence, groups, model, version)


def _slug(label: str) -> str:
    import hashlib

    return hashlib.sha256(str(label).encode()).hexdigest()[:8].upper()


def _faces(lo, hi) -> list:
    """The six faces of the box ``lo``…``hi`` (3-D points) as closed polygons (5 points each)."""
    import numpy as np

    faces = []
    for axis in range(3):
        u, v = [a for a in range(3) if a != axis]
        for end in (lo[axis], hi[axis]):
            ring = []
            for a, b in ((lo[u], lo[v]), (hi[u], lo[v]), (hi[u], hi[v]), (lo[u], hi[v]), (lo[u], lo[v])):
                p = np.zeros(3)
                p[axis], p[u], p[v] = end, a, b
                ring.append(p)
            faces.append(np.array(ring, np.float64))
    return faces


def _report(evidence: list, groups: list, model: str, version: int | str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=f"Lepton {model}@{version}"[:64], manufacturer_name="Lepton", model_name=model[:64]))
    modality = str(getattr(evidence[0], "Modality", ""))
    procedure = codes.LN.CTUnspecifiedBodyRegion if modality == "CT" else hd.sr.CodedConcept(
        "LPT-IMAGING", SCHEME, "Imaging procedure")
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=device),
                                     procedure_reported=procedure, imaging_measurements=groups or None)
    return hd.sr.Comprehensive3DSR(evidence=list(evidence), content=report, series_instance_uid=hd.UID(),
                                   series_number=SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
                                   manufacturer="Lepton", is_complete=True, series_description=f"AI: {model}"[:64])


def read_boxes(sr) -> list[dict[str, Any]]:
    """The boxes a Lepton detection SR holds, parsed with highdicom: per ROI group its label, score and either
    ``lps`` (a volume box, (x0, y0, z0, x1, y1, z1) mm in DICOM patient coordinates) with the referenced series, or
    ``pixels`` (a 2-D box, (x0, y0, x1, y1)) with the referenced image."""
    import highdicom as hd
    import numpy as np

    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    out = []
    for group in parsed.content.get_volumetric_roi_measurement_groups():
        faces = [np.asarray(item.value) for item in group.roi if item.ValueType == "SCOORD3D"]
        points = np.concatenate(faces)
        source = [item for item in group.roi if item.ValueType == "UIDREF"]
        out.append({**_finding(group), "lps": [*points.min(0).tolist(), *points.max(0).tolist()],
                    "series": str(source[0].value) if source else None})
    for group in parsed.content.get_planar_roi_measurement_groups():
        points = np.asarray(group.roi.value)
        out.append({**_finding(group), "pixels": [*points.min(0).tolist(), *points.max(0).tolist()],
                    "image": str(group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)})
    return out


def _finding(group) -> dict[str, Any]:
    (score,) = [m for m in group.get_measurements() if m.name.value == "LPT-SCORE"]
    return {"label": group.finding_type.meaning, "score": float(score.value)}


def _with_sop_class(ds):
    """An instance whose SOP Class UID was blanked (some de-identification tools do; the shared real CT is one) takes
    it from its file meta, as a PACS does; without either it cannot be referenced."""
    if str(ds.get("SOPClassUID", "")).strip():
        return ds
    meta = getattr(ds, "file_meta", None)
    sop_class = str(meta.get("MediaStorageSOPClassUID", "")).strip() if meta is not None else ""
    if not sop_class:
        from lepton.errors import DataError

        raise DataError("an instance of the series has no SOP Class UID (neither in the data set nor in its file "
                        "meta): a report cannot reference it")
    ds = ds.copy()
    ds.SOPClassUID = sop_class
    return ds


def read_classification(sr) -> dict[str, Any]:
    """What a Lepton SR says, read back from its content tree: the finding, the probabilities, the threshold, the
    model and version, and the series it references."""
    out: dict[str, Any] = {"probabilities": {}, "threshold": None, "model": None, "version": None}

    def walk(items):
        for item in items or []:
            name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            if name is not None and name.CodingSchemeDesignator == SCHEME:
                if name.CodeValue == "LPT-FINDING":
                    out["label"] = item.ConceptCodeSequence[0].CodeMeaning
                elif name.CodeValue.startswith("LPT-P"):
                    value = float(item.MeasuredValueSequence[0].NumericValue)
                    out["probabilities"][name.CodeMeaning.removeprefix("Probability of ")] = value
                elif name.CodeValue == "LPT-THRESHOLD":
                    out["threshold"] = float(item.MeasuredValueSequence[0].NumericValue)
            if name is not None and name.CodeMeaning == "Algorithm Name":
                out["model"] = str(item.TextValue).removeprefix("lepton:")
            if name is not None and name.CodeMeaning == "Algorithm Version":
                out["version"] = str(item.TextValue)
            walk(item.get("ContentSequence"))

    walk(sr.ContentSequence)
    evidence = sr.get("CurrentRequestedProcedureEvidenceSequence") or []
    out["study"] = str(evidence[0].StudyInstanceUID) if evidence else None
    out["series"] = [str(s.SeriesInstanceUID) for e in evidence for s in e.ReferencedSeriesSequence]
    return out


#: Series number of Lepton's explanation overlays in a study.
OVERLAY_SERIES_NUMBER = 9902


def _orientation(reference, volume: bool) -> tuple[str, str]:
    """Patient Orientation of the overlay's pixels (the row direction, then the column direction). A volume's
    montage tiles are axial slices in the network's order (``lepton.data.readers.volume.network_order``: columns
    toward the patient's right, rows toward posterior); a 2-D input keeps the reference image's own layout."""
    if volume:
        return ("R", "P")
    given = [str(v) for v in (reference.get("PatientOrientation") or []) if str(v)]
    if len(given) == 2:
        return (given[0][0], given[1][0])
    cosines = reference.get("ImageOrientationPatient")
    if cosines is not None and len(cosines) == 6:
        letters = (("L", "R"), ("P", "A"), ("H", "F"))  # DICOM LPS: +x left, +y posterior, +z head

        def letter(vector) -> str:
            axis = max(range(3), key=lambda i: abs(float(vector[i])))
            return letters[axis][0 if float(vector[axis]) > 0 else 1]

        return (letter(cosines[:3]), letter(cosines[3:]))
    from lepton.errors import DataError

    raise DataError("the image has neither Patient Orientation nor Image Orientation: an overlay cannot be placed")


def overlay_sc(reference, png: bytes, *, model: str, version: int | str, explained: str, method: str,
               volume: bool = False):
    """A Grad-CAM overlay (a PNG: the heatmap over the model's input, a montage of slices for a volume) as a DICOM
    Secondary Capture image in the reference instance's study, saying in its comments what it shows."""
    import io

    import highdicom as hd
    import numpy as np
    from PIL import Image

    reference = _with_sop_class(reference)
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=_orientation(reference, volume),
        series_instance_uid=hd.UID(), series_number=OVERLAY_SERIES_NUMBER, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="Lepton")
    sc.SeriesDescription = f"AI explanation: {model}"[:64]
    sc.ImageComments = (f"{method} heatmap of the class '{explained}' by {model}@{version} over the model's input; "
                        "research use, not for diagnosis")[:10240]
    sc.BurnedInAnnotation = "NO"
    return sc
