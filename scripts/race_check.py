"""Repeat the chained-call check of the input-sparse GEMV many times on one GPU and count the
calls whose output is outside the rounding bound, per (batch, dtype). A stress run for
intermittent ordering bugs that one pass of the test suite may miss:

    python scripts/race_check.py --chains 100
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

# The repository root, where the package is not pip-installed (e.g. on a lent GPU machine
# without build dependencies).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from triton_kernels import LaunchConfig  # noqa: E402
from triton_kernels.input_sparse.op import pick_config, triton_impl  # noqa: E402
from triton_kernels.testing import gemv_bound, weight  # noqa: E402  (the tests' bound, weights)


def chain_failures(batch: int, dtype: torch.dtype, K: int, calls: int) -> int:
    """Calls of one chain (each x the previous y, no host sync) with elements off the bound."""
    w_t = weight(K, K, dtype, "cuda") * 1.1  # keeps |x| about constant over the chain
    thr = torch.full((), 0.3, device="cuda")
    xs = [torch.randn(batch, K, device="cuda").to(dtype)]
    for _ in range(calls):
        out = torch.full((batch, K), float("nan"), device="cuda", dtype=dtype)
        xs.append(triton_impl(xs[-1], w_t, thr, out=out))
    cfg = pick_config(w_t, batch)  # tuned by the first call: a lookup
    bad = 0
    for i in range(1, len(xs)):
        # the kernel's test, against the threshold's fp32 value (not the literal 0.3)
        xa = torch.where(xs[i - 1].double().abs() > thr.double(), xs[i - 1].double(), 0.0)
        ref = xa @ w_t.double()
        bound = gemv_bound(ref, xa.abs() @ w_t.double().abs(), dtype)
        off = ((xs[i].double() - ref).abs() > bound) | xs[i].isnan()
        if off.any():
            bad += 1
            _describe(xs[i].double(), ref, xa, w_t.double(), off, cfg)
    return bad


def _describe(y: torch.Tensor, ref: torch.Tensor, xa: torch.Tensor, w: torch.Tensor,
              off: torch.Tensor, cfg: LaunchConfig) -> None:
    """Which sequences and columns are off, and whether the error is one K range's partial
    sum missing or added twice (K ranges of the tuned config's span)."""
    span = cfg.span or w.shape[0]
    diff = y - ref
    rows, cols = off.nonzero(as_tuple=True)
    print(f"  off: {int(off.sum())} elements, NaN {int(y.isnan().sum())}, sequences "
          f"{sorted(set(rows.tolist()))}, columns {int(cols.min())}..{int(cols.max())}, "
          f"config {cfg}", flush=True)
    best = []
    for k0 in range(0, w.shape[0], span):
        part = xa[:, k0:k0 + span] @ w[k0:k0 + span]
        for sign, what in ((-1.0, "missing"), (1.0, "doubled")):
            res = (diff - sign * part)[off].abs().mean().item()
            best.append((res, k0, what))
    best.sort()
    print(f"  mean |err| on them {diff[off].abs().mean().item():.3g}; best single-range "
          f"explanations (residual, k0, kind): {best[:3]}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--chains", type=int, default=50)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--K", type=int, default=4096)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--dtypes", default="fp32,bf16")
    args = p.parse_args()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for batch in map(int, args.batches.split(",")):
        for dtype in (dtypes[d] for d in args.dtypes.split(",")):
            bad = sum(chain_failures(batch, dtype, args.K, args.calls)
                      for _ in range(args.chains))
            print(f"B={batch} {str(dtype):15s} {bad} of {args.chains * args.calls} calls off "
                  "the bound", flush=True)


if __name__ == "__main__":
    main()
