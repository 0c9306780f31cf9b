"""WINA: |x_i| * ||W[:, i]||_2 > t, i.e. per-channel thresholds t / ||W[:, i]|| on |x_i|."""
from __future__ import annotations

import torch

from calibrate.histogram import quantile
from sparseffn.families import signal_of
from sparseffn.methods.base import InputMethod, StatSpec, register_method


@register_method
class Wina(InputMethod):
    name = "wina"
    criterion = "\\|x_i\\| times the column norm of W"
    granularity = "per layer and projection (per-channel thresholds)"
    skips = "as teal"

    def stat_specs(self, scope: str) -> tuple[StatSpec, ...]:
        return tuple(StatSpec(f"hist.{site}", signal_of(self.spec, site), "hist", scale_by=site)
                     for site in self.sites(scope))

    def fit(self, stats: dict[str, torch.Tensor], site: str, sparsity: float) -> torch.Tensor:
        tau = quantile(stats[f"hist.{site}"], sparsity)[0]
        return tau / stats[f"colnorm.{site}"].clamp_min(1e-12)
