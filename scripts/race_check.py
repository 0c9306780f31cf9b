"""Repeat the chained-call check of the input-sparse GEMV many times on one GPU and count the
calls whose output is outside the rounding bound, per (variant, batch, dtype). A stress run for
intermittent ordering bugs that one pass of the test suite may miss:

    python scripts/race_check.py --chains 100
"""
from __future__ import annotations

import argparse

import torch

from bench.kernels import cases as cs
from bench.kernels.anatomy import VARIANTS
from triton_kernels.input_sparse import _triton_impl


def chain_failures(batch: int, dtype: torch.dtype, K: int, calls: int, variant: str) -> int:
    """Calls of one chain (each x the previous y, no host sync) with elements off the bound."""
    w_t = (torch.randn(K, K, device="cuda") / K ** 0.5 * 1.1).to(dtype)
    thr = torch.full((), 0.3, device="cuda")
    xs = [torch.randn(batch, K, device="cuda").to(dtype)]
    with cs.switched(VARIANTS[variant]):
        for _ in range(calls):
            out = torch.full((batch, K), float("nan"), device="cuda", dtype=dtype)
            xs.append(_triton_impl(xs[-1], w_t, thr, out=out))
    bad = 0
    for i in range(1, len(xs)):
        xa = torch.where(xs[i - 1].double().abs() > 0.3, xs[i - 1].double(), 0.0)
        ref = xa @ w_t.double()
        # the test suite's bound (tests/kernels/kernel_testlib.py): output rounding plus
        # fp32 accumulation over the active terms
        bound = (torch.finfo(dtype).eps * ref.abs() + 2.0**-16 * (xa.abs() @ w_t.double().abs())
                 + 2.0**-24)
        bad += int(((xs[i].double() - ref).abs() > bound).any() | xs[i].isnan().any())
    return bad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--chains", type=int, default=50)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--K", type=int, default=4096)
    args = p.parse_args()
    for variant in VARIANTS:
        for batch in (1, 4):
            for dtype in (torch.float32, torch.bfloat16):
                bad = sum(chain_failures(batch, dtype, args.K, args.calls, variant)
                          for _ in range(args.chains))
                print(f"{variant:10s} B={batch} {str(dtype):15s} {bad} of "
                      f"{args.chains * args.calls} calls off the bound", flush=True)


if __name__ == "__main__":
    main()
