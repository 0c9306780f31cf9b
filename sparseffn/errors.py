"""Exceptions raised by sparseffn; each message names the problem and the fix."""
from calibrate.errors import CalibrationError, SparseFFNError

__all__ = ["CalibrationError", "PatchStateError", "SparseFFNError", "UnsupportedModelError"]


class UnsupportedModelError(SparseFFNError):
    """The model's architecture is not in the family registry."""


class PatchStateError(SparseFFNError):
    """The model is already patched, or not patched when it must be."""
