"""The public one-call API: sparsify, unsparsify, set_sparsity, save/load calibration."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibrate.artifact import JSON_NAME, Calibration, check_fingerprint
from sparseffn.calibration import calibrate_model, fingerprint, refit
from sparseffn.config import SparsityConfig, check_sparsity
from sparseffn.data import load_texts
from sparseffn.dispatch import KernelMode
from sparseffn.errors import CalibrationError, PatchStateError, SparseFFNError
from sparseffn.families import family_of
from sparseffn.methods import DEFAULT_METHOD, method_class
from sparseffn.patching import install, is_sparsified, patch_state, remove, update_thresholds
from sparseffn.patching import set_batch_sharing as set_batch_sharing_
from sparseffn.patching import set_kernel_mode as set_kernel_mode_


def _is_artifact(calibration: Any) -> bool:
    return isinstance(calibration, (str, Path)) and (Path(calibration) / JSON_NAME).exists()


def _config(config: SparsityConfig | None, method: str | None, sparsity: float | None,
            scope: str | None, allocation: str | None,
            rotation: int | None = None) -> SparsityConfig:
    """The config ``sparsify`` fits: ``config`` or one built from the keywords, never both."""
    given = {k: v for k, v in (("method", method), ("sparsity", sparsity), ("scope", scope),
                               ("allocation", allocation), ("rotation", rotation))
             if v is not None}
    if config is not None:
        if given:
            raise SparseFFNError(
                f"pass either config= or {', '.join(f'{k}=' for k in given)}, not both: the "
                "config already says " + ", ".join(f"{k}={getattr(config, k)!r}" for k in given)
                + " (use dataclasses.replace(config, ...) to change it)")
        return config
    return SparsityConfig(method=method or DEFAULT_METHOD,
                          sparsity=0.5 if sparsity is None else sparsity,
                          scope=scope or "mlp", allocation=allocation or "uniform",
                          rotation=rotation or 0)


def _own_tokenizer(model: nn.Module) -> Any:
    """The tokenizer saved beside a model loaded from a local folder, or a clear error."""
    folder = Path(str(getattr(model.config, "_name_or_path", "") or ""))
    has_one = folder.is_dir() and any((folder / f).exists() for f in (
        "tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    if not has_one:
        raise CalibrationError(
            "fitting on text needs the model's tokenizer and the model has no local folder "
            "with one: pass tokenizer=AutoTokenizer.from_pretrained(...)")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


def sparsify(model: nn.Module, method: str | None = None, sparsity: float | None = None,
             calibration: Any = None, *, tokenizer: Any = None, scope: str | None = None,
             allocation: str | None = None, rotation: int | None = None,
             config: SparsityConfig | None = None,
             n_tokens: int = 16384, seq_len: int = 512, batch_size: int = 4,
             strict: bool = True, progress: bool = True,
             kernel_mode: KernelMode | str = KernelMode.AUTO,
             batch_shared: bool = False, lean_generate: bool = True) -> nn.Module:
    """Make ``model`` activation-sparse in place and return it.

    Args:
        model: a transformers causal LM of a registered family
            (``sparseffn.SUPPORTED_MODEL_TYPES``).
        method: a registered method (``sparseffn.methods.method_names()``; default
            ``sparseffn.methods.DEFAULT_METHOD``; ignored when loading a saved calibration,
            which carries its method).
        sparsity: target fraction in [0, 1) (default 0.5). With a saved calibration, a value
            here refits its thresholds from the stored statistics.
        calibration: text to fit on now (a built-in source name such as "austen", a list of
            strings, a .txt/.jsonl path or a ``datasets`` dataset), token ids already cut into
            windows (LongTensor [n_windows, window_len]), or the folder of a saved
            calibration. Not needed for methods that need no calibration text.
        tokenizer: the model's tokenizer, needed when fitting on text (default: the one saved
            in the folder the model was loaded from).
        scope: "mlp" (default) or "all" (attention projections too; input methods only).
        allocation: "uniform" (default), "greedy" (input methods only: within each layer) or
            "layers" (across layers, against each layer's measured sensitivity).
        rotation: 0 (default) or a block size such as 64 or 128: input methods (teal, wina)
            test the MLP input in a block-rotated basis fitted on the calibration text
            (``SparsityConfig.rotation``).
        config: a full SparsityConfig instead of method/sparsity/scope/allocation/rotation
            (passing both is an error).
        n_tokens, seq_len, batch_size: how much calibration text to observe, and in what windows.
        strict: check that a saved calibration's weights match this model, not only its shape.
        kernel_mode: ``KernelMode`` or its value: "auto" (decode steps run the Triton
            kernels on CUDA at batch 1, and at larger batches where measured no slower, and
            the compiled CPU ops on the CPU where measured faster),
            "always" (any decode batch up to 16) or "never" (masked dense torch ops
            everywhere); see ``set_kernel_mode``.
        batch_shared: the sequences of a batch share one active set per site at each step
            (see ``set_batch_sharing``).
        lean_generate: ``model.generate`` on CUDA runs its decode steps through the compiled
            lean loop where its arguments allow (see ``set_lean_generate``).

    Raises:
        SparseFFNError (or a subclass) before anything changes, on bad input.
    """
    if is_sparsified(model):
        raise PatchStateError(
            "the model is already sparsified; call sparseffn.unsparsify(model) first, or "
            "sparseffn.set_sparsity(model, s) to change its level"
        )
    kernel_mode = KernelMode.parse(kernel_mode)
    spec = family_of(model)
    if _is_artifact(calibration):
        fitted = load_calibration(calibration)
        check_fingerprint(fitted.fingerprint, fingerprint(model), weights=strict)
        if sparsity is not None and sparsity != fitted.config.sparsity:
            fitted = refit(fitted, check_sparsity(sparsity), spec)
    else:
        config = _config(config, method, sparsity, scope, allocation, rotation)
        texts: list[str] | torch.Tensor = []
        if isinstance(calibration, torch.Tensor):
            texts = calibration
        elif method_class(config.method).needs_calibration:
            if calibration is None:
                raise CalibrationError(
                    f"method {config.method!r} needs calibration text: pass calibration= a "
                    "list of strings, a file, a datasets dataset or a built-in source such as "
                    "'austen' (or the folder of a saved calibration)"
                )
            texts = load_texts(calibration, "calibration")
            if tokenizer is None:
                tokenizer = _own_tokenizer(model)
        name = calibration if isinstance(calibration, str) else type(calibration).__name__
        fitted = calibrate_model(model, tokenizer, texts, config, n_tokens, seq_len, batch_size,
                                 progress, data_name=str(name))
    install(model, fitted, kernel_mode)
    patch_state(model).lean_generate = bool(lean_generate)
    if batch_shared:
        try:
            set_batch_sharing_(model, True)
        except SparseFFNError:
            remove(model)  # nothing half done
            raise
    return model


def set_kernel_mode(model: nn.Module, mode: KernelMode | str) -> nn.Module:
    """Choose where a sparsified model's decode steps run the Triton kernels.

    "auto": decode steps (one new token, no gradients) at batch 1 on CUDA tensors, and at a
    larger batch in the modules whose decode launches measured no slower than dense at that
    batch (``sparseffn.probe_batch``, which the decode loops run before compiling a step); on
    CPU tensors through the compiled CPU ops wherever a one-time probe per weight shape
    measures them at least as fast as the reference path; "always": any decode batch up to 16
    (on the CPU under TRITON_INTERPRET=1 through the Triton interpreter, as in the tests);
    "never": the reference path everywhere, with the weights back in their original layout.
    Call it with "auto" again after moving a model patched under "never" to the GPU.
    """
    set_kernel_mode_(model, mode)
    return model


def set_batch_sharing(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make the sequences of a batch share one set of active channels (or neurons) per site.

    At each step (each position of a teacher-forced batch) a site keeps the channels of largest
    importance summed over the batch, as many as its calibrated sparsity leaves, and each
    sequence's own threshold test still applies inside that set: a batch reads at most the rows
    one sequence would, so sparse decoding pays at batch > 1. A sequence's output then depends
    on its batch-mates; at batch 1 it is the per-token criterion capped at the site's budget.
    Takes teal, wina, cats and chess (docs/e2e.md, "Batch-shared sparsity", has its quality
    cost). ``enabled=False`` returns to per-token sets.
    """
    set_batch_sharing_(model, enabled)
    return model


def set_lean_generate(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Whether a sparsified model's ``model.generate`` runs through the lean loop.

    Enabled (the default after ``sparsify``): on CUDA, a ``generate`` call whose options the
    lean loop implements (greedy or temperature / top-k / top-p sampling, EOS and stop tokens,
    max/min new tokens, left-padded batches, a streamer, stopping criteria) decodes with a static cache and one
    compiled step per token (``sparseffn.generate``), the same greedy tokens as transformers'
    loop; other calls run transformers' loop and log why once. The first call per batch size
    and cache length (a power of two) compiles. ``enabled=False``: transformers' loop always.
    """
    patch_state(model).lean_generate = bool(enabled)
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
    """Read a saved calibration folder, checked against its method's needs."""
    fitted = Calibration.load(path, SparsityConfig.from_dict)
    method_class(fitted.config.method).check(fitted.thresholds, fitted.extras, str(path))
    return fitted
