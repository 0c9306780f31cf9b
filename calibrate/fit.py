"""Threshold fitting: per-site sparsity levels in, per-site thresholds out.

A site key is ``layers.{i}.{site}``. Which function turns a layer's statistics into a threshold
is the caller's (a sparsity method's ``fit``); this module only maps it over the sites and
validates the token ids the statistics are observed on.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from calibrate.errors import CalibrationError

MIN_TOKENS = 1024  # below this, per-channel histograms are too thin to place thresholds

#: ``fit(layer_stats, site, sparsity)`` -> float32 threshold, [] or [C].
FitFn = Callable[[dict[str, torch.Tensor], str, float], torch.Tensor]


def site_key(layer: int, site: str) -> str:
    return f"layers.{layer}.{site}"


def split_key(key: str) -> tuple[int, str]:
    """``"layers.3.up_proj"`` -> (3, "up_proj")."""
    _, layer, site = key.split(".", 2)
    return int(layer), site


def layer_entries(mapping: dict[str, Any], layer: int) -> dict[str, Any]:
    """The entries ``layers.{layer}.{name}`` of ``mapping``, keyed by ``name``."""
    prefix = f"layers.{layer}."
    return {k[len(prefix):]: v for k, v in mapping.items() if k.startswith(prefix)}


def uniform_sparsities(sites: Iterable[str], num_layers: int,
                       level_of_layer: Callable[[int], float]) -> dict[str, float]:
    """Every site of layer i at ``level_of_layer(i)``."""
    sites = tuple(sites)
    return {site_key(i, s): level_of_layer(i) for i in range(num_layers) for s in sites}


def fit_thresholds(fit: FitFn, stats: dict[str, torch.Tensor],
                   sparsities: dict[str, float]) -> dict[str, torch.Tensor]:
    """Threshold per site key for the allocated ``sparsities``, from per-layer ``stats``."""
    out = {}
    for key, sparsity in sparsities.items():
        layer, site = split_key(key)
        out[key] = fit(layer_entries(stats, layer), site, sparsity)
    return out


def as_windows(ids: torch.Tensor) -> torch.Tensor:
    """Validate token ids given directly for calibration: LongTensor [n_windows, window_len]."""
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
        raise CalibrationError(
            f"token ids for calibration must be a non-empty integer tensor [n_windows, "
            f"window_len]; got {ids.dtype} of shape {list(ids.shape)}"
        )
    return ids.long().cpu()


def check_token_count(windows: torch.Tensor) -> None:
    """Refuse calibration on fewer than ``MIN_TOKENS`` tokens."""
    if windows.numel() < MIN_TOKENS:
        raise CalibrationError(
            f"calibration text gave {windows.numel()} tokens; at least {MIN_TOKENS} are needed "
            "for stable thresholds (16k recommended). Pass more text."
        )
