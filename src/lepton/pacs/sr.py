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
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=f"Lepton {model}@{version}"[:64], manufacturer_name="Lepton", model_name=model[:64]))
    modality = str(getattr(evidence[0], "Modality", ""))
    procedure = codes.LN.CTUnspecifiedBodyRegion if modality == "CT" else hd.sr.CodedConcept(
        "LPT-IMAGING", SCHEME, "Imaging procedure")
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=device),
                                     procedure_reported=procedure, imaging_measurements=[group])
    return hd.sr.Comprehensive3DSR(evidence=list(evidence), content=report, series_instance_uid=hd.UID(),
                                   series_number=SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
                                   manufacturer="Lepton", is_complete=True, series_description=f"AI: {model}"[:64])


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
    montage tiles are axial slices in the network's order (``lepton.data.volume.network_order``: columns toward the
    patient's right, rows toward posterior); a 2-D input keeps the reference image's own layout."""
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
