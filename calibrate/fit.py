"""Calibration in two steps: observe statistics on real text, then fit thresholds."""
from __future__ import annotations

import importlib.metadata
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from calibrate.allocate import greedy_sparsities
from calibrate.artifact import Calibration, model_fingerprint
from calibrate.collect import collect_statistics
from sparseffn.config import SparsityConfig
from sparseffn.data import token_windows
from sparseffn.errors import CalibrationError
from sparseffn.families import FamilySpec, decoder_layers, family_of
from sparseffn.methods import Method, get_method

MIN_TOKENS = 1024  # below this, per-channel histograms are too thin to place thresholds


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("sparseffn", "torch", "transformers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def uniform_sparsities(config: SparsityConfig, method: Method, spec: FamilySpec,
                       num_layers: int) -> dict[str, float]:
    """Every site of layer i at the layer's target (``config.layer_sparsity`` overrides)."""
    return {f"layers.{i}.{site}": config.target_for_layer(i)
            for i in range(num_layers) for site in method.sites(spec, config.scope)}


def fit_thresholds(method: Method, stats: dict[str, torch.Tensor],
                   sparsities: dict[str, float]) -> dict[str, torch.Tensor]:
    """Threshold per site key ``layers.{i}.{site}`` for the allocated sparsities."""
    out = {}
    for key, sparsity in sparsities.items():
        _, layer, site = key.split(".", 2)
        prefix = f"layers.{layer}."
        layer_stats = {k[len(prefix):]: v for k, v in stats.items() if k.startswith(prefix)}
        out[key] = method.fit(layer_stats, site, sparsity)
    return out


def calibrate_model(model: nn.Module, tokenizer: Any, texts: list[str], config: SparsityConfig,
                    n_tokens: int = 16384, seq_len: int = 512, batch_size: int = 4,
                    progress: bool = True, data_name: str = "user texts") -> Calibration:
    """Observe ``model`` on ``texts`` and fit ``config``'s thresholds.

    Args:
        texts: calibration documents (see ``sparseffn.data.load_texts``).
        n_tokens: tokens to observe (the first ``n_tokens`` of the concatenated texts).
        seq_len: window length; each forward pass sees [batch_size, seq_len] tokens.

    Returns:
        A Calibration; ``model`` is left unchanged.
    """
    spec = family_of(model)
    method = get_method(config.method, spec)
    num_layers = len(decoder_layers(model))
    stats: dict[str, torch.Tensor] = {}
    tokens = 0
    if method.needs_calibration:
        windows = token_windows(tokenizer, texts, n_tokens, min(seq_len, n_tokens))
        tokens = windows.numel()
        if tokens < MIN_TOKENS:
            raise CalibrationError(
                f"calibration text gave {tokens} tokens; at least {MIN_TOKENS} are needed for "
                "stable thresholds (16k recommended). Pass more text."
            )
        was_training = model.training
        model.eval()
        try:
            stats = collect_statistics(model, spec, method, config.scope, windows, batch_size,
                                       progress)
        finally:
            model.train(was_training)
    if config.allocation == "greedy":
        sparsities = greedy_sparsities(model, spec, method, config, stats, windows[:2],
                                       progress=progress)
    else:
        sparsities = uniform_sparsities(config, method, spec, num_layers)
    return Calibration(
        config=config,
        fingerprint=model_fingerprint(model),
        sparsities=sparsities,
        thresholds=fit_thresholds(method, stats, sparsities),
        stats=stats,
        meta={"versions": _versions(), "tokens": tokens, "seq_len": seq_len, "data": data_name},
    )


def refit(calibration: Calibration, sparsity: float, spec: FamilySpec) -> Calibration:
    """The same calibration at another uniform ``sparsity``, from its stored statistics."""
    config = replace(calibration.config, sparsity=sparsity, layer_sparsity={})
    if config.allocation == "greedy":
        raise CalibrationError(
            "greedy allocation searches on calibration activations, which are not stored; "
            "recalibrate with text to change its sparsity, or use allocation='uniform'"
        )
    method = get_method(config.method, spec)
    sparsities = {key: sparsity for key in calibration.sparsities}
    return replace(calibration, config=config, sparsities=sparsities,
                   thresholds=fit_thresholds(method, calibration.stats, sparsities))
