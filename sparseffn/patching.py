"""Swap a model's MLPs and attention projections for sparse wrappers, and back.

The wrappers keep the original modules as ``base``, so removing them restores the exact
original model (same module objects, same weights). All new modules are built before the first
swap, so a failure leaves the model untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from calibrate.artifact import Calibration
from sparseffn.config import RANKED_METHODS
from sparseffn.decode import KERNEL_MODES
from sparseffn.errors import PatchStateError, SparseFFNError
from sparseffn.families import FamilySpec, decoder_layers, family_of, layer_attn, layer_mlp
from sparseffn.modules import InputGroup, SiteCounter, SparseGatedMLP, SparseLinear

STATE_ATTR = "_sparseffn_state"


@dataclass
class PatchState:
    """What sparseffn keeps on a patched model."""

    spec: FamilySpec
    calibration: Calibration


def is_sparsified(model: nn.Module) -> bool:
    return getattr(model, STATE_ATTR, None) is not None


def patch_state(model: nn.Module) -> PatchState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise PatchStateError("the model is not sparsified; call sparseffn.sparsify first")
    return state


def _layer_modules(spec: FamilySpec, layer: nn.Module, thresholds: dict[str, torch.Tensor],
                   topk_sparsity: float | None,
                   predictor: tuple[torch.Tensor, torch.Tensor] | None
                   ) -> dict[tuple[nn.Module, str], nn.Module]:
    """New modules for one layer, keyed by (parent, attribute)."""
    mlp, attn = layer_mlp(layer), layer_attn(layer)
    mlp_sites = {s: t for s, t in thresholds.items()
                 if s in (*spec.mlp_in, "down_proj") or (s == "act" and topk_sparsity is None)}
    new: dict[tuple[nn.Module, str], nn.Module] = {}
    if mlp_sites or topk_sparsity is not None:
        new[(layer, "mlp")] = SparseGatedMLP(mlp, spec, mlp_sites, topk_sparsity, predictor)
    for site in (*spec.attn_in, spec.attn_out):
        if site in thresholds:
            new[(attn, site)] = SparseLinear(getattr(attn, site), thresholds[site], site)
    readers = [new[(attn, site)] for site in spec.attn_in if (attn, site) in new]
    if len(readers) > 1:  # q, k, v read the same x: one launch on decode steps
        InputGroup(readers)
    return new


def install(model: nn.Module, calibration: Calibration,
            kernel_mode: str = "auto") -> None:
    """Patch ``model`` in place with ``calibration``'s thresholds.

    ``kernel_mode`` ("auto", "always", "never"; see ``sparseffn.decode``) picks where decode
    steps run the Triton kernels; unless "never", the projections the kernels read input-major
    are re-laid out in place now (no extra copy is kept).
    """
    if kernel_mode not in KERNEL_MODES:
        raise SparseFFNError(f"kernel_mode must be one of {KERNEL_MODES}, got {kernel_mode!r}")
    if is_sparsified(model):
        raise PatchStateError(
            "the model is already sparsified; call sparseffn.unsparsify(model) first, or "
            "sparseffn.set_sparsity(model, s) to change its level"
        )
    spec = family_of(model)
    ranked = calibration.config.method in RANKED_METHODS
    swaps: dict[tuple[nn.Module, str], nn.Module] = {}
    for i, layer in enumerate(decoder_layers(model)):
        thresholds = calibration.layer_thresholds(i)
        topk_sparsity = float(thresholds["act"]) if ranked and "act" in thresholds else None
        swaps.update(_layer_modules(spec, layer, thresholds, topk_sparsity,
                                    calibration.layer_predictor(i)))
    for (parent, name), module in swaps.items():
        setattr(parent, name, module)
    setattr(model, STATE_ATTR, PatchState(spec, calibration))
    set_kernel_mode(model, kernel_mode)


def set_kernel_mode(model: nn.Module, mode: str, keep_layout: bool = False) -> None:
    """Switch every wrapper's kernel policy and weight layout (see ``install``; ``keep_layout``:
    see ``_KernelPath.set_kernel_mode``)."""
    patch_state(model)
    if mode not in KERNEL_MODES:
        raise SparseFFNError(f"kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
    for _, module in sparse_modules(model):
        module.set_kernel_mode(mode, keep_layout)


def sparse_modules(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer index, module) of every sparse wrapper in ``model``."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        for module in layer.modules():
            if isinstance(module, (SparseGatedMLP, SparseLinear)):
                out.append((i, module))
    return out


def site_wrapper(layer: nn.Module, site: str) -> nn.Module:
    """The installed wrapper that gates ``site`` of a decoder layer."""
    mlp = layer_mlp(layer)
    if isinstance(mlp, SparseGatedMLP) and site in mlp.sites:
        return mlp
    module = getattr(layer_attn(layer), site, None)
    if not isinstance(module, SparseLinear):
        raise PatchStateError(f"site {site!r} is not gated in this layer")
    return module


def site_counter(layer: nn.Module, site: str) -> SiteCounter:
    wrapper = site_wrapper(layer, site)
    return wrapper.counters[site] if isinstance(wrapper, SparseGatedMLP) else wrapper.counter


def set_site_threshold(layer: nn.Module, site: str, value: torch.Tensor) -> None:
    """Set the threshold of one gated site (for top-k: its sparsity) in place."""
    wrapper = site_wrapper(layer, site)
    if isinstance(wrapper, SparseLinear):
        wrapper.set_threshold(value)
    elif site == "act" and wrapper.topk_sparsity is not None:
        wrapper.topk_sparsity = float(value)
    else:
        wrapper.set_threshold(site, value)


def update_thresholds(model: nn.Module, calibration: Calibration) -> None:
    """Load ``calibration``'s thresholds into the installed wrappers (same sites)."""
    state = patch_state(model)
    for i, layer in enumerate(decoder_layers(model)):
        for site, value in calibration.layer_thresholds(i).items():
            set_site_threshold(layer, site, value)
    state.calibration = calibration


def remove(model: nn.Module) -> None:
    """Put every original module back and forget the sparsity state."""
    state = patch_state(model)
    for _, module in sparse_modules(model):
        module.restore_layout()
    for layer in decoder_layers(model):
        if isinstance(layer.mlp, SparseGatedMLP):
            layer.mlp = layer.mlp.base
        attn = layer_attn(layer)
        for site in (*state.spec.attn_in, state.spec.attn_out):
            module = getattr(attn, site)
            if isinstance(module, SparseLinear):
                setattr(attn, site, module.base)
    delattr(model, STATE_ATTR)
