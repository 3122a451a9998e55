"""DIMSE for the DICOM node, on pynetdicom: a Storage SCP that modalities and PACS push studies to (C-ECHO, C-STORE
of CT, MR, CR, DX and US images into the node's inbox), and a C-STORE SCU that sends results to a PACS's AE.

The inbox holds one folder per study and series, named by pseudonyms (``INBOX/<study>/<series>/<instance>.dcm``);
each instance is written atomically as received (no re-encoding), after its dataset has been decoded and found to
carry the identifiers and pixel data an image needs, so a malformed dataset is answered with a DIMSE failure status
and nothing is stored. Calling AE titles can be limited to an allow-list; TLS takes an SSL context built from
certificate and key files. Logs name AE titles and pseudonyms, never UIDs or patient attributes (pynetdicom's own
INFO logging, which names UIDs, is kept quiet).
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton.errors import DataError
from lepton.hospital.dicomweb import pseudonym

log = logging.getLogger("lepton.pacs")
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

#: The storage SOP classes the SCP accepts, by modality (pynetdicom's names).
STORAGE_CLASSES: dict[str, tuple[str, ...]] = {
    "CT": ("CTImageStorage", "EnhancedCTImageStorage", "LegacyConvertedEnhancedCTImageStorage"),
    "MR": ("MRImageStorage", "EnhancedMRImageStorage", "EnhancedMRColorImageStorage",
           "LegacyConvertedEnhancedMRImageStorage"),
    "CR": ("ComputedRadiographyImageStorage",),
    "DX": ("DigitalXRayImageStorageForPresentation", "DigitalXRayImageStorageForProcessing"),
    "US": ("UltrasoundImageStorage", "UltrasoundMultiFrameImageStorage"),
}
#: C-STORE statuses (PS3.4 B.2.3).
SUCCESS, OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC210
#: What every stored instance must carry (Type 1 in every image IOD).
REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5: 16 characters of the default set, no backslash


def check_ae_title(title: str, what: str = "AE title") -> str:
    """``title`` as a valid AE title (1–16 printable characters, no backslash, not all spaces), else DataError."""
    if not isinstance(title, str) or not _AE_TITLE.match(title) or not title.strip():
        raise DataError(f"{what} {title!r} must be 1-16 printable ASCII characters without a backslash")
    return title.strip()


@dataclass(frozen=True)
class AeAddress:
    """Where a DICOM application entity listens: ``TITLE@HOST:PORT``."""

    title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> AeAddress:
        title, at, address = text.rpartition("@")
        host, colon, port = address.rpartition(":")
        if not (at and colon and host and port.isdigit() and 0 < int(port) < 65536):
            raise DataError(f"AE address {text!r} must be TITLE@HOST:PORT, e.g. ORTHANC@pacs.local:4242")
        return cls(check_ae_title(title), host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.title}@{self.host}:{self.port}"


def tls_context(cert: Path, key: Path, ca: Path | None = None, *, server: bool) -> ssl.SSLContext:
    """An SSL context for DICOM over TLS from PEM files: this node's certificate and key, and the CA that signs
    its peers' certificates (a server then requires client certificates; a client verifies the server's)."""
    for what, path in (("certificate", cert), ("key", key), ("CA", ca)):
        if path is not None and not Path(path).is_file():
            raise DataError(f"TLS {what} file {path} does not exist")
    purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
    context = ssl.create_default_context(purpose, cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise DataError(f"TLS certificate {cert} or key {key} cannot be loaded: {exc}") from None
    if server and ca:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def instance_path(inbox: Path, study: str, series: str, sop: str) -> Path:
    """Where the inbox keeps an instance: folders and file named by pseudonyms."""
    return Path(inbox) / pseudonym(study) / pseudonym(series) / f"{pseudonym(sop)}.dcm"


class StorageSCP:
    """A Storage SCP (and Verification SCP) writing what it receives into ``inbox``.

    ``port=0`` binds a free port (``self.port`` tells which). ``allowed`` limits calling AE titles (an association
    from another is rejected); ``ssl_context`` serves DICOM over TLS."""

    def __init__(self, inbox: Path, *, ae_title: str = "LEPTON", host: str = "127.0.0.1", port: int = 11112,
                 allowed: list[str] | None = None, ssl_context: ssl.SSLContext | None = None,
                 modalities: tuple[str, ...] = tuple(STORAGE_CLASSES)):
        self.inbox, self.host, self.ssl_context = Path(inbox), host, ssl_context
        self.ae_title = check_ae_title(ae_title, "the node's AE title")
        self.allowed = [check_ae_title(t, "allowed AE title") for t in (allowed or [])]
        unknown = [m for m in modalities if m.upper() not in STORAGE_CLASSES]
        if unknown:
            raise DataError(f"the SCP stores {', '.join(STORAGE_CLASSES)} images; not {', '.join(unknown)}")
        self.modalities = tuple(m.upper() for m in modalities)
        if not 0 <= int(port) < 65536:
            raise DataError(f"port {port} must be between 0 and 65535")
        self._port, self._server = int(port), None
        self._lock = threading.Lock()
        self.stored = self.refused = 0

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server is not None else self._port

    def start(self) -> StorageSCP:
        """Listen in a background thread (returns at once)."""
        from pynetdicom import AE, evt
        from pynetdicom import sop_class as sc

        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(sc.Verification)
        for modality in self.modalities:
            for name in STORAGE_CLASSES[modality]:
                ae.add_supported_context(getattr(sc, name))
        if self.allowed:
            ae.require_calling_aet = self.allowed
        self.inbox.mkdir(parents=True, exist_ok=True)
        handlers = [(evt.EVT_C_ECHO, self._echo), (evt.EVT_C_STORE, self._store),
                    (evt.EVT_REJECTED, self._rejected)]
        try:
            self._server = ae.start_server((self.host, self._port), block=False, evt_handlers=handlers,
                                           ssl_context=self.ssl_context)
        except OSError as exc:
            raise DataError(f"the Storage SCP cannot listen on {self.host}:{self._port}: {exc}") from None
        log.info("Storage SCP %s listening on %s:%d%s", self.ae_title, self.host, self.port,
                 " (TLS)" if self.ssl_context else "")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> StorageSCP:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- handlers (pynetdicom's threads) ---------------------------------------------------------------------------
    def _echo(self, event) -> int:
        log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
        return SUCCESS

    def _rejected(self, event) -> None:
        log.warning("association from AE %r at %s refused", event.assoc.requestor.ae_title,
                    event.assoc.requestor.address)

    def _store(self, event) -> int:
        from lepton.utils import atomic_write_bytes

        caller = event.assoc.requestor.ae_title
        try:
            status, path = self._check(event)
        except Exception as exc:  # pydicom's decoding errors take many shapes; the data set is not stored
            log.warning("C-STORE from %s refused: the data set cannot be decoded (%s)", caller, type(exc).__name__)
            return self._refuse(CANNOT_UNDERSTAND)
        if status != SUCCESS:
            return self._refuse(status)
        try:
            atomic_write_bytes(path, event.encoded_dataset())
        except OSError as exc:
            log.error("C-STORE from %s: writing into the inbox failed: %s", caller, exc.strerror or type(exc).__name__)
            return self._refuse(OUT_OF_RESOURCES)
        with self._lock:
            self.stored += 1
        log.info("C-STORE from %s: instance %s of series %s stored", caller, path.stem, path.parent.name)
        return SUCCESS

    def _refuse(self, status: int) -> int:
        with self._lock:
            self.refused += 1
        return status

    def _check(self, event) -> tuple[int, Path]:
        """Decode the whole data set (every element, so a truncated or garbled one fails here) and check it."""
        ds = event.dataset
        for _ in ds.iterall():
            pass
        caller = event.assoc.requestor.ae_title
        missing = [k for k in REQUIRED if not str(ds.get(k, "") or "").strip()]
        if missing or not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            log.warning("C-STORE from %s refused: no %s", caller, ", ".join(missing) or "pixel data")
            return DOES_NOT_MATCH, Path()
        if "PixelData" in ds and not event.context.transfer_syntax.is_encapsulated:
            from pydicom.pixels.utils import get_expected_length

            if len(ds.PixelData) < get_expected_length(ds, unit="bytes"):  # cut short: a truncated image
                log.warning("C-STORE from %s refused: pixel data shorter than its rows, columns and bits", caller)
                return DOES_NOT_MATCH, Path()
        request = event.request
        if (str(ds.SOPClassUID) != str(request.AffectedSOPClassUID)
                or str(ds.SOPInstanceUID) != str(request.AffectedSOPInstanceUID)):
            log.warning("C-STORE from %s refused: the data set's SOP class or instance differs from the request's",
                        caller)
            return DOES_NOT_MATCH, Path()
        return SUCCESS, instance_path(self.inbox, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                      str(ds.SOPInstanceUID))


def echo(to: AeAddress, *, ae_title: str = "LEPTON", ssl_context: ssl.SSLContext | None = None,
         timeout: float = 30.0) -> bool:
    """C-ECHO ``to``: whether it answered with success."""
    from pynetdicom import AE
    from pynetdicom import sop_class as sc

    ae = AE(ae_title=check_ae_title(ae_title))
    ae.add_requested_context(sc.Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(to.host, to.port, ae_title=to.title,
                         tls_args=(ssl_context, to.host) if ssl_context else None)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == SUCCESS
    finally:
        assoc.release()


def send(datasets: list, to: AeAddress, *, ae_title: str = "LEPTON", ssl_context: ssl.SSLContext | None = None,
         timeout: float = 60.0) -> None:
    """C-STORE ``datasets`` (pydicom Datasets, e.g. an SR or a SEG) to ``to`` on one association; DataError naming
    the AE and the status when it refuses any (the message carries no UID)."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=check_ae_title(ae_title))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(to.host, to.port, ae_title=to.title,
                         tls_args=(ssl_context, to.host) if ssl_context else None)
    if not assoc.is_established:
        raise DataError(f"C-STORE to {to}: the association was refused or could not be made")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                raise DataError(f"C-STORE to {to}: no answer (connection lost or timed out)")
            if code not in (SUCCESS, 0xB000, 0xB007, 0xB006):  # success, or success with a warning
                raise DataError(f"C-STORE to {to} refused a {ds.Modality} result with status 0x{code:04X}")
    finally:
        assoc.release()
