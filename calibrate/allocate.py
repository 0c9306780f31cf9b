"""TEAL-style greedy allocation of sparsity among the projections of each decoder layer.

Projections differ in how much their sparsity hurts: in each layer, starting from zero, raise by
one step the site whose increase adds the least layer-output error per weight byte skipped,
until the bytes-weighted mean sparsity reaches the layer's target. Errors are measured by
running the real (patched) decoder layer on captured calibration inputs, so attention, norms
and residuals are all included.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from calibrate.artifact import layer_entries
from sparseffn.config import SparsityConfig
from sparseffn.families import FamilySpec, decoder_layers
from sparseffn.methods import Method
from sparseffn.patching import set_site_threshold, site_counter
from sparseffn.report import track_sparsity

MAX_SITE_SPARSITY = 0.95


def _capture_layer_inputs(model: nn.Module, windows: torch.Tensor) -> list[tuple[tuple, dict]]:
    """(args, kwargs) each decoder layer received for ``windows`` [N, L]."""
    layers = decoder_layers(model)
    captured: list[Any] = [None] * len(layers)
    handles = []

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured[i] = (args, dict(kwargs))
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(make_hook(i), with_kwargs=True))
    try:
        device = model.get_input_embeddings().weight.device
        model(input_ids=windows.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _run(layer: nn.Module, inputs: tuple[tuple, dict]) -> torch.Tensor:
    out = layer(*inputs[0], **inputs[1])
    return (out[0] if isinstance(out, tuple) else out).float()


@torch.no_grad()
def greedy_sparsities(model: nn.Module, spec: FamilySpec, method: Method, config: SparsityConfig,
                      stats: dict[str, torch.Tensor], windows: torch.Tensor,
                      progress: bool = True) -> dict[str, float]:
    """Per-site sparsities ``{"layers.{i}.{site}": s}`` meeting each layer's target in bytes.

    ``model`` must be patched with every site of ``method``; its thresholds are changed.
    """
    layers = decoder_layers(model)
    sites = method.sites(spec, config.scope)
    inputs = _capture_layer_inputs(model, windows)
    track_sparsity(model, False)  # search passes are not measurements
    result: dict[str, float] = {}
    for i in tqdm(range(len(layers)), desc="greedy allocation", disable=not progress):
        layer = layers[i]
        layer_stats = layer_entries(stats, i)
        size = {}
        for s in sites:
            size[s] = site_counter(layer, s).covered_elements
        total = sum(size.values())
        target = config.target_for_layer(i) * total
        level = dict.fromkeys(sites, 0.0)
        dense = _run(layer, inputs[i])
        scale = dense.pow(2).mean().clamp_min(1e-30)
        current_err = 0.0
        while sum(level[s] * size[s] for s in sites) < target - 1e-9:
            best = None
            needed = target - sum(level[s] * size[s] for s in sites)
            for s in sites:
                if level[s] >= MAX_SITE_SPARSITY:
                    continue
                step = min(config.greedy_step, MAX_SITE_SPARSITY - level[s], needed / size[s])
                set_site_threshold(layer, s, method.fit(layer_stats, s, level[s] + step))
                err = float((_run(layer, inputs[i]) - dense).pow(2).mean() / scale)
                set_site_threshold(layer, s, method.fit(layer_stats, s, level[s]))
                cost = (err - current_err) / (step * size[s])
                if best is None or cost < best[0]:
                    best = (cost, s, step, err)
            if best is None:  # every site at its cap: the target is out of reach
                break
            _, s, step, current_err = best
            level[s] += step
            set_site_threshold(layer, s, method.fit(layer_stats, s, level[s]))
        result.update({f"layers.{i}.{s}": level[s] for s in sites})
    return result
