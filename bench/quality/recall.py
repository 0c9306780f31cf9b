"""Probe: how well can anything that skips the gate rows pick each token's important neurons?
Recall of the top-k |act(gate(x)) * up(x)| neurons by the exact gate (CATS's test, the ceiling
of any gate-only guess), by a truncated SVD of the gate (training-free), and by the ``predictor``
method's low-rank network trained from a random or from an SVD start.

    python -m bench.quality.recall --layers 3 15 27 --csv recall.csv

On the built-in SmolLM2-135M (dense): each listed layer's MLP inputs x are collected on 8192
calibration tokens of Austen (training) and 2048 held-out tokens of news (scoring). The truth
is each token's k = I / 2 neurons of largest |act * up|; a guess is the k largest of its score;
recall = the fraction of the truth the guess holds.

- ``gate``: |act(gate(x))| exactly (the gate read densely: what CATS decides by).
- ``svd_r``: |silu(g_r)|, g_r = U_r S_r V_r^T x the rank-r SVD of W_gate (reads r (H + I)).
- ``trained_{random|svd}``: scores B (A x), rank r, trained as ``calibrate.predictor`` trains
  (BCE against the top-k labels, Adam, lr 3e-3, minibatches of 256 tokens) for ``--epochs``,
  from random weights or from the SVD (A = V_r^T, B = U_r S_r).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

import sparseffn
from bench.quality import heldout
from sparseffn.data import builtin_texts, token_windows


def collect(model: nn.Module, windows: torch.Tensor, layers: list[int]
            ) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer: (x [T, H], |act * up| [T, I], |act| [T, I]) of the dense model (float32)."""
    out: dict[int, list] = {i: [] for i in layers}
    handles = []
    for i in layers:
        def hook(mod, args, i=i):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            act = F.silu(F.linear(x, mod.gate_proj.weight.float()))
            out[i].append((x, (act * F.linear(x, mod.up_proj.weight.float())).abs(), act.abs()))
        handles.append(model.model.layers[i].mlp.register_forward_pre_hook(hook))
    heldout.run_hooked(model, windows, handles)
    return {i: tuple(torch.cat(t) for t in zip(*v)) for i, v in out.items()}


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores).scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)


def recall(scores: torch.Tensor, importance: torch.Tensor, k: int) -> float:
    truth = top(importance, k)
    return float((truth * top(scores, k)).sum() / truth.sum())


def train(x: torch.Tensor, labels: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
          epochs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictor's training (BCE on top-k labels, Adam) from (a [r, H], b [I, r])."""
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    opt = torch.optim.Adam([a, b], lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(256):
            loss = F.binary_cross_entropy_with_logits(x[idx] @ a.T @ b.T, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return a.detach(), b.detach()


def run(a: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    model, tok = sparseffn.load_builtin_model()
    fit = collect(model, heldout.calibration_windows(tok, a), a.layers)
    news = token_windows(tok, builtin_texts("news", "eval"), 2048, a.seq_len,
                         purpose="evaluation")
    held = collect(model, news, a.layers)
    rows = []
    for i in a.layers:
        x, importance, act = held[i]
        inter = importance.shape[1]
        k = inter // 2
        w = model.model.layers[i].mlp.gate_proj.weight.detach().float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        row = {"layer": i, "gate": round(recall(act, importance, k), 4)}
        for r in a.ranks:
            svd_a, svd_b = vh[:r], u[:, :r] * s[:r]
            row[f"svd_{r}"] = round(recall(F.silu(x @ svd_a.T @ svd_b.T).abs(), importance, k), 4)
            labels = top(fit[i][1], k)
            g = torch.Generator().manual_seed(0)
            starts = {"random": (torch.randn(r, w.shape[1], generator=g) / w.shape[1] ** 0.5,
                                 torch.randn(inter, r, generator=g) / r ** 0.5),
                      "svd": (svd_a, svd_b)}
            for name, (a0, b0) in starts.items():
                pa, pb = train(fit[i][0], labels, a0, b0, a.epochs)
                row[f"trained_{name}_{r}"] = round(recall(x @ pa.T @ pb.T, importance, k), 4)
        rows.append(row)
        print(" ".join(f"{key} {value}" for key, value in row.items()), flush=True)
        heldout.write(rows, a, epochs=str(a.epochs), held_out="news 2048 tokens")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.quality.recall", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", nargs="+", type=int, default=[3, 15, 27])
    p.add_argument("--ranks", nargs="+", type=int, default=[64, 128])
    p.add_argument("--epochs", type=int, default=12)
    heldout.add_args(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
