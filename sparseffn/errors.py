"""Exceptions raised by sparseffn; each message names the problem and the fix."""


class SparseFFNError(ValueError):
    """Base class: bad input that sparseffn refused before changing anything."""


class UnsupportedModelError(SparseFFNError):
    """The model's architecture is not in the family registry."""


class CalibrationError(SparseFFNError):
    """Calibration data or a calibration artifact cannot be used."""


class PatchStateError(SparseFFNError):
    """The model is already patched, or not patched when it must be."""
