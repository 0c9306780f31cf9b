"""Probe: what a low-rank term for the dropped input channels (R-Sparse's idea) buys TEAL's
criterion at equal bytes, before it becomes a method.

    python -m bench.quality.lowrank --points plain:0.5 svd:0.55:0.05 aware:0.55:0.05 \
        --csv lowrank.csv

On the built-in SmolLM2-135M, with forward hooks on the dense model: every projection input
keeps the entries above one threshold per layer and input (the target quantile of |x| on the
calibration text, dense activations; the same for all seven projections), and the projections
that read one input (q/k/v, gate/up) get one rank-r term for what it drops:
y = W x_kept + A (B x_dropped), B shared by the stacked weights [W_q; W_k; W_v] (or gate/up).
A point ``kind:sparsity:extra`` gives that term ``extra`` of the stacked weights' elements,
r = extra * out * in / (out + in), so it reads 1 - sparsity + extra of the dense bytes.

- ``svd``: A B = the top-r singular part of the stacked W (R-Sparse's choice).
- ``aware``: the rank-r A B closest to W on the dropped part's own second moment
  S = E[x_d x_d^T] (calibration text at that threshold): the top-r singular part of W S^1/2,
  mapped back by S^-1/2, which minimises E||W x_d - A B x_d||^2.
- ``plain``: no term (``extra`` 0).

Perplexity on 16 held-out windows of Austen (in-domain) and of news (another domain).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from bench.quality import heldout
from bench.quality.heldout import DOMAINS
from sparseffn.eval.perplexity import perplexity

KINDS = ("plain", "svd", "aware")


def groups(layer: nn.Module) -> dict[str, list[nn.Linear]]:
    """The projections of one decoder layer, grouped by the input they read."""
    a, m = layer.self_attn, layer.mlp
    return {"attn": [a.q_proj, a.k_proj, a.v_proj], "o": [a.o_proj],
            "mlp": [m.gate_proj, m.up_proj], "down": [m.down_proj]}


def sample_inputs(model: nn.Module, windows: torch.Tensor, stride: int = 2
                  ) -> dict[tuple[int, str], torch.Tensor]:
    """Every ``stride``-th token's input to each group (float32 [T, in]), dense model."""
    out: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for g, mods in groups(layer).items():
            handles.append(mods[0].register_forward_pre_hook(
                lambda mod, args, key=(i, g): out.setdefault(key, []).append(
                    args[0].detach().reshape(-1, args[0].shape[-1])[::stride].float())))
    heldout.run_hooked(model, windows, handles)
    return {k: torch.cat(v) for k, v in out.items()}


def low_rank(weight: torch.Tensor, dropped: torch.Tensor, rank: int, kind: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [out, r], B [r, in]) for the stacked ``weight`` [out, in] (fp64 math)."""
    w = weight.double()
    if kind == "svd":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return (u[:, :rank] * s[:rank]).float(), vh[:rank].float()
    x = dropped.double()
    lam, vec = torch.linalg.eigh(x.T @ x / x.shape[0])
    lam = lam.clamp_min(lam.max() * 1e-6)  # S is singular where x_d never reaches
    half, inv_half = (vec * lam.sqrt()) @ vec.T, (vec / lam.sqrt()) @ vec.T
    u, s, vh = torch.linalg.svd(w @ half, full_matrices=False)
    return (u[:, :rank] * s[:rank]).float(), (vh[:rank] @ inv_half).float()


def install(model: nn.Module, samples: dict, kind: str, sparsity: float, extra: float
            ) -> tuple[list, int]:
    """Hooks for one point; returns (handles, low-rank elements added)."""
    handles, added = [], 0
    for i, layer in enumerate(model.model.layers):
        for g, mods in groups(layer).items():
            x = samples[(i, g)]
            t = torch.quantile(x.abs().flatten()[::max(1, x.numel() // 4_000_000)], sparsity)
            w = torch.cat([m.weight.detach() for m in mods])
            out_f, in_f = w.shape
            rank = int(round(extra * out_f * in_f / (out_f + in_f))) if kind != "plain" else 0
            ab = low_rank(w, torch.where(x.abs() > t, 0, x), rank, kind) if rank else None
            added += rank * (out_f + in_f)
            shared: dict[str, torch.Tensor] = {}
            offsets = [0]
            for m in mods:
                offsets.append(offsets[-1] + m.weight.shape[0])
            for j, m in enumerate(mods):
                def hook(mod, args, out, t=t, ab=ab, j=j, shared=shared, offsets=offsets):
                    x_in = args[0]
                    keep = x_in.abs() > t
                    y = F.linear(torch.where(keep, x_in, 0), mod.weight, mod.bias)
                    if ab is None:
                        return y
                    if j == 0:  # the first reader computes B x_dropped for the group
                        shared["z"] = torch.where(keep, 0, x_in) @ ab[1].T
                    return y + shared["z"] @ ab[0][offsets[j]:offsets[j + 1]].T
                handles.append(m.register_forward_hook(hook))
    return handles, added


def run(a: argparse.Namespace) -> list[dict]:
    model, tok, evals, dense = heldout.setup(a)
    samples = sample_inputs(model, heldout.calibration_windows(tok, a))
    total = sum(m.weight.numel() for layer in model.model.layers
                for mods in groups(layer).values() for m in mods)
    rows = []
    for point in a.points:
        kind, s, extra = (point.split(":") + ["0"])[:3]
        s, extra = float(s), float(extra)
        t0 = time.time()
        handles, added = install(model, samples, kind, s, extra)
        try:
            ppl = {d: perplexity(model, w) for d, w in evals.items()}
        finally:
            for h in handles:
                h.remove()
        row = {"kind": kind, "sparsity": s, "extra": extra,
               "read_fraction": round(1 - s + added / total, 4)}
        heldout.add_perplexities(row, ppl, dense)
        rows.append(row)
        print(f"{kind:<6} s={s:.2f} extra={extra:.2f} reads {row['read_fraction']:.3f}: "
              + ", ".join(f"{DOMAINS[d]} +{100 * row[f'increase_{d}']:.1f}%" for d in DOMAINS)
              + f"  [{time.time() - t0:.0f} s]", flush=True)
        heldout.write(rows, a)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.quality.lowrank", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", nargs="+", required=True,
                   help="kind:sparsity[:extra] with kind in " + ", ".join(KINDS))
    heldout.add_args(p)
    a = p.parse_args(argv)
    for point in a.points:
        parts = point.split(":")
        if parts[0] not in KINDS or not 2 <= len(parts) <= 3:
            p.error(f"point {point!r}: the form is kind:sparsity[:extra], kind in {KINDS}")
    run(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
