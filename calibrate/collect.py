"""Observe activations through the sparse wrappers and accumulate streaming statistics.

Calibration runs on the *patched* model: each wrapper reports the quantity it gates, before its
mask, through its ``observe`` callback. With zero thresholds the patched model computes the
dense function, so the first pass sees dense activations; later passes (``calibrate.fit``) see
the activations that upstream sparsity really produces, which is what the thresholds will meet
at run time. Nothing is kept per token: each batch updates count histograms and channel sums on
the layer's own device (so ``device_map``-split models work); results move to the CPU.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from calibrate.histogram import new_histogram, update_histogram
from sparseffn.errors import CalibrationError
from sparseffn.families import FamilySpec, decoder_layers, layer_attn, layer_mlp
from sparseffn.methods import Method, StatSpec, signal_of
from sparseffn.modules import SparseGatedMLP, SparseLinear
from sparseffn.patching import sparse_modules

MLP_SIGNALS = ("mlp_in", "act", "up", "down_in")


class LayerObserver:
    """Accumulates one decoder layer's statistics from the signals its wrappers report."""

    def __init__(self, layer_idx: int, layer: nn.Module, spec: FamilySpec,
                 specs: tuple[StatSpec, ...]) -> None:
        self.idx = layer_idx
        self.spec = spec
        mlp = layer_mlp(layer)
        base_mlp = mlp.base if isinstance(mlp, SparseGatedMLP) else mlp
        attn = layer_attn(layer)
        device = base_mlp.down_proj.weight.device
        self.specs = specs
        self.stats: dict[str, torch.Tensor] = {}
        self.scales: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.nan = torch.zeros((), dtype=torch.bool, device=device)
        for s in specs:
            if s.scale_by is not None:  # WINA: column norms of the projection's weight
                owner = base_mlp if s.signal in MLP_SIGNALS else attn
                proj = getattr(owner, s.scale_by)
                weight = (proj.base if isinstance(proj, SparseLinear) else proj).weight
                self.scales[s.key] = weight.detach().float().norm(dim=0).to(device)
            if s.kind == "mean_channel":
                self.counts[s.key] = torch.zeros((), dtype=torch.float64, device=device)

    def signals_needed(self) -> set[str]:
        return {s.signal for s in self.specs}

    def report(self, site: str, value: torch.Tensor) -> None:
        """Callback for the wrappers: ``site`` is a signal name or an attention site."""
        if site in self.spec.attn_in[1:]:
            return  # k/v see the same input as q: count it once
        name = signal_of(self.spec, site) if site in self.spec.linear_sites else site
        if name in self.signals_needed():
            self.observe(name, value)

    def observe(self, name: str, value: torch.Tensor) -> None:
        """Add one signal [..., C] to every statistic that reads it."""
        value = value.detach().reshape(-1, value.shape[-1]).abs()
        # A NaN or inf anywhere makes the sum non-finite; far cheaper than isfinite().all().
        self.nan |= ~torch.isfinite(value.sum(dtype=torch.float32))
        for s in self.specs:
            if s.signal != name:
                continue
            if s.kind == "mean_channel":
                total = value.double().sum(0)
                self.stats[s.key] = self.stats[s.key] + total if s.key in self.stats else total
                self.counts[s.key] += value.shape[0]
                continue
            scaled = value.float() * self.scales[s.key] if s.key in self.scales else value
            if s.key not in self.stats:
                rows = 1 if s.kind == "hist" else value.shape[-1]
                self.stats[s.key] = new_histogram(rows, s.bins, device=value.device)
            update_histogram(self.stats[s.key], scaled)

    def finish(self) -> dict[str, torch.Tensor]:
        """CPU statistics with layer-prefixed keys; column norms of WINA sites included."""
        if bool(self.nan):
            raise CalibrationError(
                f"non-finite activations in decoder layer {self.idx} during calibration; the "
                "model overflows in this dtype (load it in float32 or bfloat16) or its weights "
                "hold NaN/inf"
            )
        out = {}
        for key, value in self.stats.items():
            if key in self.counts:
                value = value / self.counts[key].clamp_min(1)
            out[f"layers.{self.idx}.{key}"] = value.cpu()
        for key, norms in self.scales.items():
            site = key.split(".", 1)[1]
            out[f"layers.{self.idx}.colnorm.{site}"] = norms.cpu()
        return out


@torch.no_grad()
def run_observed(model: nn.Module, callbacks: list[tuple[nn.Module, Callable]],
                 windows: torch.Tensor, batch_size: int, progress: bool, desc: str) -> None:
    """Run ``windows`` [N, L] through ``model`` with each wrapper's ``observe`` set to its
    callback and counting off (calibration passes are not measurements); both are restored
    afterwards, also on error."""
    try:
        for module, callback in callbacks:
            module.observe = callback
            module.track = False
        device = model.get_input_embeddings().weight.device
        # The decoder without its LM head: no observer looks at logits, and on a small model
        # the head is a large share of the work (SmolLM2-135M: 49152 x 576, about a fifth of
        # the FLOPs of a calibration pass).
        body = getattr(model, "base_model", model)
        with torch.no_grad():
            for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch",
                              disable=not progress):
                body(input_ids=batch.to(device), use_cache=False)
    finally:
        for module, _ in callbacks:
            module.observe = None
            module.track = True


def collect_statistics(model: nn.Module, spec: FamilySpec, method: Method, scope: str,
                       windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
                       desc: str = "calibrating") -> dict[str, torch.Tensor]:
    """Run ``windows`` [N, L] of token ids through the patched ``model``; return statistics.

    Returns:
        ``{"layers.{i}.{stat key}": tensor}`` on the CPU.
    """
    specs = method.stat_specs(spec, scope)
    layers = decoder_layers(model)
    observers = [LayerObserver(i, layer, spec, specs) for i, layer in enumerate(layers)]
    run_observed(model, [(m, observers[i].report) for i, m in sparse_modules(model)], windows,
                 batch_size, progress, desc)
    stats: dict[str, torch.Tensor] = {}
    for obs in observers:
        stats.update(obs.finish())
    return stats
