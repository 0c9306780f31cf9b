"""Measured sparsity of a sparsified model since the last reset.

Every gated site counts its active entries on the device; reading a report is the only host
sync. Sparsity of a site is the fraction of its gated entries that were off, which is the
fraction of the weight bytes it covers that a decode step skips. Per layer and overall values
weight sites by those bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sparseffn.families import decoder_layers, layer_attn, layer_mlp
from sparseffn.methods import ACT_SITE
from sparseffn.modules import SparseModule
from sparseffn.patching import patch_state, sparse_modules


@dataclass
class SiteSparsity:
    layer: int
    site: str
    sparsity: float  # measured fraction of gated entries off
    target: float  # allocated by the calibration
    covered_elements: int  # weight elements a skipped entry saves, summed over the site
    observed: int  # entries counted


@dataclass
class SparsityReport:
    """Measured sparsity per site, per layer and overall.

    Attributes:
        sites: one entry per gated site.
        overall: skipped fraction of the bytes of the sparsified projections.
        ffn_bytes_skipped: skipped fraction of all FFN (gate, up, down) weight bytes, net of
            the neuron predictors' weights, which every step reads.
        all_bytes_skipped: skipped fraction of all projection (attention + FFN) weight bytes.
    """

    sites: list[SiteSparsity]
    overall: float
    ffn_bytes_skipped: float
    all_bytes_skipped: float

    def per_layer(self) -> list[float]:
        """Bytes-weighted measured sparsity of each layer's gated sites."""
        layers = sorted({s.layer for s in self.sites})
        return [_weighted([s for s in self.sites if s.layer == i]) for i in layers]

    @property
    def observed(self) -> bool:
        """Whether any token went through the model since the counters were reset."""
        return any(s.observed for s in self.sites)

    def table(self) -> str:
        if not self.observed:
            return ("no tokens observed yet: run the model (or turn counting back on with "
                    "sparseffn.track_sparsity(model, True)), then read the report")
        lines = [f"{'layer':>5} {'site':<13} {'measured':>8} {'target':>7}"]
        lines += [f"{s.layer:>5} {s.site:<13} "
                  f"{(f'{s.sparsity:.3f}' if s.observed else '-'):>8} {s.target:>7.3f}"
                  for s in self.sites]
        lines.append(f"overall {self.overall:.3f}; FFN bytes skipped {self.ffn_bytes_skipped:.3f}; "
                     f"all projection bytes skipped {self.all_bytes_skipped:.3f}")
        return "\n".join(lines)


def _weighted(sites: list[SiteSparsity]) -> float:
    total = sum(s.covered_elements for s in sites)
    return sum(s.sparsity * s.covered_elements for s in sites) / total if total else 0.0


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Measured sparsity since the last ``reset_sparsity_stats`` (or since patching)."""
    state = patch_state(model)
    sites = []
    for layer, module in sparse_modules(model):
        for name, counter in module.counters.items():
            total = int(counter.total)
            off = 1.0 - int(counter.active) / total if total else 0.0
            target = state.calibration.sparsities.get(f"layers.{layer}.{name}", 0.0)
            sites.append(SiteSparsity(layer, name, off, target, counter.covered_elements, total))
    extra = sum(module.overhead_elements() for _, module in sparse_modules(model))
    ffn_total = attn_total = 0
    for layer in decoder_layers(model):
        mlp = layer_mlp(layer)
        mlp = mlp.base if isinstance(mlp, SparseModule) else mlp
        ffn_total += sum(p.numel() for p in mlp.parameters())
        attn = layer_attn(layer)
        attn_total += sum(m.weight.numel() for m in attn.modules() if isinstance(m, nn.Linear))
    skipped = sum(s.sparsity * s.covered_elements for s in sites) - extra
    ffn_skipped = sum(s.sparsity * s.covered_elements for s in sites
                      if s.site in (ACT_SITE, "down_proj", *state.spec.mlp_in)) - extra
    return SparsityReport(sites, _weighted(sites), ffn_skipped / ffn_total,
                          skipped / (ffn_total + attn_total))


def reset_sparsity_stats(model: nn.Module) -> None:
    """Zero every site's counters."""
    for _, module in sparse_modules(model):
        for counter in module.counters.values():
            counter.reset()


def track_sparsity(model: nn.Module, enabled: bool) -> None:
    """Turn counting on or off (off saves two reductions per site per forward)."""
    for _, module in sparse_modules(model):
        module.track = enabled
