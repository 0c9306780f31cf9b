"""Probe: the MLP input sparsified in another orthogonal basis, from calibration activations
or from the weights alone (WINA's transform), at equal measured sparsity.

    python -m bench.quality.basis --levels 0.5 --csv basis.csv

On the built-in SmolLM2-135M, with forward pre-hooks on the dense model's MLPs (attention
untouched): the MLP input x is turned to z = x Q by one full orthogonal Q [H, H] per layer,
z's entries with score <= t are dropped, and gate/up read z_kept Q^T (exactly W x where
nothing is dropped). t is the level's quantile of the score on the calibration text (8192
tokens of Austen), one per layer.

- ``none``: Q = I, score |x| (TEAL's test on the MLP input).
- ``calib``: Q = the eigenvectors of the calibration text's E[x x^T] (LaRoSA's basis, in one
  block), score |z|.
- ``svd_gate``, ``svd_gate_up``: Q = the right singular vectors of W_gate, or of W_gate and
  W_up stacked (WINA's transform: computed from the weights alone, so it cannot learn a
  domain), score |z|.
- ``..._w``: the same bases scored |z_i| * s_i, s_i the singular value, which is the norm of
  column i of W Q (WINA's criterion in its basis).

Q costs H x H elements read per layer and step, which the probe does not count (14% of
Llama-3-8B's gate/up bytes). Measured sparsity (dropped entries of z) and perplexity per
domain, on 16 held-out windows of Austen (in-domain) and of news (another domain).
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from bench.quality import heldout
from bench.quality.lowrank import sample_inputs

BASES = ("none", "calib", "svd_gate", "svd_gate_w", "svd_gate_up", "svd_gate_up_w")


def basis(kind: str, x: torch.Tensor, mlp: nn.Module) -> tuple[torch.Tensor | None,
                                                                torch.Tensor | None]:
    """(Q [H, H] or None for the identity, per-coordinate weights [H] or None) of one layer,
    from its calibration inputs x [T, H] and its MLP."""
    if kind == "none":
        return None, None
    if kind == "calib":
        x = x.double()
        return torch.linalg.eigh(x.T @ x / len(x))[1].float(), None
    w = mlp.gate_proj.weight.detach().double()
    if kind.startswith("svd_gate_up"):
        w = torch.cat([w, mlp.up_proj.weight.detach().double()])
    _, s, vh = torch.linalg.svd(w, full_matrices=False)
    return vh.T.float(), (s.float() if kind.endswith("_w") else None)


def install(model: nn.Module, samples: dict, bases: dict, level: float, tally: list[float]
            ) -> list:
    """MLP pre-hooks for one point; ``tally`` accumulates [dropped, total] entries of z."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        q, w = bases[i]

        def score(v: torch.Tensor, q=q, w=w) -> tuple[torch.Tensor, torch.Tensor]:
            z = v if q is None else v @ q.to(v.dtype)
            return z, (z.abs() if w is None else z.abs() * w)
        _, s = score(samples[(i, "mlp")])
        t = torch.quantile(s.flatten()[::max(1, s.numel() // 4_000_000)], level)

        def hook(mod, args, q=q, t=t, score=score):
            z, s = score(args[0])
            keep = s > t
            tally[0] += float((~keep).sum())
            tally[1] += keep.numel()
            z = torch.where(keep, z, 0)
            return (z if q is None else z @ q.T.to(z.dtype),)
        handles.append(layer.mlp.register_forward_pre_hook(hook))
    return handles


def run(a: argparse.Namespace) -> list[dict]:
    model, tok, evals, dense = heldout.setup(a)
    samples = sample_inputs(model, heldout.calibration_windows(tok, a))
    return heldout.hooked_sweep(
        a, model, evals, dense, "basis", a.bases,
        lambda kind: {i: basis(kind, samples[(i, "mlp")], layer.mlp)
                      for i, layer in enumerate(model.model.layers)},
        lambda bases, level, tally: install(model, samples, bases, level, tally))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.quality.basis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", nargs="+", type=float, default=[0.5])
    p.add_argument("--bases", nargs="+", default=list(BASES), choices=BASES)
    heldout.add_args(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
