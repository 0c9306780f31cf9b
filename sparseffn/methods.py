"""Sparsity criteria, one small class each, behind one interface.

A method names the *sites* it gates in each decoder layer, the calibration statistics it needs
(``StatSpec``), and how to turn them into a threshold for a site at a sparsity level. At run time
the sparse modules apply the thresholds with a strict ``>`` test (see ``sparseffn.modules``).

Sites are projection names (``q_proj`` ... ``down_proj``, fused ``qkv_proj``/``gate_up_proj``),
whose *input* magnitude is gated, or ``act``: the FFN neuron gate |act(gate(x))|, which skips
the neuron's up row and down column.

Signals observed during calibration, per decoder layer:
    attn_in [T, H]   input of the q/k/v projections
    o_in    [T, A]   input of the attention output projection
    mlp_in  [T, H]   input of the gated MLP
    act     [T, I]   act(gate(x))
    up      [T, I]   up(x)
    down_in [T, I]   act(gate(x)) * up(x), the down projection's input
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from calibrate.histogram import CHANNEL_BINS, POOLED_BINS, cdf_at, quantile
from sparseffn.families import FamilySpec

ACT_SITE = "act"


@dataclass(frozen=True)
class StatSpec:
    """One statistic collected per layer.

    Attributes:
        key: name of the statistic in the calibration artifact.
        signal: which observed signal it reads (module docstring).
        kind: ``"hist"`` (pooled), ``"hist_channel"`` (per channel) or ``"mean_channel"``.
        scale_by: a projection whose weight column norms multiply the signal first (WINA).
    """

    key: str
    signal: str
    kind: str
    scale_by: str | None = None

    @property
    def bins(self) -> int:
        return POOLED_BINS if self.kind == "hist" else CHANNEL_BINS


def signal_of(spec: FamilySpec, site: str) -> str:
    """The signal whose magnitude gates a projection-input site."""
    if site in spec.attn_in:
        return "attn_in"
    if site == spec.attn_out:
        return "o_in"
    if site in spec.mlp_in:
        return "mlp_in"
    if site == "down_proj":
        return "down_in"
    raise KeyError(site)


class Method(ABC):
    """Interface of a sparsity criterion."""

    name: str
    needs_calibration: bool = True

    def __init__(self, spec: FamilySpec) -> None:
        self.spec = spec

    def sites(self, spec: FamilySpec, scope: str) -> tuple[str, ...]:
        """Gated sites of one decoder layer for ``scope`` in {"mlp", "all"}."""
        return (ACT_SITE,)

    @abstractmethod
    def stat_specs(self, spec: FamilySpec, scope: str) -> tuple[StatSpec, ...]:
        """Statistics to collect per layer."""

    @abstractmethod
    def fit(self, stats: dict[str, torch.Tensor], site: str, sparsity: float) -> torch.Tensor:
        """Threshold for ``site`` at ``sparsity`` from one layer's ``stats``.

        Returns:
            float32 tensor, [] (one threshold) or [C] (per input channel / neuron).
        """


class _InputMethod(Method):
    """Gates each projection's input channels (TEAL, WINA)."""

    def sites(self, spec: FamilySpec, scope: str) -> tuple[str, ...]:
        mlp = (*spec.mlp_in, "down_proj")
        return (*spec.attn_in, spec.attn_out, *mlp) if scope == "all" else mlp


class Teal(_InputMethod):
    """|x_i| > t per projection input (TEAL): one threshold per layer and projection."""

    name = "teal"

    def stat_specs(self, spec: FamilySpec, scope: str) -> tuple[StatSpec, ...]:
        signals = dict.fromkeys(signal_of(spec, s) for s in self.sites(spec, scope))
        return tuple(StatSpec(f"hist.{sig}", sig, "hist") for sig in signals)

    def fit(self, stats: dict[str, torch.Tensor], site: str, sparsity: float) -> torch.Tensor:
        return quantile(stats[f"hist.{signal_of(self.spec, site)}"], sparsity)[0]


class Wina(_InputMethod):
    """|x_i| * ||W[:, i]||_2 > t (WINA): per-channel thresholds t / ||W[:, i]|| on |x_i|."""

    name = "wina"

    def stat_specs(self, spec: FamilySpec, scope: str) -> tuple[StatSpec, ...]:
        return tuple(StatSpec(f"hist.{site}", signal_of(spec, site), "hist", scale_by=site)
                     for site in self.sites(spec, scope))

    def fit(self, stats: dict[str, torch.Tensor], site: str, sparsity: float) -> torch.Tensor:
        tau = quantile(stats[f"hist.{site}"], sparsity)[0]
        return tau / stats[f"colnorm.{site}"].clamp_min(1e-12)


class Cats(Method):
    """|act(gate(x))| > t with one threshold per layer (CATS)."""

    name = "cats"

    def stat_specs(self, spec: FamilySpec, scope: str) -> tuple[StatSpec, ...]:
        return (StatSpec("hist.act", "act", "hist"),)

    def fit(self, stats: dict[str, torch.Tensor], site: str, sparsity: float) -> torch.Tensor:
        return quantile(stats["hist.act"], sparsity)[0]


class Chess(Method):
    """Channel-wise thresholds from one importance quantile per layer (CHESS).

    Importance of neuron i is |act(gate_i)| * E|up_i|. One quantile q of it per layer gives
    neuron i the threshold q / E|up_i| on |act(gate_i)|: neurons whose up output is usually
    small are cut more readily. q is found by bisection on the per-channel histograms so that
    the mean fraction of inactive neurons equals the target.
    """

    name = "chess"

    def stat_specs(self, spec: FamilySpec, scope: str) -> tuple[StatSpec, ...]:
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


class TopK(Method):
    """The k largest |act(gate(x))| of each token stay active; exact per token, no calibration."""

    name = "topk"
    needs_calibration = False

    def stat_specs(self, spec: FamilySpec, scope: str) -> tuple[StatSpec, ...]:
        return ()

    def fit(self, stats: dict[str, torch.Tensor], site: str, sparsity: float) -> torch.Tensor:
        # The "threshold" of top-k is the fraction of neurons switched off; the module turns
        # it into k for its width.
        return torch.tensor(float(sparsity))


class Predictor(Method):
    """Neuron i is active when a trained low-rank predictor's score B (A x) is above the
    layer's threshold (Deja Vu, PowerInfer); skips gate rows too. Trained by
    ``calibrate.predictor``, whose score quantiles are this method's statistics."""

    name = "predictor"

    def stat_specs(self, spec: FamilySpec, scope: str) -> tuple[StatSpec, ...]:
        return ()  # the predictor trainer records its own statistics

    def fit(self, stats: dict[str, torch.Tensor], site: str, sparsity: float) -> torch.Tensor:
        return threshold_from_grid(stats[SCORE_GRID_KEY], sparsity)


#: Statistic of the predictor method: quantiles of its scores on the calibration text.
SCORE_GRID_KEY = "score_grid"


def threshold_from_grid(grid: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Score threshold leaving ``sparsity`` of the scores at or below it, from their quantiles
    ``grid`` [G] at 0, 1/(G-1), ..., 1 (float32 []); -inf at sparsity 0, so every neuron stays
    and the MLP is exactly dense."""
    if sparsity <= 0:
        return torch.tensor(float("-inf"))
    pos = sparsity * (grid.numel() - 1)
    lo = min(int(pos), grid.numel() - 2)
    frac = pos - lo
    return (grid[lo] + frac * (grid[lo + 1] - grid[lo])).float()


def get_method(name: str, spec: FamilySpec) -> Method:
    """The method called ``name``, bound to the model family ``spec``."""
    classes = {"teal": Teal, "wina": Wina, "cats": Cats, "chess": Chess, "topk": TopK,
               "predictor": Predictor}
    return classes[name](spec)
