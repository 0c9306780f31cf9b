"""Swap a model's projections and MLPs for sparse modules, reversibly.

The family registry (``sparseffn.families``) says where each layer keeps them; the calibration
says which sites are gated and at which thresholds; the method (``sparseffn.methods``) supplies
the neuron gate of the ``act`` site. Undo puts every ``base`` back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from calibrate.artifact import Calibration
from sparseffn.dispatch import KernelMode
from calibrate.fit import split_key
from sparseffn.errors import CalibrationError, PatchStateError, SparseFFNError
from sparseffn import hf_generate
from sparseffn.generation import clear_decode_loops
from sparseffn.families import (FamilySpec, decoder_layers, family_of, layer_attn, layer_mlp,
                                signal_of)
from sparseffn.methods import ACT_SITE, Method, get_method, method_names
from sparseffn.modules import (ROTATION_EXTRA, InputGroup, SparseGatedMLP, SparseLinear,
                               SparseModule)
from sparseffn.sharing import keep_count

STATE_ATTR = "_sparseffn_state"


@dataclass
class PatchState:
    """What sparseffn keeps on a patched model."""

    spec: FamilySpec
    calibration: Calibration
    #: Whether the sites share one active set across a batch (``set_batch_sharing``).
    batch_shared: bool = False
    #: Whether ``model.generate`` runs its decode steps through the lean loop where its
    #: arguments allow (``sparseffn.hf_generate``).
    lean_generate: bool = True


def is_sparsified(model: nn.Module) -> bool:
    return getattr(model, STATE_ATTR, None) is not None


def patch_state(model: nn.Module) -> PatchState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise PatchStateError("the model is not sparsified; call sparseffn.sparsify first")
    return state


def _layer_modules(spec: FamilySpec, method: Method, layer: nn.Module,
                   thresholds: dict[str, torch.Tensor], extras: dict[str, torch.Tensor],
                   calibrating: bool) -> dict[tuple[nn.Module, str], nn.Module]:
    """New modules for one layer, keyed by (parent, attribute)."""
    mlp, attn = layer_mlp(layer), layer_attn(layer)
    inputs = {s: t for s, t in thresholds.items() if s in (*spec.mlp_in, "down_proj")}
    gate = None
    if ACT_SITE in thresholds:
        t = thresholds[ACT_SITE]
        gate = method.calibration_gate(mlp, t) if calibrating \
            else method.neuron_gate(mlp, t, extras)
    new: dict[tuple[nn.Module, str], nn.Module] = {}
    if inputs or gate is not None:
        new[(layer, "mlp")] = SparseGatedMLP(mlp, spec, inputs, gate,
                                             extras.get(ROTATION_EXTRA))
    readers = []
    for site in (*spec.attn_in, spec.attn_out):
        if site in thresholds:
            # q, k and v read the same input: only the first reports it to calibration.
            first = site == spec.attn_out or not readers
            module = SparseLinear(getattr(attn, site), thresholds[site], site,
                                  signal_of(spec, site) if first else None)
            new[(attn, site)] = module
            if site in spec.attn_in:
                readers.append(module)
    if len(readers) > 1:  # q, k, v read the same x: one launch on decode steps
        InputGroup(readers)
    return new


def _check_sites(model: nn.Module, spec: FamilySpec, method: Method,
                 calibration: Calibration) -> None:
    """Every threshold names a site of ``method`` in an existing layer, with a shape that fits
    the module it gates ([] or one value per channel); a CalibrationError names the first that
    does not, before anything changes."""
    layers = decoder_layers(model)
    sites = set(method.sites(calibration.config.scope))
    for key, t in calibration.thresholds.items():
        layer, site = split_key(key)
        if layer >= len(layers) or site not in sites:
            raise CalibrationError(f"the calibration's threshold {key} names no site of method "
                                   f"{calibration.config.method!r} in this model "
                                   f"({len(layers)} layers, sites {sorted(sites)}); recalibrate")
        if site == ACT_SITE:
            width = layer_mlp(layers[layer]).down_proj.weight.shape[1]
        else:
            owner = layer_attn(layers[layer]) if site in (*spec.attn_in, spec.attn_out) \
                else layer_mlp(layers[layer])
            width = getattr(owner, site).weight.shape[1]
        if t.dim() > 1 or t.numel() not in (1, width):
            raise CalibrationError(f"the calibration's threshold {key} has shape "
                                   f"{list(t.shape)}; the module it gates has {width} channels "
                                   f"(expected [] or [{width}]); recalibrate")
    block = getattr(calibration.config, "rotation", 0)
    if block:
        hidden = layer_mlp(layers[0]).down_proj.weight.shape[0]
        want = [hidden // block, block, block]
        for i in range(len(layers)):
            q = calibration.extras.get(f"layers.{i}.{ROTATION_EXTRA}")
            if q is None or list(q.shape) != want:
                raise CalibrationError(
                    f"the calibration asks for rotation={block} but layer {i}'s rotation is "
                    f"{'missing' if q is None else list(q.shape)} (expected {want} for hidden "
                    f"size {hidden}); recalibrate")


def install(model: nn.Module, calibration: Calibration,
            kernel_mode: KernelMode | str = KernelMode.AUTO, calibrating: bool = False) -> None:
    """Patch ``model`` in place with ``calibration``'s thresholds.

    ``kernel_mode`` picks where decode steps run the Triton kernels; unless NEVER, the
    projections the kernels read input-major are re-laid out in place now (no extra copy).
    ``calibrating``: neuron sites get the method's ``calibration_gate`` (for the calibration
    passes, before any trained part of the gate exists).
    """
    kernel_mode = KernelMode.parse(kernel_mode)
    if is_sparsified(model):
        raise PatchStateError(
            "the model is already sparsified; call sparseffn.unsparsify(model) first, or "
            "sparseffn.set_sparsity(model, s) to change its level"
        )
    spec = family_of(model)
    method = get_method(calibration.config.method, spec)
    _check_sites(model, spec, method, calibration)
    swaps: dict[tuple[nn.Module, str], nn.Module] = {}
    for i, layer in enumerate(decoder_layers(model)):
        swaps.update(_layer_modules(spec, method, layer, calibration.layer_thresholds(i),
                                    calibration.layer_extras(i), calibrating))
    for (parent, name), module in swaps.items():
        setattr(parent, name, module)
    setattr(model, STATE_ATTR, PatchState(spec, calibration))
    _set_site_sparsities(model, calibration)
    set_kernel_mode(model, kernel_mode)
    hf_generate.attach(model)
    clear_decode_loops(model)  # steps compiled over the dense modules: free their caches


def set_kernel_mode(model: nn.Module, mode: KernelMode | str, keep_layout: bool = False) -> None:
    """Switch every sparse module's kernel policy and weight layout (see ``install``;
    ``keep_layout``: see ``SparseModule.set_kernel_mode``)."""
    patch_state(model)
    mode = KernelMode.parse(mode)
    for _, module in sparse_modules(model):
        module.set_kernel_mode(mode, keep_layout)


def sparse_modules(model: nn.Module) -> list[tuple[int, SparseModule]]:
    """(layer index, module) of every sparse module in ``model``."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        for module in layer.modules():
            if isinstance(module, SparseModule):
                out.append((i, module))
    return out


def site_module(layer: nn.Module, site: str) -> SparseModule:
    """The installed sparse module that gates ``site`` of a decoder layer."""
    mlp = layer_mlp(layer)
    if isinstance(mlp, SparseGatedMLP) and site in mlp.sites:
        return mlp
    module = getattr(layer_attn(layer), site, None)
    if not isinstance(module, SparseLinear):
        raise PatchStateError(f"site {site!r} is not gated in this layer")
    return module


def update_thresholds(model: nn.Module, calibration: Calibration) -> None:
    """Load ``calibration``'s thresholds into the installed modules (same sites)."""
    state = patch_state(model)
    for i, layer in enumerate(decoder_layers(model)):
        for site, value in calibration.layer_thresholds(i).items():
            site_module(layer, site).set_threshold(site, value)
    state.calibration = calibration
    _set_site_sparsities(model, calibration)
    if state.batch_shared:
        set_batch_sharing(model, True)  # the kept counts follow the new sparsities


def _set_site_sparsities(model: nn.Module, calibration: Calibration) -> None:
    """Give each sparse module its sites' calibrated sparsities (the CUDA batch probe's)."""
    for i, module in sparse_modules(model):
        module.set_site_sparsity({site: calibration.sparsities.get(f"layers.{i}.{site}", 0.0)
                                  for site in module.sites})


def set_batch_sharing(model: nn.Module, enabled: bool) -> None:
    """Share each site's active set across the sequences of a batch (``sparseffn.sharing``),
    keeping as many channels as the site's calibrated sparsity leaves, or stop sharing.

    Raises:
        SparseFFNError: a site of the model cannot share (a neuron gate that does not decide
            by a threshold on |act(gate(x))|, such as top-k or predictors); nothing changes.
    """
    state = patch_state(model)
    modules = sparse_modules(model)
    if enabled:
        for i, module in modules:
            for site in module.sites:
                if not module.shares(site):
                    raise SparseFFNError(
                        f"method {state.calibration.config.method!r} cannot share its active "
                        f"sets across a batch (site layers.{i}.{site}): batch sharing takes the "
                        "input criteria (teal, wina) and the criteria that threshold "
                        f"|act(gate(x))| (cats, chess); methods: {method_names()}")
    for i, module in modules:
        module.shared_keep = {} if not enabled else {
            site: keep_count(state.calibration.sparsities[f"layers.{i}.{site}"],
                             module.site_width(site))
            for site in module.sites}
        module.forget_batch_probes()  # shared sets are not probed (``probe_batch``)
    state.batch_shared = enabled


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
    hf_generate.detach(model)
    clear_decode_loops(model)  # steps compiled over the sparse modules: free their caches
    delattr(model, STATE_ATTR)
