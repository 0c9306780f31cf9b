"""How many weight rows a batch of per-token sets needs: the union of the sequences' active
inputs at each position, measured on real text, against the independence estimate that the
CUDA batch probe (``sparseffn.cuda_probe``) times the kernels at.

    python -m bench.quality.batch_union --methods teal:all --batches 2 4 8 16 \\
        --csv docs/results/batch_union_smollm2.csv

The built-in SmolLM2-135M is calibrated on Austen at ``--sparsity``, then runs teacher-forced
(reference path) on held-out windows of Austen and news, batched as in
``bench.quality.batch_sharing`` (each batch takes far-apart windows, so its sequences are about
unrelated passages). A forward pre-hook on every gated projection records which inputs are
nonzero (the reference path zeroes the dropped ones). Per projection kind it reports the
per-token active fraction a and, per batch B, the fraction of inputs at least one of the B
sequences needs at a position, beside 1 - (1 - a)^B, the union of independent sets.
"""
from __future__ import annotations

import sys
from collections import defaultdict

import torch

import sparseffn
from bench.quality.batch_sharing import DOMAINS, batch_args, held_out_windows, interleaved
from sparseffn.eval.sweep import parse_method, write_csv
from sparseffn.modules import SparseModule


def union_fraction(active: torch.Tensor, batch: int) -> float:
    """active bool [N, T, C] (N sequences) -> the mean over groups of ``batch`` consecutive
    sequences and positions of the fraction of C needed by at least one of them."""
    n = active.shape[0] - active.shape[0] % batch
    return active[:n].reshape(n // batch, batch, *active.shape[1:]).any(1).float().mean().item()


def record_inputs(model: torch.nn.Module) -> tuple[dict[str, list[torch.Tensor]], list]:
    """Forward pre-hooks on every projection a sparse module wraps: kind -> [bool [N, T, C]]."""
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks = []
    for module in model.modules():
        if not isinstance(module, SparseModule):
            continue
        for name, lin in module.base.named_modules():
            if isinstance(lin, torch.nn.Linear):
                kind = name or module.sites[0]  # a SparseLinear's base is the Linear itself
                hooks.append(lin.register_forward_pre_hook(
                    lambda _, args, kind=kind: seen[kind].append(args[0] != 0)))
    return seen, hooks


def main(argv: list[str] | None = None) -> int:
    a = batch_args("bench.quality.batch_union", __doc__, ["teal:all"], [2, 4, 8, 16], 16, 128,
                   argv)
    model, tok = sparseffn.load_builtin_model()
    held_out = held_out_windows(tok, a)
    rows = []
    for spec in a.methods:
        sparseffn.sparsify(model, sparsity=a.sparsity, calibration="austen", tokenizer=tok,
                           n_tokens=a.calib_tokens, kernel_mode="never", progress=False,
                           **parse_method(spec))
        for domain, windows in held_out.items():
            for batch in a.batches:
                seen, hooks = record_inputs(model)
                with torch.no_grad():
                    for chunk in interleaved(windows, batch).split(batch):
                        model(chunk)
                for h in hooks:
                    h.remove()
                for kind, masks in seen.items():  # one [B, T, C] per layer and batch
                    active = torch.stack(masks).float().mean().item()
                    union = sum(union_fraction(m, batch) for m in masks) / len(masks)
                    rows.append({"method": spec, "domain": DOMAINS[domain], "kind": kind,
                                 "batch": batch, "per_token_active": round(active, 4),
                                 "union": round(union, 4),
                                 "independent_union": round(1 - (1 - active) ** batch, 4)})
                    print(f"{spec:9s} {DOMAINS[domain]:12s} {kind:10s} B={batch:2d}  active "
                          f"{active:.3f}  union {union:.3f}  independent "
                          f"{1 - (1 - active) ** batch:.3f}", flush=True)
        sparseffn.unsparsify(model)
    if a.csv:
        write_csv(rows, a.csv, {})
    return 0


if __name__ == "__main__":
    sys.exit(main())
