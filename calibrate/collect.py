"""Observe activations with forward hooks and accumulate streaming statistics.

Nothing is kept per token: each batch updates count histograms and channel sums on the layer's
own device (so ``device_map``-split models work), and the finished statistics move to the CPU.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from calibrate.histogram import new_histogram, update_histogram
from sparseffn.errors import CalibrationError
from sparseffn.families import (FamilySpec, activation, decoder_layers, gate_and_up, layer_attn,
                                layer_mlp)
from sparseffn.methods import Method, StatSpec

MLP_SIGNALS = ("mlp_in", "act", "up", "down_in")


def _column_norms(module: nn.Module, site: str) -> torch.Tensor:
    """||W[:, i]||_2 of the projection ``site`` inside ``module`` [in_features], fp32."""
    weight = getattr(module, site).weight
    return weight.detach().float().norm(dim=0)


class LayerObserver:
    """Accumulates one decoder layer's statistics from hooked signals."""

    def __init__(self, layer_idx: int, layer: nn.Module, spec: FamilySpec,
                 specs: tuple[StatSpec, ...]) -> None:
        self.idx = layer_idx
        self.spec = spec
        self.mlp = layer_mlp(layer)
        self.attn = layer_attn(layer)
        device = self.mlp.down_proj.weight.device
        self.specs = specs
        self.stats: dict[str, torch.Tensor] = {}
        self.scales: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.nan = torch.zeros((), dtype=torch.bool, device=device)
        for s in specs:
            if s.scale_by is not None:
                owner = self.mlp if s.signal in MLP_SIGNALS else self.attn
                self.scales[s.key] = _column_norms(owner, s.scale_by).to(device)
            if s.kind == "mean_channel":
                self.stats[s.key] = torch.zeros(0, dtype=torch.float64, device=device)
                self.counts[s.key] = torch.zeros((), dtype=torch.float64, device=device)

    def signals_needed(self) -> set[str]:
        return {s.signal for s in self.specs}

    def observe(self, name: str, value: torch.Tensor) -> None:
        """Add one signal [..., C] to every statistic that reads it."""
        value = value.detach().reshape(-1, value.shape[-1]).abs()
        self.nan |= ~torch.isfinite(value).all()
        for s in self.specs:
            if s.signal != name:
                continue
            if s.kind == "mean_channel":
                total = value.double().sum(0)
                self.stats[s.key] = total if self.stats[s.key].numel() == 0 \
                    else self.stats[s.key] + total
                self.counts[s.key] += value.shape[0]
                continue
            scaled = value.float() * self.scales[s.key] if s.key in self.scales else value
            if s.key not in self.stats:
                rows = 1 if s.kind == "hist" else value.shape[-1]
                self.stats[s.key] = new_histogram(rows, s.bins, device=value.device)
            update_histogram(self.stats[s.key], scaled)

    def mlp_hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        needed = self.signals_needed()
        if "mlp_in" in needed:
            self.observe("mlp_in", x)
        if needed & {"act", "up", "down_in"}:
            gate, up = gate_and_up(self.spec, self.mlp, x, x)
            act = activation(self.spec, self.mlp)(gate)
            for name, value in (("act", act), ("up", up)):
                if name in needed:
                    self.observe(name, value)
            if "down_in" in needed:
                self.observe("down_in", act * up)

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


def _hook(fn: Callable[[torch.Tensor], None]):
    def hook(module: nn.Module, args: tuple) -> None:
        fn(args[0])
    return hook


@torch.no_grad()
def collect_statistics(model: nn.Module, spec: FamilySpec, method: Method, scope: str,
                       windows: torch.Tensor, batch_size: int = 4,
                       progress: bool = True) -> dict[str, torch.Tensor]:
    """Run ``windows`` [N, L] of token ids through ``model`` and return the method's statistics.

    Returns:
        ``{"layers.{i}.{stat key}": tensor}`` on the CPU.
    """
    specs = method.stat_specs(spec, scope)
    layers = decoder_layers(model)
    observers = [LayerObserver(i, layer, spec, specs) for i, layer in enumerate(layers)]
    handles = []
    try:
        for obs in observers:
            needed = obs.signals_needed()
            if needed & set(MLP_SIGNALS):
                handles.append(obs.mlp.register_forward_pre_hook(obs.mlp_hook))
            if "attn_in" in needed:
                target = getattr(obs.attn, spec.attn_in[0])
                handles.append(target.register_forward_pre_hook(
                    _hook(lambda x, o=obs: o.observe("attn_in", x))))
            if "o_in" in needed:
                target = getattr(obs.attn, spec.attn_out)
                handles.append(target.register_forward_pre_hook(
                    _hook(lambda x, o=obs: o.observe("o_in", x))))
        device = model.get_input_embeddings().weight.device
        batches = windows.split(batch_size)
        for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    stats: dict[str, torch.Tensor] = {}
    for obs in observers:
        stats.update(obs.finish())
    return stats
