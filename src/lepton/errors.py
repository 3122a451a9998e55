"""User-facing errors: each message names the file or field at fault and how to fix it."""

from __future__ import annotations


class LeptonError(Exception):
    """Base class for errors the CLI prints without a traceback (``--debug`` shows one)."""


class DataError(LeptonError):
    """A data source is missing, corrupt, empty, mislabeled or unsupported."""


class ConfigError(LeptonError):
    """A configuration value is invalid or inconsistent."""


class ModelError(LeptonError):
    """A model name is unknown or its weights do not fit the network."""


class RunError(LeptonError):
    """A run directory is missing files, incomplete or inconsistent."""


class RegistryError(LeptonError):
    """A registry reference, stage change, artifact or bundle is invalid."""
