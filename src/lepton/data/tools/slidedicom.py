"""A generated slide written as a DICOM VL Whole Slide Microscopy image: one instance per pyramid level in a folder,
frames in TILED_FULL order, JPEG baseline (or uncompressed: DICOM has no per-frame deflate), with the pixel spacing
in the shared functional groups. wsidicom reads the folder back as a pyramid.

wsidicom writes DICOM only from a source it has opened (its converters live in wsidicomizer), so the instances are
built here with pydicom, attribute by attribute from PS3.3 A.32.8.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def _code(value: str, scheme: str, meaning: str) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _jpeg(tile: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="JPEG", quality=quality, subsampling=1)  # 4:2:2, as YBR_FULL_422 says
    return buf.getvalue()


def write_dicom_slide(folder: Path, plan: Any, levels: list[int], *, tile: int, compression: str, quality: int,
                      resolution: bool,
                      render_tiles: Callable[[Any, int, int], Iterator[np.ndarray]]) -> Path:
    """Write ``plan``'s pyramid (``levels``: downsamples) into ``folder`` as one DICOM instance per level; returns the
    folder. ``resolution=False`` leaves out the pixel spacing (a slide a reader must refuse)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_ref = generate_uid(), generate_uid(), generate_uid()
    jpeg = compression == "jpeg"
    for index, ds_factor in enumerate(levels):
        w, h = -(-plan.width // ds_factor), -(-plan.height // ds_factor)
        cols, rows = -(-w // tile), -(-h // tile)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SOP_CLASS, generate_uid()
        meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASS, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_ref
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "SM", "Lepton (synthetic)", 1, index + 1
        ds.PatientName, ds.PatientID = "SYNTHETIC", "SYNTHETIC"  # a generated slide: no person behind it
        ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = "20240101", "000000", "20240101", "000000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", ""
        ds.ImageType = ["ORIGINAL" if index == 0 else "DERIVED", "PRIMARY", "VOLUME",
                        "NONE" if index == 0 else "RESAMPLED"]
        ds.ContainerIdentifier = "SYNTHETIC-SLIDE"
        ds.IssuerOfTheContainerIdentifierSequence = Sequence()
        ds.ContainerTypeCodeSequence = Sequence([_code("433466003", "SCT", "Microscope slide")])
        specimen = Dataset()
        specimen.SpecimenIdentifier, specimen.SpecimenUID = "SYNTHETIC-SPECIMEN", generate_uid()
        specimen.IssuerOfTheSpecimenIdentifierSequence = Sequence()
        specimen.SpecimenPreparationSequence = Sequence()
        ds.SpecimenDescriptionSequence = Sequence([specimen])
        ds.Rows, ds.Columns = tile, tile
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
        ds.TotalPixelMatrixFocalPlanes, ds.NumberOfOpticalPaths, ds.NumberOfFrames = 1, 1, cols * rows
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.PhotometricInterpretation = "YBR_FULL_422" if jpeg else "RGB"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.LossyImageCompression = "01" if jpeg else "00"
        if jpeg:
            ds.LossyImageCompressionMethod = "ISO_10918_1"
            ds.LossyImageCompressionRatio = 10.0
        ds.BurnedInAnnotation, ds.SpecimenLabelInImage = "NO", "NO"
        ds.FocusMethod, ds.ExtendedDepthOfField = "AUTO", "NO"
        spacing_mm = plan.mpp * ds_factor / 1000
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = w * spacing_mm, h * spacing_mm
        ds.ImagedVolumeDepth = 0.001
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.0, 40.0
        ds.TotalPixelMatrixOriginSequence = Sequence([origin])
        ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
        optical = Dataset()
        optical.OpticalPathIdentifier = "1"
        optical.ObjectiveLensPower = round(10 / plan.mpp)
        optical.IlluminationTypeCodeSequence = Sequence([_code("111744", "DCM", "Brightfield illumination")])
        optical.IlluminationColorCodeSequence = Sequence([_code("11744", "DCM", "Brightfield illumination")])
        ds.OpticalPathSequence = Sequence([optical])
        shared = Dataset()
        if resolution:
            measures = Dataset()
            measures.PixelSpacing = [spacing_mm, spacing_mm]
            measures.SliceThickness = 0.001
            shared.PixelMeasuresSequence = Sequence([measures])
        frame_type = Dataset()
        frame_type.FrameType = list(ds.ImageType)
        shared.WholeSlideMicroscopyImageFrameTypeSequence = Sequence([frame_type])
        path_id = Dataset()
        path_id.OpticalPathIdentifier = "1"
        shared.OpticalPathIdentificationSequence = Sequence([path_id])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        tiles = render_tiles(plan, ds_factor, tile)
        if jpeg:
            ds.PixelData = encapsulate([_jpeg(t, quality) for t in tiles])
        else:
            ds.PixelData = b"".join(t.tobytes() for t in tiles)
        ds.save_as(folder / f"level{index}.dcm", enforce_file_format=True)
    return folder
