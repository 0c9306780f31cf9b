"""One input-sparse GEMV, called repeatedly, for a kernel profiler (a GPU).

Prints the GPU time of each kernel of a call (the GEMV and its finishing kernel, separately)
from torch.profiler, averaged over the calls; under Nsight Compute, the calls after the warm-up
are the ones to capture:

    python scripts/profile_gemv.py --shape 4096x14336 --sparsity 0.9
    ncu --profile-from-start off --clock-control none --set full --launch-count 2 \\
        python scripts/profile_gemv.py --shape 4096x14336 --sparsity 0.9 --no-torch-profile

(with ``--no-torch-profile`` the profiler range, cudaProfilerStart to Stop, holds only the timed
calls, not the compilation and tuning before them). ``--sparsity 1`` makes nothing active.

Each call reads another copy of the weight, so no call finds its weights in L2, as in a model.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

# The repository root: neither bench nor (on a lent GPU machine) the library is pip-installed.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import triton_kernels as tk  # noqa: E402
from bench.kernels import cases as cs  # noqa: E402
from bench.kernels.sweep import DTYPES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="4096x14336", help="KxN")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--copies", type=int, default=16)
    ap.add_argument("--calls", type=int, default=64)
    ap.add_argument("--no-torch-profile", action="store_true",
                    help="only make the calls (for an outside profiler)")
    args = ap.parse_args(argv)
    if not tk.kernels_available("cuda"):
        print("needs a CUDA GPU with Triton", file=sys.stderr)
        return 2
    K, N = (int(v) for v in args.shape.split("x"))
    dtype = DTYPES[args.dtype]
    case = cs.Case("input_sparse", "profile", K, N)
    w_ts = [cs.sparse_weights(case, cs.dense_weights(case, dtype, "cuda"))[0]
            for _ in range(args.copies)]
    p = cs.make_point(case, 1, args.sparsity, dtype, (w_ts[0],))
    for w in w_ts:  # warm-up: compile and tune (40 launches or fewer with one K range)
        tk.input_sparse_gemv(p.x, w, threshold=p.threshold)
    torch.cuda.synchronize()

    def calls() -> None:
        for i in range(args.calls):
            tk.input_sparse_gemv(p.x, w_ts[i % len(w_ts)], threshold=p.threshold)
        torch.cuda.synchronize()

    chosen = [str(e["chosen"]) for e in tk.tuning_log()]
    print(f"launch config: {chosen[-1] if chosen else 'untuned default'}")
    if args.no_torch_profile:
        torch.cuda.profiler.start()
        calls()
        torch.cuda.profiler.stop()
        return 0
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        calls()
    per_kernel: dict[str, list[float]] = defaultdict(list)
    for e in prof.events():
        if e.device_type.name == "CUDA":
            per_kernel[e.name].append(e.time_range.elapsed_us())  # the kernel's own span
    print(f"{args.shape} {args.dtype} sparsity {args.sparsity} (active {p.active_fraction:.3f}), "
          f"{args.calls} calls on {torch.cuda.get_device_name(0)}")
    for name, times in sorted(per_kernel.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {name[:60]:60s} {len(times):4d} x {sum(times) / len(times):7.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
