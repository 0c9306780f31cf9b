"""CHESS: channel-wise thresholds from one importance quantile per layer."""
from __future__ import annotations

import torch

from calibrate.histogram import cdf_at
from sparseffn.methods.base import StatSpec, register_method
from sparseffn.methods.gates import ActThresholdMethod


@register_method
class Chess(ActThresholdMethod):
    """Importance of neuron i is |act(gate_i)| * E|up_i|. One quantile q of it per layer gives
    neuron i the threshold q / E|up_i| on |act(gate_i)|: neurons whose up output is usually
    small are cut more readily. q is found by bisection on the per-channel histograms so that
    the mean fraction of inactive neurons equals the target.
    """

    name = "chess"
    criterion = ("importance \\|act(gate_i)\\| * E\\|up_i\\|, one quantile of it per layer "
                 "(threshold on \\|act(gate_i)\\| of that quantile / E\\|up_i\\|)")
    granularity = "per neuron"
    skips = "rows of up, columns of down (the gate is read densely)"

    def stat_specs(self, scope: str) -> tuple[StatSpec, ...]:
        return (StatSpec("hist_channel.act", "act", "hist_channel"),
                StatSpec("mean.up", "up", "mean_channel"))

    def fit(self, stats: dict[str, torch.Tensor], site: str, sparsity: float) -> torch.Tensor:
        hist = stats["hist_channel.act"]
        scale = stats["mean.up"].double().clamp_min(1e-12)
        if sparsity <= 0:
            return torch.zeros(hist.shape[0])
        lo = torch.log10(torch.tensor(1e-8, dtype=torch.float64)) + torch.log10(scale.min())
        hi = torch.log10(torch.tensor(1e5, dtype=torch.float64)) + torch.log10(scale.max())
        for _ in range(60):  # bisection on log10(q): 60 halvings reach float64 precision
            mid = (lo + hi) / 2
            if cdf_at(hist, 10 ** mid / scale).mean() < sparsity:
                lo = mid
            else:
                hi = mid
        return (10 ** ((lo + hi) / 2) / scale).float()
