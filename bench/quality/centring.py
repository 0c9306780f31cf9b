"""Probe: what centring each input channel before the magnitude test (SCAP's mode-centring)
buys TEAL's criterion at equal measured bytes, before it becomes an option.

    python -m bench.quality.centring --levels 0.45 0.5 0.55 --centres none mode mean median \
        --csv centring.csv

On the built-in SmolLM2-135M, with forward pre-hooks on the dense model: every projection
input x gets a per-channel centre c fitted on the calibration text (dense activations), and
keeps the entries with |x - c| > t, where t is one threshold per layer and input (the level's
quantile of |x - c| on the calibration text, the same for all seven projections). A dropped
entry is replaced by its centre, so y = W c + W (x - c) on the kept channels: the product stays
exact for what it keeps and W c is a constant (a bias; free at run time).

- ``none``: c = 0 (TEAL's test).
- ``mode``: the peak of each channel's value histogram (256 bins between its 1st and 99th
  percentile, smoothed over 5 bins), SCAP's choice.
- ``mean``, ``median``: the channel's mean or median.

Measured sparsity (the dropped fraction of the seven projections' input rows, weighted by each
projection's size) and perplexity are read per domain, on 16 held-out windows of Austen
(in-domain) and of news (another domain).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

from bench.quality import heldout
from bench.quality.lowrank import groups, sample_inputs

CENTRES = ("none", "mode", "mean", "median")


def channel_mode(x: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Per-channel peak of the value histogram of x [T, C] -> [C]."""
    lo, hi = torch.quantile(x[::4], 0.01, dim=0), torch.quantile(x[::4], 0.99, dim=0)
    width = (hi - lo).clamp_min(1e-12)
    idx = ((x - lo) / width * bins).floor().clamp(0, bins - 1).long()
    counts = torch.zeros(x.shape[1], bins).scatter_add_(1, idx.T, torch.ones(idx.T.shape))
    counts = F.avg_pool1d(counts[:, None], 5, 1, 2, count_include_pad=False)[:, 0]
    return lo + (counts.argmax(1) + 0.5) / bins * width


def centre_of(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "none":
        return torch.zeros(x.shape[1])
    if kind == "mode":
        return channel_mode(x)
    if kind == "mean":
        return x.mean(0)
    return x.median(0).values


def install(model: nn.Module, samples: dict, centres: dict, level: float, tally: list[float]
            ) -> list:
    """Pre-hooks for one point; ``tally`` accumulates [dropped, total] weight-row bytes."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        for g, mods in groups(layer).items():
            x, c = samples[(i, g)], centres[(i, g)]
            t = torch.quantile((x - c).abs().flatten()[::max(1, x.numel() // 4_000_000)], level)
            out_rows = sum(m.weight.shape[0] for m in mods)

            def hook(mod, args, c=c, t=t, out_rows=out_rows, first=True):
                v = args[0]
                keep = (v - c).abs() > t
                if first:  # the group's readers see one input: count it once
                    tally[0] += float((~keep).sum()) * out_rows
                    tally[1] += keep.numel() * out_rows
                return (torch.where(keep, v, c.to(v.dtype)),)
            for j, m in enumerate(mods):
                handles.append(m.register_forward_pre_hook(
                    lambda mod, args, j=j, hook=hook: hook(mod, args, first=j == 0)))
    return handles


def run(a: argparse.Namespace) -> list[dict]:
    model, tok, evals, dense = heldout.setup(a)
    samples = sample_inputs(model, heldout.calibration_windows(tok, a))
    return heldout.hooked_sweep(
        a, model, evals, dense, "centre", a.centres,
        lambda kind: {key: centre_of(x, kind) for key, x in samples.items()},
        lambda centres, level, tally: install(model, samples, centres, level, tally))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.quality.centring", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", nargs="+", type=float, default=[0.45, 0.5, 0.55])
    p.add_argument("--centres", nargs="+", default=list(CENTRES), choices=CENTRES)
    heldout.add_args(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
