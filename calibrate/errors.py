"""The project's error base, defined at the lowest layer that raises it.

``sparseffn.errors`` re-exports both classes and adds the patching ones, so a user catches every
refusal of the library, calibration included, with ``except sparseffn.SparseFFNError``.
"""


class SparseFFNError(ValueError):
    """Base class: bad input that was refused before anything changed."""


class CalibrationError(SparseFFNError):
    """Calibration data or a calibration artifact cannot be used."""
