"""De-identification of DICOM for data that leaves the hospital: the Basic Application Level Confidentiality
Profile of DICOM PS3.15 Annex E.

The profile's table (Table E.1-1: which attribute gets which action) is data, taken from the ``dicom-anonymizer``
package (its 2026c edition of the standard); the actions are applied here:

* ``D`` a dummy value of the attribute's VR, ``Z`` an empty value, ``X`` removed, ``U`` a new UID;
* the combined codes keep the instance valid — ``Z/D`` and ``X/D`` and ``X/Z/D`` replace with a dummy, ``X/Z``
  empties, ``X/Z/U*`` (reference sequences) keeps the sequence with its UIDs remapped and everything else emptied;
* a sequence that is replaced is de-identified item by item; private attributes are removed (the basic profile
  without the Retain Safe Private option); so are curves and overlay data and comments.

UIDs are remapped with a keyed hash (HMAC-SHA256 of the UID under a secret key, as a ``2.25.`` UID): the same
input UID gives the same output in every file and every run under the same key, so a series stays a series and a
reference still points at its target, and without the key the mapping cannot be reversed or recomputed.

An image whose ``BurnedInAnnotation`` is ``YES`` (text such as a name burned into the pixels) is refused: the
profile does not clean pixels, and such a file must not leave de-identified only in its header. The output carries
``PatientIdentityRemoved = YES`` and the method in ``DeidentificationMethod`` and its code sequence (DCM 113100).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from lepton.errors import DataError

#: The edition of the standard the profile table comes from (a module of ``dicom-anonymizer``).
EDITION = "dicomfields_2026c"
#: Table lists in that module and the action code each stands for.
_LISTS = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
          "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*"}
#: What a combined code does here (the choice that keeps the instance valid; see the module docstring).
_RESOLVED = {"Z/D": "D", "X/D": "D", "X/Z/D": "D", "X/Z": "Z", "X/Z/U*": "U*"}
#: Dummy values by VR for ``D``.
_DUMMY = {"AE": "ANONYMOUS", "AS": "000Y", "CS": "ANONYMOUS", "DA": "19000101", "DS": "0", "DT": "19000101000000",
          "IS": "0", "LO": "ANONYMOUS", "LT": "ANONYMOUS", "PN": "ANONYMOUS", "SH": "ANONYMOUS", "ST": "ANONYMOUS",
          "TM": "000000", "UC": "ANONYMOUS", "UR": "http://anonymous", "UT": "ANONYMOUS", "FD": 0.0, "FL": 0.0,
          "SL": 0, "SS": 0, "UL": 0, "US": 0, "SV": 0, "UV": 0}
METHOD = "DICOM PS3.15 Basic Application Level Confidentiality Profile (Lepton)"


@lru_cache(maxsize=1)
def profile() -> tuple[dict[int, str], tuple[tuple[int, int, str], ...]]:
    """The profile table: exact tags to action codes, and masked entries ``(value, mask, code)`` for repeating
    groups such as overlays (``tag & mask == value``)."""
    import importlib

    table = importlib.import_module(f"dicomanonymizer.dicom_anonymization_databases.{EDITION}")
    exact: dict[int, str] = {}
    masked = []
    for name, code in _LISTS.items():
        for entry in getattr(table, name):
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = code
            else:
                group, element, group_mask, element_mask = entry
                masked.append(((group << 16) | element, (group_mask << 16) | element_mask, code))
    return exact, tuple(masked)


def action_for(tag: int) -> str | None:
    """The profile's action code for an attribute (None: not in the table, kept)."""
    exact, masked = profile()
    if tag in exact:
        return exact[tag]
    for value, mask, code in masked:
        if tag & mask == value:
            return code
    return None


@dataclass
class Deidentifier:
    """Applies the profile with one UID key; counts what it did (for the report, never the values)."""

    key: bytes
    counts: dict[str, int] = field(default_factory=dict)

    def uid(self, value: str) -> str:
        """The remapped UID: ``2.25.`` and the first 128 bits of HMAC-SHA256(key, UID) as a decimal."""
        digest = hmac.new(self.key, value.strip().encode(), hashlib.sha256).digest()
        return "2.25." + str(int.from_bytes(digest[:16], "big"))

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def dataset(self, ds, *, top: bool = True) -> None:
        """De-identify ``ds`` in place (its nested sequences too)."""
        from pydicom.sequence import Sequence

        for elem in list(ds):
            tag = int(elem.tag)
            if elem.tag.is_private:
                del ds[elem.tag]
                self._count("X")
                continue
            code = action_for(tag)
            code = _RESOLVED.get(code, code)
            if code is None:
                if elem.VR == "SQ":  # not listed itself, but its items may hold listed attributes
                    for item in elem.value or []:
                        self.dataset(item, top=False)
                elif elem.VR == "UI" and _is_instance_uid(elem.keyword):
                    elem.value = self._uids(elem.value)
                    self._count("U")
                continue
            if code == "X":
                del ds[elem.tag]
            elif code == "Z":
                elem.value = Sequence([]) if elem.VR == "SQ" else ("" if elem.VR not in _NUMERIC else None)
            elif code in ("U", "U*"):
                if elem.VR == "UI":
                    elem.value = self._uids(elem.value)
                elif elem.VR == "SQ":
                    for item in elem.value or []:
                        self._reference_item(item) if code == "U*" else self.dataset(item, top=False)
                else:
                    elem.value = ""
            elif code == "D":
                if elem.VR == "SQ":
                    for item in elem.value or []:
                        self.dataset(item, top=False)
                elif elem.VR == "UI":
                    elem.value = self._uids(elem.value)
                elif elem.VR in _DUMMY:
                    elem.value = _DUMMY[elem.VR]
                else:  # binary VRs (OB, OW, UN, …): no meaningful dummy, so nothing of the original
                    elem.value = b""
            else:  # K, C and anything new: keep only what the profile allows to keep
                pass
            self._count(code)
        if top:
            from pydicom.dataset import Dataset

            ds.PatientIdentityRemoved = "YES"
            ds.DeidentificationMethod = METHOD
            code = Dataset()
            code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
            code.CodeMeaning = "Basic Application Confidentiality Profile"
            ds.DeidentificationMethodCodeSequence = Sequence([code])

    def _uids(self, value):
        if isinstance(value, list | tuple) or (hasattr(value, "__iter__") and not isinstance(value, str)):
            return [self.uid(str(v)) for v in value]
        return self.uid(str(value)) if value else value

    def _reference_item(self, item) -> None:
        """An item of a reference sequence (``X/Z/U*``): its UIDs remapped, anything else de-identified."""
        for elem in list(item):
            if elem.VR == "UI":
                elem.value = self._uids(elem.value)
                self._count("U")
        self.dataset(item, top=False)


_NUMERIC = {"FD", "FL", "SL", "SS", "UL", "US", "SV", "UV"}


def _is_instance_uid(keyword: str) -> bool:
    """UIDs that identify this patient's data but are not in the table by name (none today; a guard for
    attributes a later edition adds): any ``…InstanceUID`` or ``FrameOfReferenceUID``."""
    return keyword.endswith("InstanceUID") or keyword == "FrameOfReferenceUID"


def load_key(path: str | Path | None) -> bytes:
    """The UID key: read from ``path`` (made, with 0600 permissions, when it does not exist yet) or, without a
    path, a new random one (then UIDs are consistent within this call only)."""
    if path is None:
        return secrets.token_bytes(32)
    path = Path(path)
    if path.exists():
        key = path.read_bytes().strip()
        if len(key) < 16:
            raise DataError(f"{path}: a de-identification key needs at least 16 bytes (found {len(key)})")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
    return key


@dataclass
class Report:
    written: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    actions: dict[str, int] = field(default_factory=dict)


def _dicom_files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            yield path


def deidentify(source: str | Path, out: str | Path, *, key: bytes) -> Report:
    """De-identify every DICOM file under ``source`` into ``out``, each written atomically as
    ``<new SOP Instance UID>.dcm`` (folder and file names can carry names and ids, so none is kept). A file that is
    not DICOM is refused by its path under ``source``; so is one with burned-in annotation."""
    import pydicom

    from lepton.utils import atomic_write_bytes

    source, out = Path(source), Path(out)
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise DataError(f"{out}: write the de-identified copy outside {source}")
    worker, report, written = Deidentifier(key), Report(), set()
    files = list(_dicom_files(source))
    if not files:
        raise DataError(f"{source}: no files to de-identify")
    for path in files:
        rel = path.name if source.is_file() else str(path.relative_to(source))
        try:
            ds = pydicom.dcmread(path)
        except Exception:
            report.refused.append((rel, "not a DICOM file"))
            continue
        if "SOPInstanceUID" not in ds:
            report.refused.append((rel, "no SOP Instance UID: not a storable DICOM instance"))
            continue
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            report.refused.append((rel, "BurnedInAnnotation is YES: identifying text may be in the pixels"))
            continue
        worker.dataset(ds)
        if hasattr(ds, "file_meta") and "MediaStorageSOPInstanceUID" in ds.file_meta:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = out / f"{ds.SOPInstanceUID}.dcm"
        if target in written:
            report.refused.append((rel, "the same SOP Instance UID as another file here: a duplicate"))
            continue
        written.add(target)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, buf.getvalue())
        report.written += 1
    report.actions = dict(worker.counts)
    return report
