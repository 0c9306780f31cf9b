"""TEAL: |x_i| > t on each projection's input, one threshold per layer and projection."""
from __future__ import annotations

import torch

from calibrate.histogram import quantile
from sparseffn.families import signal_of
from sparseffn.methods.base import InputMethod, StatSpec, register_method


@register_method
class Teal(InputMethod):
    name = "teal"
    criterion = "\\|x\\| of each linear's input above a threshold"
    granularity = "per layer and projection"
    skips = "columns of q, k, v, o, gate, up, down (`scope=\"all\"`) or of gate, up, down"

    def stat_specs(self, scope: str) -> tuple[StatSpec, ...]:
        signals = dict.fromkeys(signal_of(self.spec, s) for s in self.sites(scope))
        return tuple(StatSpec(f"hist.{sig}", sig, "hist") for sig in signals)

    def fit(self, stats: dict[str, torch.Tensor], site: str, sparsity: float) -> torch.Tensor:
        return quantile(stats[f"hist.{signal_of(self.spec, site)}"], sparsity)[0]
