"""Data stage: readers for npz, image folders, DICOM, NIfTI and CSV manifests; splits; checks.

The names below are handed on lazily from the modules that define them, as ``lepton`` itself does: the package
imports none of its own modules, so importing one of them (which runs this file first) never comes back here.
"""

from __future__ import annotations

from lepton.utils import lazy_exports

_EXPORTS = {
    "DataError": "lepton.errors",
    "Frame": "lepton.data.base",
    "ImageSet": "lepton.data.index.dataset",
    "load_dataset": "lepton.data.index.sources",
    "read_image": "lepton.data.readers.io",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
