"""Package stage: a versioned model registry with stages, model cards and portable bundles."""

from lepton.registry.core import ModelVersion, Registry, parse_ref

__all__ = ["ModelVersion", "Registry", "parse_ref"]
