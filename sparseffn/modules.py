"""Sparse drop-in modules that wrap a model's own projections and MLP.

Each keeps the original module as ``base`` (undo is putting ``base`` back) and holds its
thresholds as buffers, so a forward pass never leaves the device to decide what is active. This
is the reference path: masked dense torch ops, any batch and sequence length, any dtype and
device. Threshold tests are strict: an input (or neuron) is active when its magnitude is
``> threshold``, so a zero threshold keeps everything but exact zeros.

Every gated site counts active and total entries (int64 buffers, updated on the device) for
measured-sparsity reports; ``track = False`` turns counting off. During calibration an
``observe(site, value)`` callback sees each gated quantity before its mask, so thresholds are
fitted on exactly what they are compared with at run time (upstream sparsity included).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sparseffn.families import FamilySpec, activation, gate_and_up


class SiteCounter(nn.Module):
    """Active/total counts of one gated site, plus the weight elements it covers."""

    def __init__(self, covered_elements: int) -> None:
        super().__init__()
        self.covered_elements = covered_elements
        self.register_buffer("active", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("total", torch.zeros((), dtype=torch.int64), persistent=False)

    def count(self, mask: torch.Tensor) -> None:
        self.active += mask.sum()
        self.total += mask.numel()

    def reset(self) -> None:
        self.active.zero_()
        self.total.zero_()


def _mask_input(x: torch.Tensor, threshold: torch.Tensor, counter: SiteCounter,
                track: bool) -> torch.Tensor:
    mask = x.abs() > threshold
    if track:
        counter.count(mask)
    return torch.where(mask, x, 0)


class SparseLinear(nn.Module):
    """``base`` (an nn.Linear) applied to its input with small-magnitude channels zeroed.

    Buffers:
        threshold: float32 [] or [in_features]; channel i is active when |x_i| > threshold_i.
    """

    def __init__(self, base: nn.Linear, threshold: torch.Tensor, site: str) -> None:
        super().__init__()
        self.base = base
        self.track = True
        self.observe: Callable[[str, torch.Tensor], None] | None = None
        self.site = site  # the attribute name this wrapper replaces, e.g. "q_proj"
        self.register_buffer("threshold", threshold.detach().float().to(base.weight.device))
        self.counter = SiteCounter(base.weight.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]."""
        if self.observe is not None:
            self.observe(self.site, x)
        return self.base(_mask_input(x, self.threshold, self.counter, self.track))

    def set_threshold(self, threshold: torch.Tensor) -> None:
        self.threshold = threshold.detach().float().to(self.threshold.device)

    def extra_repr(self) -> str:
        return f"site={self.site}, threshold_shape={tuple(self.threshold.shape)}"


class SparseGatedMLP(nn.Module):
    """A gated MLP, down(act(gate(x)) * up(x)), with sparsity at its sites.

    Sites (any subset):
        input sites ``gate_proj``/``up_proj``/``gate_up_proj``/``down_proj``: that projection's
            input channels are gated (TEAL, WINA);
        ``act``: neuron i is active when |act(gate(x))_i| > threshold_i (CATS, CHESS), or is
            among the ``topk`` largest of its token; an inactive neuron skips its up row and
            down column.
    """

    def __init__(self, base: nn.Module, spec: FamilySpec, thresholds: dict[str, torch.Tensor],
                 topk_sparsity: float | None = None) -> None:
        super().__init__()
        self.base = base
        self.spec = spec
        self.track = True
        self.observe: Callable[[str, torch.Tensor], None] | None = None
        self.topk_sparsity = topk_sparsity
        device = base.down_proj.weight.device
        inter, hidden = base.down_proj.weight.shape[1], base.down_proj.weight.shape[0]
        self.intermediate_size = inter
        self.sites = tuple(thresholds) + (("act",) if topk_sparsity is not None else ())
        self.counters = nn.ModuleDict()
        for site in self.sites:
            if site == "act":
                covered = 2 * inter * hidden  # up row + down column per neuron
            elif site == "down_proj":
                covered = base.down_proj.weight.numel()
            else:
                covered = getattr(base, site).weight.numel()
            self.counters[site] = SiteCounter(covered)
        for site, value in thresholds.items():
            self.register_buffer(f"threshold_{site}", value.detach().float().to(device))

    def threshold(self, site: str) -> torch.Tensor | None:
        return getattr(self, f"threshold_{site}", None)

    def set_threshold(self, site: str, value: torch.Tensor) -> None:
        setattr(self, f"threshold_{site}", value.detach().float().to(self.threshold(site).device))

    def _gate_input(self, x: torch.Tensor, site: str) -> torch.Tensor:
        t = self.threshold(site)
        return x if t is None else _mask_input(x, t, self.counters[site], self.track)

    def topk(self) -> int:
        """Neurons kept per token under top-k."""
        return self.intermediate_size - round(self.topk_sparsity * self.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]."""
        observe = self.observe
        if observe is not None:
            observe("mlp_in", x)
        x_gate = self._gate_input(x, self.spec.mlp_in[0])
        x_up = x_gate if self.spec.fused_gate_up else self._gate_input(x, "up_proj")
        gate, up = gate_and_up(self.spec, self.base, x_gate, x_up)
        act = activation(self.spec, self.base)(gate)
        if observe is not None:
            observe("act", act)
            observe("up", up)
        t_act = self.threshold("act")
        if t_act is not None or self.topk_sparsity is not None:
            magnitude = act.abs()
            if t_act is not None:
                mask = magnitude > t_act
            else:
                keep = magnitude.topk(self.topk(), dim=-1).indices
                mask = torch.zeros_like(magnitude, dtype=torch.bool).scatter_(-1, keep, True)
            if self.track:
                self.counters["act"].count(mask)
            h = torch.where(mask, act * up, 0)
        else:
            h = act * up
        if observe is not None:
            observe("down_in", h)
        return self.base.down_proj(self._gate_input(h, "down_proj"))

    def extra_repr(self) -> str:
        return f"sites={self.sites}, topk_sparsity={self.topk_sparsity}"
