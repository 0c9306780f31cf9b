"""CATS: |act(gate(x))| > t with one threshold per layer."""
from __future__ import annotations

import torch

from calibrate.histogram import quantile
from sparseffn.methods.base import StatSpec, register_method
from sparseffn.methods.gates import ActThresholdMethod


@register_method
class Cats(ActThresholdMethod):
    name = "cats"
    criterion = "\\|act(gate(x))\\| above a threshold"
    granularity = "per layer"
    skips = "rows of up, columns of down (the gate is read densely)"

    def stat_specs(self, scope: str) -> tuple[StatSpec, ...]:
        return (StatSpec("hist.act", "act", "hist"),)

    def fit(self, stats: dict[str, torch.Tensor], site: str, sparsity: float) -> torch.Tensor:
        return quantile(stats["hist.act"], sparsity)[0]
