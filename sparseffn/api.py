"""The public one-call API: sparsify, unsparsify, set_sparsity, save/load calibration."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibrate.artifact import JSON_NAME, Calibration, check_fingerprint
from calibrate.fit import calibrate_model, refit
from sparseffn.config import SparsityConfig, check_sparsity
from sparseffn.data import load_texts
from sparseffn.decode import KERNEL_MODES
from sparseffn.errors import CalibrationError, PatchStateError, SparseFFNError
from sparseffn.families import family_of
from sparseffn.patching import install, is_sparsified, patch_state, remove, update_thresholds
from sparseffn.patching import set_kernel_mode as set_kernel_mode_


def _is_artifact(calibration: Any) -> bool:
    return isinstance(calibration, (str, Path)) and (Path(calibration) / JSON_NAME).exists()


def sparsify(model: nn.Module, method: str | None = None, sparsity: float | None = None,
             calibration: Any = None, *, tokenizer: Any = None, scope: str = "mlp",
             allocation: str = "uniform", config: SparsityConfig | None = None,
             n_tokens: int = 16384, seq_len: int = 512, batch_size: int = 4,
             strict: bool = True, progress: bool = True,
             kernel_mode: str = "auto") -> nn.Module:
    """Make ``model`` activation-sparse in place and return it.

    Args:
        model: a transformers causal LM of a registered family
            (``sparseffn.SUPPORTED_MODEL_TYPES``).
        method: "teal", "wina", "cats", "chess", "topk" or "predictor" (default "chess";
            ignored when loading a saved calibration, which carries its method).
        sparsity: target fraction in [0, 1) (default 0.5). With a saved calibration, a value
            here refits its thresholds from the stored statistics.
        calibration: text to fit on now (a built-in source name such as "austen", a list of
            strings, a .txt/.jsonl path or a ``datasets`` dataset), token ids already cut into
            windows (LongTensor [n_windows, window_len]), or the folder of a saved
            calibration. Not needed for "topk".
        tokenizer: the model's tokenizer, needed when fitting on text.
        scope: "mlp" or "all" (attention projections too; teal/wina only).
        allocation: "uniform" or "greedy" (teal/wina).
        config: a full SparsityConfig instead of method/sparsity/scope/allocation.
        n_tokens, seq_len, batch_size: how much calibration text to observe, and in what windows.
        strict: check that a saved calibration's weights match this model, not only its shape.
        kernel_mode: "auto" (decode steps on CUDA run the Triton kernels), "always" (also on
            the CPU under TRITON_INTERPRET=1) or "never" (masked dense torch ops everywhere);
            see ``set_kernel_mode``.

    Raises:
        SparseFFNError (or a subclass) before anything changes, on bad input.
    """
    if is_sparsified(model):
        raise PatchStateError(
            "the model is already sparsified; call sparseffn.unsparsify(model) first, or "
            "sparseffn.set_sparsity(model, s) to change its level"
        )
    if kernel_mode not in KERNEL_MODES:
        raise SparseFFNError(f"kernel_mode must be one of {KERNEL_MODES}, got {kernel_mode!r}")
    spec = family_of(model)
    if _is_artifact(calibration):
        fitted = Calibration.load(calibration)
        check_fingerprint(fitted.fingerprint, model, weights=strict)
        if sparsity is not None and sparsity != fitted.config.sparsity:
            fitted = refit(fitted, check_sparsity(sparsity), spec)
    else:
        if config is None:
            config = SparsityConfig(method=method or "chess",
                                    sparsity=0.5 if sparsity is None else sparsity,
                                    scope=scope, allocation=allocation)
        texts: list[str] | torch.Tensor = []
        if isinstance(calibration, torch.Tensor):
            texts = calibration
        elif config.method != "topk":
            if calibration is None:
                raise CalibrationError(
                    f"method {config.method!r} needs calibration text: pass calibration= a "
                    "list of strings, a file, a datasets dataset or a built-in source such as "
                    "'austen' (or the folder of a saved calibration)"
                )
            if tokenizer is None:
                raise CalibrationError("fitting on text needs the model's tokenizer: pass "
                                       "tokenizer=AutoTokenizer.from_pretrained(...)")
            texts = load_texts(calibration, "calibration")
        name = calibration if isinstance(calibration, str) else type(calibration).__name__
        fitted = calibrate_model(model, tokenizer, texts, config, n_tokens, seq_len, batch_size,
                                 progress, data_name=str(name))
    install(model, fitted, kernel_mode)
    return model


def set_kernel_mode(model: nn.Module, mode: str) -> nn.Module:
    """Choose where a sparsified model's decode steps run the Triton kernels.

    "auto": on CUDA tensors at batch 1 (one new token, no gradients; larger batches measured
    slower than dense and decode densely); "always": any decode batch up to 16, also on the CPU
    when Triton runs in interpreter mode (tests); "never": the
    reference path everywhere, with the weights back in their original layout. Call it with
    "auto" again after moving a model patched under "never" to the GPU.
    """
    set_kernel_mode_(model, mode)
    return model


def unsparsify(model: nn.Module) -> nn.Module:
    """Restore the original modules (exact original behaviour); returns ``model``."""
    remove(model)
    return model


def set_sparsity(model: nn.Module, sparsity: float) -> nn.Module:
    """Change a sparsified model's level in place, refitting from stored statistics."""
    state = patch_state(model)
    update_thresholds(model, refit(state.calibration, check_sparsity(sparsity), state.spec))
    return model


def get_calibration(model: nn.Module) -> Calibration:
    """The Calibration a sparsified model runs with."""
    return patch_state(model).calibration


def save_calibration(model: nn.Module, path: str | Path, overwrite: bool = False) -> Path:
    """Save a sparsified model's calibration to the folder ``path``."""
    return get_calibration(model).save(path, overwrite=overwrite)


def load_calibration(path: str | Path) -> Calibration:
    """Read a saved calibration folder."""
    return Calibration.load(path)
