"""DICOMweb as a data source (dicomweb-client): QIDO-RS to find series, WADO-RS to fetch their instances into a
local cache that the series reader reads like any folder.

A source is a URL: ``dicomweb+http://HOST:PORT/dicom-web?StudyInstanceUID=…`` (or ``dicomweb+https://``), with QIDO
filters as query parameters — ``StudyInstanceUID``, ``SeriesInstanceUID``, ``PatientID``, ``Modality`` (``CT`` or a
comma list), ``StudyDate`` (``YYYYMMDD`` or a range ``YYYYMMDD-YYYYMMDD``), ``AccessionNumber`` — and ``limit`` (at
most this many series). Instances are cached by SOP Instance UID, so a second fetch of the same series downloads
nothing. Cache paths and everything Lepton prints carry only hashes of the UIDs (``pseudonym``), never the UIDs or
patient identifiers themselves.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from lepton.errors import ConfigError, DataError

# dicomweb-client logs every search and retrieval at INFO with the study, series and instance UIDs: kept quiet, so
# nothing Lepton prints carries them (warnings and errors still show).
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)

SCHEME = "dicomweb+"
#: QIDO filters a source URL may carry (DICOM keywords), and Lepton's own parameters.
FILTERS = ("StudyInstanceUID", "SeriesInstanceUID", "PatientID", "Modality", "StudyDate", "AccessionNumber")
OWN = ("limit",)


def is_source(text: str) -> bool:
    return str(text).startswith(SCHEME)


def pseudonym(uid: str) -> str:
    """A short stable stand-in for a UID in paths and logs (SHA-256, 16 hex digits)."""
    return hashlib.sha256(str(uid).encode()).hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("LEPTON_DICOMWEB_CACHE", Path.home() / ".cache" / "lepton" / "dicomweb"))


@dataclass(frozen=True)
class Source:
    """A parsed ``dicomweb+`` URL: the service's base URL, the QIDO filters and a series limit."""

    base: str
    filters: dict[str, str]
    limit: int | None = None

    @classmethod
    def parse(cls, url: str) -> Source:
        if not is_source(url):
            raise DataError(f"{url!r} is not a DICOMweb source: use dicomweb+http://HOST:PORT/PATH?FILTER=VALUE")
        parts = urlsplit(url[len(SCHEME):])
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise DataError(f"{url!r}: the service must be http:// or https:// with a host "
                            "(dicomweb+http://HOST:PORT/dicom-web?…)")
        filters, limit = {}, None
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key == "limit":
                if not value.isdigit() or int(value) < 1:
                    raise DataError(f"limit must be a positive number (got {value!r})")
                limit = int(value)
            elif key in FILTERS:
                if not value:
                    raise DataError(f"{key} is empty in the DICOMweb source")
                filters[key] = value
            else:
                raise DataError(f"unknown DICOMweb filter {key!r}: use {', '.join(FILTERS + OWN)}")
        return cls(urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", "")), filters, limit)

    def client(self):
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(url=self.base)
        attempts = retries()
        client.set_http_retry_params(retry=attempts > 1, max_attempts=attempts)
        return client


def retries() -> int:
    """Attempts per DICOMweb request (``LEPTON_DICOMWEB_RETRIES``, default 5): a refused connection or a 429/503/504
    answer is retried with exponential back-off (1 s, 2 s, 4 s, …); 1 fails at the first error."""
    text = os.environ.get("LEPTON_DICOMWEB_RETRIES", "5").strip()
    if not text.isdigit() or not 1 <= int(text) <= 20:
        raise ConfigError(f"LEPTON_DICOMWEB_RETRIES={text!r}: give a number of attempts from 1 to 20")
    return int(text)


@dataclass(frozen=True)
class Series:
    study: str
    series: str
    modality: str
    instances: int


def _value(record: dict, tag: str) -> str:
    values = record.get(tag, {}).get("Value") or [""]
    return str(values[0])


def find_series(source: Source) -> list[Series]:
    """QIDO-RS: the series the source's filters select (a study's series, or one series)."""
    client = source.client()
    study = source.filters.get("StudyInstanceUID")
    search = {k: v for k, v in source.filters.items() if k not in ("StudyInstanceUID",)}
    try:
        records = client.search_for_series(study_instance_uid=study, search_filters=search or None,
                                           limit=source.limit)
    except Exception as exc:  # the service's own error (HTTP status, connection) in Lepton's words
        raise DataError(f"DICOMweb search at {source.base} failed: {_reason(exc)}") from None
    out = []
    for r in records:
        out.append(Series(_value(r, "0020000D"), _value(r, "0020000E"), _value(r, "00080060"),
                          int(_value(r, "00201209") or 0)))
    return out[: source.limit] if source.limit else out


def fetch(source: Source, cache: Path | None = None, *, max_bytes: int | None = None,
          on_progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """WADO-RS: every instance of every selected series into the cache (only those not there yet); returns one
    folder per series, named by the series' pseudonym. ``max_bytes`` bounds what this call writes (DataError beyond
    it); ``on_progress(done, total)`` is called after each instance of a series."""
    from lepton.utils import atomic_write_bytes

    cache = cache or cache_root()
    series_list = find_series(source)
    if not series_list:  # the filters' names only: their values may be UIDs or a patient's identifier
        raise DataError(f"no series at {source.base} match the given {', '.join(source.filters) or 'source'}")
    client, folders, written = source.client(), [], 0
    for s in series_list:
        folder = cache / pseudonym(s.series)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            instances = client.search_for_instances(study_instance_uid=s.study, series_instance_uid=s.series)
            for done, record in enumerate(instances, 1):
                sop = _value(record, "00080018")
                target = folder / f"{pseudonym(sop)}.dcm"
                if not target.exists():
                    ds = client.retrieve_instance(s.study, s.series, sop)
                    buf = io.BytesIO()
                    ds.save_as(buf, enforce_file_format=True)
                    written += buf.tell()
                    if max_bytes is not None and written > max_bytes:
                        raise DataError(f"series {pseudonym(s.series)} from {source.base} is larger than the "
                                        f"limit of {max_bytes} bytes")
                    atomic_write_bytes(target, buf.getvalue())
                if on_progress is not None:
                    on_progress(done, len(instances))
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"DICOMweb retrieval of series {pseudonym(s.series)} from {source.base} failed: "
                            f"{_reason(exc)}") from None
        folders.append(folder)
    return folders


def _reason(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if response is not None and getattr(response, "status_code", None):
        return f"HTTP {response.status_code}"
    return type(exc).__name__ + (f": {str(exc)[:200]}" if str(exc) else "")
