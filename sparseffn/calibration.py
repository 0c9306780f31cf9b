"""Calibration passes: the public API's orchestration of ``calibrate``'s generic machinery.

Calibration runs on the *patched* model: each sparse module reports the signals it gates,
before its mask. With zero thresholds the patched model computes the dense function, so the
first pass sees dense activations; refinement passes see the activations that upstream sparsity
really produces, which is what the thresholds will meet at run time.
"""
from __future__ import annotations

import importlib.metadata
import math
import warnings
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from calibrate.allocate import LAYER_ALPHAS, MAX_SITE_SPARSITY, greedy_levels, layer_levels
from calibrate.artifact import Calibration, model_fingerprint
from calibrate.fit import (as_windows, check_token_count, fit_thresholds, layer_entries,
                           site_key, split_key, uniform_sparsities)
from calibrate.observe import LayerObserver, StatSpec, run_observed
from calibrate.rotation import fit_block_rotation
from sparseffn.config import SparsityConfig
from sparseffn.data import token_windows
from sparseffn.errors import CalibrationError
from sparseffn.eval.perplexity import perplexity
from sparseffn.families import (FamilySpec, decoder_layers, family_of, layer_attn, layer_mlp,
                                window_bos)
from sparseffn.methods import FitContext, Method, get_method
from sparseffn.modules import ROTATION_EXTRA, SparseGatedMLP, SparseLinear
from sparseffn.patching import (install, is_sparsified, remove, site_module, sparse_modules,
                                update_thresholds)


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """``calibrate.artifact.model_fingerprint`` of a (patched or plain) model."""
    def down(layer: nn.Module) -> torch.Tensor:
        mlp = layer_mlp(layer)
        return getattr(mlp, "base", mlp).down_proj.weight

    cfg = model.config
    return model_fingerprint(cfg.model_type, str(getattr(cfg, "_name_or_path", "")),
                             model.get_input_embeddings().weight.shape[0],
                             [down(layer) for layer in decoder_layers(model)])


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("sparseffn", "torch", "transformers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _weight(owner: nn.Module, site: str) -> torch.Tensor:
    proj = getattr(owner, site)
    return (proj.base if isinstance(proj, SparseLinear) else proj).weight


def collect_statistics(model: nn.Module, spec: FamilySpec, method: Method, scope: str,
                       windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
                       desc: str = "calibrating") -> dict[str, torch.Tensor]:
    """Run ``windows`` [N, L] of token ids through the patched ``model``; return the
    statistics ``method`` asks for, ``{"layers.{i}.{stat key}": tensor}`` on the CPU."""
    return observe_statistics(model, spec, method.stat_specs(scope), windows, batch_size,
                              progress, desc)


def observe_statistics(model: nn.Module, spec: FamilySpec, specs: tuple[StatSpec, ...],
                       windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
                       desc: str = "calibrating") -> dict[str, torch.Tensor]:
    """``collect_statistics`` for the statistics ``specs`` themselves."""
    observers = []
    for i, layer in enumerate(decoder_layers(model)):
        mlp = layer_mlp(layer)
        base_mlp = mlp.base if isinstance(mlp, SparseGatedMLP) else mlp
        device = base_mlp.down_proj.weight.device
        scales = {}
        for s in specs:
            if s.scale_by is None:
                continue
            # WINA: column norms of the projection's weight, in the basis its input is tested
            # in (W Q under a rotation of the MLP input).
            if isinstance(mlp, SparseGatedMLP) and s.scale_by in (*spec.mlp_in, "down_proj"):
                weight = mlp.input_weight(s.scale_by)
            else:
                owner = base_mlp if s.scale_by in (*spec.mlp_in, "down_proj") \
                    else layer_attn(layer)
                weight = _weight(owner, s.scale_by)
            scales[s.key] = weight.detach().float().norm(dim=0).to(device)
        observers.append(LayerObserver(i, specs, scales, device))
    run_observed(model, [(m, observers[i].report) for i, m in sparse_modules(model)], windows,
                 batch_size, progress, desc)
    stats: dict[str, torch.Tensor] = {}
    for obs in observers:
        stats.update(obs.finish())
    return stats


def rotation_extras(model: nn.Module, block: int, windows: torch.Tensor, batch_size: int = 4,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """Block rotations of every layer's MLP input (``calibrate.rotation``), fitted on the
    activations the patched ``model`` shows for ``windows`` [N, L]:
    ``{"layers.{i}.rotation.mlp_in": float32 [H // block, block, block]}``."""
    moment = StatSpec("moment.mlp_in", "mlp_in", "block_moment", block=block)
    stats = observe_statistics(model, family_of(model), (moment,), windows, batch_size,
                               progress, desc="calibrating (rotation pass)")
    return {f"layers.{i}.{ROTATION_EXTRA}": fit_block_rotation(stats[f"layers.{i}.{moment.key}"])
            for i in range(len(decoder_layers(model)))}


def check_rotation(model: nn.Module, block: int) -> None:
    """Refuse a rotation block that does not tile the model's hidden size."""
    hidden = layer_mlp(decoder_layers(model)[0]).down_proj.weight.shape[0]
    if hidden % block:
        divisors = [b for b in (32, 64, 128, 256) if hidden % b == 0]
        raise CalibrationError(f"rotation={block} does not divide this model's hidden size "
                               f"{hidden}; choose a block size that does, such as {divisors}")


def _layer_output(layer: nn.Module, inputs: tuple[tuple, dict]) -> torch.Tensor:
    out = layer(*inputs[0], **inputs[1])
    return (out[0] if isinstance(out, tuple) else out).float()


def _capture_layer_inputs(model: nn.Module, windows: torch.Tensor) -> list[tuple[tuple, dict]]:
    """(args, kwargs) each decoder layer received for ``windows`` [N, L]."""
    layers = decoder_layers(model)
    captured: list[Any] = [None] * len(layers)

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured[i] = (args, dict(kwargs))
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        device = model.get_input_embeddings().weight.device
        model(input_ids=windows.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@torch.no_grad()
def greedy_sparsities(model: nn.Module, spec: FamilySpec, method: Method,
                      config: SparsityConfig, stats: dict[str, torch.Tensor],
                      windows: torch.Tensor, progress: bool = True) -> dict[str, float]:
    """Per-site sparsities ``{"layers.{i}.{site}": s}`` meeting each layer's target in bytes
    (``calibrate.allocate.greedy_levels`` on the real decoder layer's output error).

    ``model`` must be patched with every site of ``method``; its thresholds are changed.
    """
    layers = decoder_layers(model)
    sites = method.sites(config.scope)
    inputs = _capture_layer_inputs(model, windows)
    for _, module in sparse_modules(model):
        module.track = False  # search passes are not measurements
    result: dict[str, float] = {}
    for i in tqdm(range(len(layers)), desc="greedy allocation", disable=not progress):
        layer, layer_stats = layers[i], layer_entries(stats, i)
        modules = {s: site_module(layer, s) for s in sites}
        dense = _layer_output(layer, inputs[i])
        scale = dense.pow(2).mean().clamp_min(1e-30)

        def apply(levels: dict[str, float]) -> None:
            for s, level in levels.items():
                modules[s].set_threshold(s, method.fit(layer_stats, s, level))

        def error_at(levels: dict[str, float]) -> float:
            apply(levels)
            return float((_layer_output(layer, inputs[i]) - dense).pow(2).mean() / scale)

        sizes = {s: modules[s].counters[s].covered_elements for s in sites}
        levels = greedy_levels(sizes, config.target_for_layer(i), config.greedy_step, error_at)
        apply(levels)
        result.update({site_key(i, s): levels[s] for s in sites})
    for _, module in sparse_modules(model):
        module.track = True
    return result


#: The level one layer is raised to, alone, to measure its sensitivity: the target plus this.
PROBE_STEP = 0.2


def _loss(model: nn.Module, windows: torch.Tensor) -> float:
    """Mean next-token loss of ``model`` on ``windows`` [N, L]."""
    return math.log(perplexity(model, windows))


@torch.no_grad()
def layer_sparsities(model: nn.Module, method: Method, scaffold: Calibration,
                     stats: dict[str, torch.Tensor], windows: torch.Tensor,
                     progress: bool = True) -> dict[str, float]:
    """Per-site sparsities spread across layers by sensitivity (``calibrate.allocate
    .layer_levels``), every site of a layer at its layer's level, the mean at the target.

    Sensitivity: the loss increase on ``windows`` (calibration text) with one layer alone at
    the target plus ``PROBE_STEP``. The spread is the ``LAYER_ALPHAS`` value whose levels give
    the lowest loss there. ``model`` must be patched with ``scaffold``; its thresholds change.
    """
    target = scaffold.config.sparsity
    keys = list(scaffold.sparsities)
    n_layers = len(decoder_layers(model))
    for _, module in sparse_modules(model):
        module.track = False  # search passes are not measurements

    def apply(levels: list[float]) -> dict[str, float]:
        sparsities = {k: levels[split_key(k)[0]] for k in keys}
        thresholds = fit_thresholds(method.fit, stats, sparsities)
        update_thresholds(model, replace(scaffold, sparsities=sparsities, thresholds=thresholds))
        return sparsities

    apply([0.0] * n_layers)
    dense = _loss(model, windows)
    probe = min(MAX_SITE_SPARSITY, target + PROBE_STEP)
    sensitivity = []
    for i in tqdm(range(n_layers), desc="layer sensitivity", disable=not progress):
        apply([probe if j == i else 0.0 for j in range(n_layers)])
        sensitivity.append(_loss(model, windows) - dense)
    best = None
    for alpha in LAYER_ALPHAS:
        levels = layer_levels(sensitivity, target, alpha)
        apply(levels)
        loss = _loss(model, windows)
        if best is None or loss < best[0]:
            best = (loss, levels)
    for _, module in sparse_modules(model):
        module.track = True
    return apply(best[1])


def _scaffold(model: nn.Module, config: SparsityConfig,
              sparsities: dict[str, float]) -> Calibration:
    """Zero thresholds at every site: the patched model (neuron sites through the method's
    ``calibration_gate``) computes the dense function."""
    zeros = {key: torch.zeros(()) for key in sparsities}
    return Calibration(config, fingerprint(model), dict.fromkeys(sparsities, 0.0), zeros)


def calibrate_model(model: nn.Module, tokenizer: Any, texts: list[str] | torch.Tensor,
                    config: SparsityConfig, n_tokens: int = 16384, seq_len: int = 512,
                    batch_size: int = 4, progress: bool = True, data_name: str = "user texts",
                    refine: int = 1) -> Calibration:
    """Observe ``model`` on ``texts`` and fit ``config``'s thresholds.

    The first pass observes dense activations; each of ``refine`` further passes observes the
    model patched with the current thresholds and refits. Thresholds fitted on dense
    activations alone undershoot the target: sparsifying a layer's gate/up inputs shrinks its
    down input, and sparsifying early layers shifts later ones (TEAL at 65% on all seven
    projections of SmolLM2 measured 71% instead of 65% without refinement).

    Args:
        texts: calibration documents (see ``sparseffn.data.load_texts``), or token ids already
            cut into windows (LongTensor [n_windows, window_len]; ``tokenizer`` unused).
        n_tokens: tokens observed per pass, in windows spread over the whole text.
        seq_len: window length; each forward pass sees [batch_size, seq_len] tokens.
        refine: refinement passes after the dense one.

    Returns:
        A Calibration; ``model`` is left unchanged.
    """
    spec = family_of(model)
    method = get_method(config.method, spec)
    num_layers = len(decoder_layers(model))
    sparsities = uniform_sparsities(method.sites(config.scope), num_layers,
                                    config.target_for_layer)
    meta = {"versions": _versions(), "tokens": 0, "seq_len": seq_len, "data": data_name,
            "refine_passes": refine}
    if not method.needs_calibration:
        return Calibration(config, fingerprint(model), sparsities,
                           fit_thresholds(method.fit, {}, sparsities), meta=meta)
    if isinstance(texts, torch.Tensor):
        windows = as_windows(texts)
    else:
        windows = token_windows(tokenizer, texts, n_tokens, min(seq_len, n_tokens),
                                bos=window_bos(model, tokenizer))
    meta["tokens"] = windows.numel()
    check_token_count(windows)
    if not isinstance(texts, torch.Tensor) and windows.numel() < n_tokens:
        warnings.warn(f"the calibration text holds {windows.numel()} tokens in windows of "
                      f"{windows.shape[1]}, fewer than n_tokens={n_tokens}; calibrating on "
                      "those (pass more text for steadier thresholds)", stacklevel=3)
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(windows.max()) >= vocab or int(windows.min()) < 0:
        raise CalibrationError(f"calibration token ids span [{int(windows.min())}, "
                               f"{int(windows.max())}], outside the model's vocabulary of "
                               f"{vocab}: tokenize with this model's tokenizer")
    scaffold = _scaffold(model, config, sparsities)
    if config.rotation:
        check_rotation(model, config.rotation)
    was_training = model.training
    model.eval()
    # A rotation is fitted on a dense pass first; the thresholds are then observed in its basis.
    install(model, replace(scaffold, config=replace(config, rotation=0)) if config.rotation
            else scaffold, kernel_mode="never", calibrating=True)
    try:
        if config.rotation:
            extras = rotation_extras(model, config.rotation, windows, batch_size, progress)
            remove(model)
            scaffold = replace(scaffold, extras=extras)
            install(model, scaffold, kernel_mode="never", calibrating=True)
        ctx = FitContext(model, _mlps(model), windows, sparsities, config, batch_size, progress)
        trained = method.train(ctx)
        if trained is not None:
            stats, extras, metrics = trained
            return Calibration(config, scaffold.fingerprint, sparsities,
                               fit_thresholds(method.fit, stats, sparsities), stats,
                               {**meta, **metrics}, {**scaffold.extras, **extras})
        stats = collect_statistics(model, spec, method, config.scope, windows, batch_size,
                                   progress, desc="calibrating (dense pass)")
        if config.allocation == "greedy":
            sparsities = greedy_sparsities(model, spec, method, config, stats, windows[:2],
                                           progress=progress)
        elif config.allocation == "layers":
            sparsities = layer_sparsities(model, method, scaffold, stats, windows[-2:],
                                          progress=progress)
        for k in range(refine):
            update_thresholds(model, replace(
                scaffold, sparsities=sparsities,
                thresholds=fit_thresholds(method.fit, stats, sparsities)))
            stats = collect_statistics(model, spec, method, config.scope, windows, batch_size,
                                       progress, desc=f"calibrating (refinement {k + 1})")
    finally:
        if is_sparsified(model):  # (a failed re-install leaves nothing to remove)
            remove(model)
        model.train(was_training)
    return Calibration(config, scaffold.fingerprint, sparsities,
                       fit_thresholds(method.fit, stats, sparsities), stats, meta,
                       scaffold.extras)


def _mlps(model: nn.Module) -> list[tuple[int, nn.Module, torch.Tensor]]:
    mlps = [(i, m, m.base.down_proj.weight) for i, m in sparse_modules(model)
            if isinstance(m, SparseGatedMLP)]
    if len(mlps) != len(decoder_layers(model)):
        raise CalibrationError("every decoder layer needs a patched MLP to calibrate")
    return mlps


def refit(calibration: Calibration, sparsity: float, spec: FamilySpec) -> Calibration:
    """The same calibration at another uniform ``sparsity``, from its stored statistics.

    Fast and needs no data, but the statistics were observed under the calibrated level's
    upstream sparsity, so far from that level the measured sparsity drifts (a few points from
    0.25 to 0.65 on SmolLM2); ``sparsify`` with text at the new level is exact.
    """
    config = replace(calibration.config, sparsity=sparsity, layer_sparsity={})
    if config.allocation == "greedy":
        raise CalibrationError(
            "greedy allocation searches on calibration activations, which are not stored; "
            "recalibrate with text to change its sparsity, or use allocation='uniform'"
        )
    method = get_method(config.method, spec)
    if config.allocation == "layers":
        # Keep each layer's offset from the old target, the mean moved to the new one.
        offsets = [s - calibration.config.sparsity for s in calibration.sparsities.values()]
        sparsities = dict(zip(calibration.sparsities, layer_levels(
            [math.exp(-o) for o in offsets], sparsity, 1.0)))
    else:
        sparsities = {key: sparsity for key in calibration.sparsities}
    return replace(calibration, config=config, sparsities=sparsities,
                   thresholds=fit_thresholds(method.fit, calibration.stats, sparsities))
