"""Probe: what a PCA rotation of the attention and MLP inputs buys an input criterion (LaRoSA's
idea), before it becomes a method.

    python -m bench.quality.rotation --variants plain block-mlp --sparsities 0.4 0.5 \
        --csv rotation.csv

On the built-in SmolLM2-135M, with forward hooks on the dense model (no sparseffn patching):
every projection's input keeps the entries whose magnitude passes one threshold per layer and
site (TEAL's criterion over all seven projections, or with ``--scope mlp`` over gate/up and
down only), the threshold being the target quantile of
that magnitude on the calibration text (Austen, dense activations). Variants:

- ``plain``: the magnitudes of the input itself.
- ``layer``: the attention input (input_layernorm's output, q/k/v's x) and the MLP input
  (post_attention_layernorm's output, gate/up's x) are first rotated, z = x Q, by the
  eigenvectors Q [d, d] of that site's uncentred second moment E[x^T x] on the calibration text,
  one Q per layer and site; the kept entries of z are rotated back, x' = z_kept Q^T. As a
  method, W Q would be stored for q/k/v/gate/up and only z = x Q computed at run time: one dense
  d x d product per rotated site and token, counted here in ``read_fraction``.
- ``layer-mlp`` / ``layer-attn``: only the MLP (or only the attention) input rotated.
- ``residual``: one Q per layer for both of its inputs, from the second moment of the
  normalised residual stream (RMSNorm's output without its weight, both norms of the layer
  pooled). As a method the residual stream would be carried in layer l's basis through layer l
  (the norm weights folded into q/k/v/gate/up, o/down writing in that basis): one d x d change
  of basis per layer and token at run time, half the ``layer`` variant's.
- ``block-mlp``: the MLP input only, rotated by a block-diagonal Q: the eigenvectors of each
  ``--block`` x ``--block`` diagonal block of the second moment (consecutive channels), so the
  run-time product costs d x block per token instead of d x d.
- ``block-mlp-down``: as ``block-mlp``, and down_proj's input (the intermediate activations)
  rotated the same way (blocks of its second moment over the sampled calibration tokens), at
  intermediate x block more per token.
- ``random-mlp``: the control for ``block-mlp``: random orthogonal blocks (seeded), which mix
  channels as much without concentrating their energy.
- ``global``: one Q for every layer, from the second moment of the normalised residual stream
  (RMSNorm's output without its weight) pooled over layers: the rotation that could be folded
  into the weights exactly (embedding, o/down outputs, q/k/v/gate/up inputs), costing nothing
  at run time.

o_proj's and down_proj's inputs are never rotated. ``read_fraction`` is the weight bytes a
decode step reads over the dense model's projection bytes (rotations included), and
``byte_limit_speedup`` its inverse: compare variants at equal bytes, not at equal sparsity.
Perplexity on held-out Austen (*Persuasion*, in-domain) and news (another domain).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from bench.quality import heldout
from bench.quality.heldout import DOMAINS
from sparseffn.eval.perplexity import perplexity

VARIANTS = {"plain": (), "layer": ("attn", "mlp"), "layer-mlp": ("mlp",),
            "layer-attn": ("attn",), "residual": ("attn", "mlp"), "global": ("attn", "mlp"),
            "block-mlp": ("mlp",), "block-mlp-down": ("mlp", "down"), "random-mlp": ("mlp",)}
#: Variants that rotate the normalised residual stream without the norm's weight (which a
#: method would fold into the weights it feeds), not the weighted norm output.
UNSCALED = ("residual", "global")
#: Run-time d x d products per layer and token: one per rotated site, one per layer for the
#: residual stream's change of basis, none for the one global basis.
RUNTIME_ROTATIONS = {"plain": 0, "layer": 2, "layer-mlp": 1, "layer-attn": 1, "residual": 1,
                     "global": 0}
#: Block-diagonal variants: each rotated site costs width x block per token instead.
BLOCK_VARIANTS = ("block-mlp", "block-mlp-down", "random-mlp")


def _modules(layer: nn.Module) -> dict[str, nn.Module]:
    """The module whose output (attn, mlp: the norms) or input (o, down) each site gates."""
    return {"attn": layer.input_layernorm, "mlp": layer.post_attention_layernorm,
            "o": layer.self_attn.o_proj, "down": layer.mlp.down_proj}


class Activations:
    """Dense-model statistics per (layer, site): uncentred second moments of the rotatable
    sites, with and without the norm's weight (fp64 [d, d]), and every ``stride``-th token's
    input (float32 [T, width]) for the thresholds."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, stride: int = 4) -> None:
        self.layers = model.model.layers
        self.moment: dict[tuple[int, str], torch.Tensor] = {}
        self.moment_unscaled: dict[tuple[int, str], torch.Tensor] = {}
        samples: dict[tuple[int, str], list[torch.Tensor]] = {}
        handles = []
        for i, layer in enumerate(self.layers):
            for site, module in _modules(layer).items():
                if site in ("attn", "mlp"):
                    handles.append(module.register_forward_hook(self._norm_hook(i, site,
                                                                                samples, stride)))
                else:
                    handles.append(module.register_forward_pre_hook(
                        lambda mod, args, key=(i, site): samples.setdefault(key, []).append(
                            args[0].detach().reshape(-1, args[0].shape[-1])[::stride].float())))
        heldout.run_hooked(model, windows, handles)
        self.samples = {k: torch.cat(v) for k, v in samples.items()}

    def _norm_hook(self, i: int, site: str, samples: dict, stride: int):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = out.detach().reshape(-1, out.shape[-1]).double()
            xu = x / module.weight.detach().double()
            key = (i, site)
            self.moment[key] = self.moment.get(key, 0) + x.T @ x
            self.moment_unscaled[key] = self.moment_unscaled.get(key, 0) + xu.T @ xu
            samples.setdefault(key, []).append(out.detach().reshape(-1, out.shape[-1])[::stride]
                                               .float())
        return hook

    def gamma(self, i: int, site: str) -> torch.Tensor:
        return _modules(self.layers[i])[site].weight.detach().float()


def _block_diagonal(d: int, block: int, make) -> torch.Tensor:
    """fp64 [d, d] with ``make(a, b)`` [b - a, b - a] as its diagonal block over channels
    [a, b) (the last block may be smaller)."""
    q = torch.zeros(d, d, dtype=torch.float64)
    for a in range(0, d, block):
        b = min(d, a + block)
        q[a:b, a:b] = make(a, b)
    return q


def block_eigenvectors(moment: torch.Tensor, block: int) -> torch.Tensor:
    """Block-diagonal orthogonal Q [d, d]: each diagonal block of ``moment`` [d, d] rotated to
    its own eigenvectors."""
    return _block_diagonal(moment.shape[0], block,
                           lambda a, b: torch.linalg.eigh(moment[a:b, a:b].double())[1])


def rotations(acts: Activations, variant: str, block: int = 64
              ) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, site): Q [d, d] float32} for the sites the variant rotates."""
    sites = VARIANTS[variant]
    n = len(acts.layers)
    if variant == "random-mlp":
        gen = torch.Generator().manual_seed(0)
        d = acts.moment[(0, "mlp")].shape[0]
        return {(i, "mlp"): _block_diagonal(d, block, lambda a, b: torch.linalg.qr(
            torch.randn(b - a, b - a, generator=gen, dtype=torch.float64))[0]).float()
            for i in range(n)}
    if variant in BLOCK_VARIANTS:
        out = {(i, "mlp"): block_eigenvectors(acts.moment[(i, "mlp")], block).float()
               for i in range(n)}
        if "down" in sites:
            for i in range(n):
                x = acts.samples[(i, "down")].double()
                out[(i, "down")] = block_eigenvectors(x.T @ x, block).float()
        return out
    if variant == "global":
        pooled = sum(acts.moment_unscaled.values())
        q = torch.linalg.eigh(pooled)[1].float()
        return {(i, s): q for i in range(n) for s in sites}
    if variant == "residual":
        per_layer = [torch.linalg.eigh(acts.moment_unscaled[(i, "attn")]
                                       + acts.moment_unscaled[(i, "mlp")])[1].float()
                     for i in range(n)]
        return {(i, s): per_layer[i] for i in range(n) for s in sites}
    return {(i, s): torch.linalg.eigh(acts.moment[(i, s)])[1].float()
            for i in range(len(acts.layers)) for s in sites}


def _basis(x: torch.Tensor, q: torch.Tensor | None, gamma: torch.Tensor, unscaled: bool
           ) -> torch.Tensor:
    if q is None:
        return x
    return (x / gamma if unscaled else x) @ q


def install(model: nn.Module, acts: Activations, qs: dict, variant: str, sparsity: float,
            scope: str = "all") -> list:
    """Hooks that sparsify every site of ``scope`` (all: the inputs of all seven projections;
    mlp: gate/up's and down's) at ``sparsity``, thresholds from the calibration samples in the
    site's basis; returns their handles."""
    unscaled = variant in UNSCALED
    handles = []
    for i, layer in enumerate(acts.layers):
        for site, module in _modules(layer).items():
            if scope == "mlp" and site not in ("mlp", "down"):
                continue
            q = qs.get((i, site))
            g = acts.gamma(i, site) if site in ("attn", "mlp") else None
            z = _basis(acts.samples[(i, site)], q, g, unscaled).abs().flatten()
            thr = torch.quantile(z[:: max(1, z.numel() // 4_000_000)], sparsity)
            if site in ("attn", "mlp"):
                def hook(mod, args, out, q=q, g=g, thr=thr):
                    zz = _basis(out, q, g, unscaled)
                    zz = torch.where(zz.abs() > thr, zz, 0)
                    if q is None:
                        return zz
                    back = zz @ q.T
                    return back * g if unscaled else back
                handles.append(module.register_forward_hook(hook))
            else:
                def pre_hook(mod, args, q=q, thr=thr):
                    zz = args[0] if q is None else args[0] @ q
                    zz = torch.where(zz.abs() > thr, zz, 0)
                    return (zz if q is None else zz @ q.T,)
                handles.append(module.register_forward_pre_hook(pre_hook))
    return handles


def read_fraction(model: nn.Module, variant: str, sparsity: float, block: int = 64,
                  scope: str = "all") -> float:
    """Weight bytes read per decode step over the dense projections' (rotations included);
    with scope mlp the attention projections are read whole."""
    dense = read = 0
    for layer in model.model.layers:
        for name, m in layer.named_modules():
            if isinstance(m, nn.Linear):
                dense += m.weight.numel()
                gated = scope == "all" or name.startswith("mlp.")
                read += (1 - sparsity) * m.weight.numel() if gated else m.weight.numel()
        d = layer.input_layernorm.weight.numel()
        inter = layer.mlp.down_proj.in_features
        if variant in BLOCK_VARIANTS:
            read += d * min(block, d) + (inter * min(block, inter)
                                         if variant == "block-mlp-down" else 0)
        else:
            read += d * d * RUNTIME_ROTATIONS[variant]
    return read / dense


def run(a: argparse.Namespace) -> list[dict]:
    model, tok, evals, dense = heldout.setup(a)
    acts = Activations(model, heldout.calibration_windows(tok, a))
    rows = []
    for variant in a.variants:
        qs = rotations(acts, variant, a.block)
        for s in a.sparsities:
            t0 = time.time()
            handles = install(model, acts, qs, variant, s, a.scope)
            try:
                ppl = {d: perplexity(model, w) for d, w in evals.items()}
            finally:
                for h in handles:
                    h.remove()
            frac = read_fraction(model, variant, s, a.block, a.scope)
            row = {"variant": variant, "scope": a.scope,
                   "block": a.block if variant in BLOCK_VARIANTS else "",
                   "sparsity": s, "read_fraction": round(frac, 4),
                   "byte_limit_speedup": round(1 / frac, 3)}
            heldout.add_perplexities(row, ppl, dense)
            rows.append(row)
            print(f"{variant:<10} s={s:.2f} reads {frac:.3f} (x{1 / frac:.2f}): "
                  + ", ".join(f"{DOMAINS[d]} {ppl[d]:.2f} (+{100 * (ppl[d] / dense[d] - 1):.1f}%)"
                              for d in DOMAINS) + f"  [{time.time() - t0:.0f} s]", flush=True)
            heldout.write(rows, a)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.quality.rotation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5])
    p.add_argument("--block", type=int, default=64, help="block size of the block variants")
    p.add_argument("--scope", default="all", choices=["all", "mlp"],
                   help="all seven projections' inputs, or gate/up's and down's only")
    heldout.add_args(p)
    a = p.parse_args(argv)
    if a.scope == "mlp" and any("attn" in VARIANTS[v] for v in a.variants):
        p.error(f"--scope mlp leaves the attention input dense: the variants "
                f"{[v for v in a.variants if 'attn' in VARIANTS[v]]} rotate it; drop them")
    run(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
