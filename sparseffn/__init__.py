"""sparseffn: activation sparsity for Hugging Face transformers models.

    import sparseffn
    model = sparseffn.sparsify(model, method="chess", sparsity=0.5,
                               calibration="austen", tokenizer=tokenizer)
    model.generate(...)
    sparseffn.save_calibration(model, "calib/")
    sparseffn.unsparsify(model)
"""
from sparseffn.api import (get_calibration, load_calibration, save_calibration,
                           set_batch_sharing, set_kernel_mode, set_lean_generate, set_sparsity,
                           sparsify, unsparsify)
from sparseffn.config import SparsityConfig
from sparseffn.data import BUILTIN_SOURCES, load_texts
from sparseffn.dispatch import KernelMode
from sparseffn.errors import (CalibrationError, PatchStateError, SparseFFNError,
                              UnsupportedModelError)
from sparseffn.families import SUPPORTED_MODEL_TYPES
from sparseffn.generation import clear_decode_loops, generate
from sparseffn.methods import Method, StatSpec, method_names, register_method
from sparseffn.models import load_builtin_model
from sparseffn.modules import probe_batch
from sparseffn.patching import is_sparsified
from sparseffn.report import SparsityReport, reset_sparsity_stats, sparsity_report, track_sparsity

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_SOURCES", "SUPPORTED_MODEL_TYPES", "CalibrationError", "KernelMode", "Method",
    "PatchStateError", "SparseFFNError", "SparsityConfig", "SparsityReport", "StatSpec",
    "UnsupportedModelError",
    "clear_decode_loops", "generate", "get_calibration", "is_sparsified", "load_builtin_model",
    "load_calibration", "load_texts", "method_names", "probe_batch", "register_method",
    "reset_sparsity_stats", "save_calibration",
    "set_batch_sharing", "set_kernel_mode", "set_lean_generate", "set_sparsity", "sparsify", "sparsity_report", "track_sparsity",
    "unsparsify",
]
