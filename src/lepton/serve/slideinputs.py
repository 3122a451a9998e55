"""What a slide job reads: an upload (a TIFF-based file, a DICOM instance, or a zip of a DICOM slide's instances),
a file named under the server's ``slide_root``, or a DICOMweb reference to one VL whole-slide series on a service in
``dicomweb_allow``. A reference to any other service is refused 403 before any request leaves the server (it never
fetches an address a client chose); the series is retrieved inside the job by ``lepton.hospital.dicomweb.fetch``,
bounded by ``max_slide_bytes``, and nothing of the reference but the service's base URL reaches job state or logs.
Client mistakes are ``ApiError`` (4xx); a job's own failures ``DataError`` (the job fails with the reason)."""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lepton.errors import LeptonError
from lepton.serve.errors import ApiError

#: TIFF-based slide suffixes kept from an upload's name (the reader tells QPTIFF and OME-TIFF by them).
TIFF_SUFFIXES = (".ome.tiff", ".ome.tif", ".qptiff", ".svs", ".tiff", ".tif", ".ndpi", ".scn", ".bif")
#: A zipped DICOM slide: at most this many members.
MAX_ZIP_MEMBERS = 10_000


def prepare_upload(config, folder: Path, filename: str | None) -> Path:
    """The uploaded bytes (``upload.part``) as a slide the readers open: a DICOM file, a zip of a DICOM slide's
    instances (unpacked, names flattened), or a TIFF-based file (its suffix kept); then opened and its
    thumbnail decoded, so a file that is not a readable slide is refused now (ApiError 415/422)."""
    from lepton.data.readers.slides import open_slide

    part = folder / "upload.part"
    with open(part, "rb") as fh:
        head = fh.read(132)
    if head[:4] == b"PK\x03\x04":
        path = _unzip(part, folder / "slide", config.max_slide_bytes)
    elif head[128:132] == b"DICM":
        path = part.rename(folder / "slide.dcm")
    elif head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        name = (filename or "").lower()
        suffix = next((s for s in TIFF_SUFFIXES if name.endswith(s)), ".tiff")
        path = part.rename(folder / f"slide{suffix}")
    else:
        raise ApiError(415, "not_a_slide", "the upload is not a whole-slide file: send a pyramidal TIFF (SVS, "
                       "OME-TIFF, QPTIFF, NDPI), a DICOM VL whole-slide instance, or a zip of a DICOM slide's "
                       "instances")
    try:
        with open_slide(path) as slide:
            slide.thumbnail(256)
    except LeptonError as exc:
        raise ApiError(422, "unreadable_slide", hide_paths(str(exc), folder)) from None
    return path

def _unzip(part: Path, target: Path, limit: int) -> Path:
    target.mkdir()
    try:
        with zipfile.ZipFile(part) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if not members or len(members) > MAX_ZIP_MEMBERS:
                raise ApiError(422, "unreadable_slide", f"the zip holds {len(members)} files: a zipped DICOM "
                               f"slide holds 1 to {MAX_ZIP_MEMBERS} instances")
            if sum(m.file_size for m in members) > limit:
                raise ApiError(413, "payload_too_large", f"the zip unpacks to more than {limit} bytes")
            for i, member in enumerate(members):  # flattened: no member names reach the file system
                with zf.open(member) as src, open(target / f"{i:05d}.dcm", "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError) as exc:
        raise ApiError(422, "unreadable_slide", f"the zip does not unpack ({type(exc).__name__})") from None
    finally:
        part.unlink(missing_ok=True)
    return target

def resolve_path(config, given: Any) -> Path:
    """A server-side slide named by the client: only under ``slide_root`` (403 otherwise, or when unset)."""
    if not config.slide_root:
        raise ApiError(403, "forbidden", "this server takes no slide paths (start it with --slide-root DIR to "
                       "allow slides under DIR); upload the file instead")
    if not isinstance(given, str) or not given:
        raise ApiError(400, "invalid_request", 'the JSON body needs "path": a slide under the slide root')
    if "\x00" in given:  # no file name holds one
        raise ApiError(404, "not_found", "no such slide under the server's slide root")
    root = Path(config.slide_root).expanduser().resolve()
    try:
        path = (root / given).resolve()
        outside, found = not path.is_relative_to(root), path.exists()
    except (OSError, ValueError) as exc:  # a name the file system cannot hold (lone surrogates, too long)
        raise ApiError(404, "not_found", f"no slide {given!r} under the server's slide root") from exc
    if outside:
        raise ApiError(403, "forbidden", f"{given!r} is outside the server's slide root")
    if not found:
        raise ApiError(404, "not_found", f"no slide {given!r} under the server's slide root")
    return path



def hide_paths(message: str, folder: Path) -> str:
    """An error without the server's paths: the job folder reads as "the slide"."""
    return message.replace(str(folder / "upload.part"), "the slide").replace(str(folder), "the upload")


#: The QIDO filters a slide reference may carry: it names one series by its UIDs (never by patient).
REFERENCE_FILTERS = ("StudyInstanceUID", "SeriesInstanceUID")


def resolve_reference(allowed: list[str], given: Any):
    """A slide named by DICOMweb reference (``http(s)://HOST/PATH?StudyInstanceUID=…&SeriesInstanceUID=…``) as a
    ``Source``: 403 unless its base URL is one of ``allowed`` (exactly); 422 unless it names one series by UID."""
    from lepton.errors import DataError
    from lepton.hospital.dicomweb import SCHEME, Source

    if not isinstance(given, str) or not given or len(given) > 4096:
        raise ApiError(400, "invalid_request", '"dicomweb" must be a URL: http(s)://HOST:PORT/dicom-web?'
                       'StudyInstanceUID=…&SeriesInstanceUID=…')
    if not allowed:
        raise ApiError(403, "forbidden", "this server fetches slides from no DICOMweb service (start it with "
                       "--dicomweb-allow URL to trust one); upload the slide instead")
    try:
        source = Source.parse(given if given.startswith(SCHEME) else SCHEME + given)
    except DataError as exc:
        raise ApiError(422, "invalid_reference", str(exc)) from None
    if source.base not in allowed:
        raise ApiError(403, "forbidden", f"{source.base} is not a DICOMweb service this server trusts "
                       "(--dicomweb-allow)")
    if source.limit or set(source.filters) - set(REFERENCE_FILTERS) or "SeriesInstanceUID" not in source.filters:
        raise ApiError(422, "invalid_reference", "a slide reference names one series: give SeriesInstanceUID "
                       "(and StudyInstanceUID), no other filter")
    return source


def retrieve(source: Any, cache: Path, max_bytes: int, update: Callable[..., None]) -> Path:
    """The referenced series' instances into ``cache`` (exactly one VL whole-slide series, at most ``max_bytes``
    written, at most MAX_ZIP_MEMBERS instances; DataError otherwise); ``update(status=…, progress=…)`` is told the
    instances retrieved (at most every 0.5 s). Returns the folder the slide reader opens."""
    import time

    from lepton.errors import DataError
    from lepton.hospital.dicomweb import fetch, find_series

    def progress(done: int, total: int | None) -> None:
        if done in (0, total) or time.monotonic() - last[0] >= 0.5:
            last[0] = time.monotonic()
            update(status="retrieving", progress={"instances_done": done, "instances": total, "tiles_done": 0,
                                                  "tiles": None})

    last = [0.0]
    progress(0, None)
    found = find_series(source)
    if len(found) != 1:
        raise DataError(f"the reference selects {len(found)} series at {source.base}: a slide job takes exactly one "
                        "VL whole-slide series")
    if found[0].modality != "SM":
        raise DataError(f"the referenced series is modality {found[0].modality or 'unknown'}, not a VL whole-slide "
                        "series (SM)")
    if found[0].instances > MAX_ZIP_MEMBERS:
        raise DataError(f"the referenced series holds {found[0].instances} instances (at most {MAX_ZIP_MEMBERS})")
    (folder,) = fetch(source, cache, max_bytes=max_bytes, on_progress=progress)
    return folder
