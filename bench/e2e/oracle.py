"""What reading only the needed bytes buys the unmodified model, measured rather than computed.

An "oracle" model reads exactly the weight bytes a sparse model at sparsity s needs, with dense
cuBLAS GEMVs over weights compacted ahead of time, as if it knew every token's active inputs
before the step began: the model's own structure (one cuBLAS call per projection), paying
nothing to find the active rows. Timed in the same harness as dense and as our kernels, it
separates what the byte limit promises from what per-call costs and the rest of the step
leave of it. It is a reference, not a bound: our kernels group projections and can beat it.

Three byte patterns, those of the criteria:
- ``all`` (teal/wina over all seven projections): every projection reads the first
  (1 - s) * K inputs of its weight (a contiguous slice, so the gather is a view).
- ``mlp`` (teal/wina with ``scope="mlp"``): the same for gate, up and down only.
- ``neurons`` (cats/chess): gate read whole, the first (1 - s) * I rows of up and columns of
  down.

The outputs are meaningless (inputs are dropped, not selected by activity); only speed counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparseffn.families import activation, decoder_layers, family_of

SCOPES = ("all", "mlp", "neurons")


class _SlicedLinear(nn.Module):
    """y = x[..., :keep] @ W[:, :keep]^T, the compacted weight stored contiguous."""

    def __init__(self, base: nn.Linear, keep: int) -> None:
        super().__init__()
        self.base = base
        self.keep = keep
        self.weight = nn.Parameter(base.weight[:, :keep].contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., K] -> [..., N]
        return F.linear(x[..., :self.keep], self.weight)


class _SlicedMLP(nn.Module):
    """down(act(gate(x))[..., :keep] * up_keep(x)), reading keep up rows and down columns."""

    def __init__(self, base: nn.Module, keep: int, act: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.keep = keep
        self.act = act
        self.up = nn.Parameter(base.up_proj.weight[:keep].contiguous(), requires_grad=False)
        self.down = nn.Parameter(base.down_proj.weight[:, :keep].contiguous(),
                                 requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., H] -> [..., H]
        h = self.act(self.base.gate_proj(x))[..., :self.keep] * F.linear(x, self.up)
        return F.linear(h, self.down)


@dataclass
class OracleReport:
    """The fields of a SparsityReport the benchmark rows read, for the oracle's byte pattern."""

    overall: float
    ffn_bytes_skipped: float
    all_bytes_skipped: float


def install_oracle(model: nn.Module, scope: str, sparsity: float) -> OracleReport:
    """Swap ``model``'s projections for compacted ones at ``sparsity``; undo with
    ``remove_oracle``. Families with fused projections (phi3) are not covered."""
    if scope not in SCOPES:
        raise ValueError(f"oracle scope must be one of {SCOPES}, got {scope!r}")
    spec = family_of(model)
    if spec.fused_gate_up or len(spec.attn_in) != 3:
        raise ValueError(f"the oracle needs separate q/k/v and gate/up projections; "
                         f"{spec.name} fuses them")
    attn_bytes = mlp_bytes = up_down = 0
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        attn_bytes += sum(getattr(attn, n).weight.numel() for n in spec.linear_sites
                          if hasattr(attn, n))
        mlp_bytes += sum(getattr(mlp, n).weight.numel() for n in ("gate_proj", "up_proj",
                                                                   "down_proj"))
        if scope in ("all", "mlp"):
            for parent in (attn, mlp) if scope == "all" else (mlp,):
                for name in spec.linear_sites:
                    lin = getattr(parent, name, None)
                    if isinstance(lin, nn.Linear):
                        keep = max(1, round((1 - sparsity) * lin.in_features))
                        setattr(parent, name, _SlicedLinear(lin, keep))
        else:
            up_down += 2 * mlp.up_proj.weight.numel()
            keep = max(1, round((1 - sparsity) * mlp.up_proj.out_features))
            layer.mlp = _SlicedMLP(mlp, keep, activation(spec, mlp))
    if scope == "all":
        return OracleReport(sparsity, sparsity, sparsity)
    if scope == "mlp":
        return OracleReport(sparsity, sparsity, sparsity * mlp_bytes / (mlp_bytes + attn_bytes))
    skipped = sparsity * up_down
    return OracleReport(sparsity, skipped / mlp_bytes, skipped / (mlp_bytes + attn_bytes))


def remove_oracle(model: nn.Module) -> None:
    """Put the original projections (and MLPs) back."""
    for layer in decoder_layers(model):
        if isinstance(layer.mlp, _SlicedMLP):
            layer.mlp = layer.mlp.base
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, _SlicedLinear):
                    setattr(parent, name, child.base)
