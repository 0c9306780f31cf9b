"""The error raised by the fine-tuning module on bad input."""
from __future__ import annotations

from sparseffn.errors import SparseFFNError


class FinetuneError(SparseFFNError):
    """A regularizer, schedule, LoRA setting or training dataset that cannot be used."""
