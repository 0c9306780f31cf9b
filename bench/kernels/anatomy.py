"""Where the time of one input-sparse GEMV call goes: its fixed cost and its streaming rate.

    python -m bench.kernels.anatomy --json docs/results/anatomy_h200.json

For each shape, in one run on one GPU and with the sweep's timing (CUDA graphs over enough weight
copies to defeat the L2, medians):

- ``launch_floor``: an empty Triton kernel per call, i.e. what one graph node costs;
- ``finish``: the finishing kernel alone (converts and zeroes [B, N] fp32 sums);
- ``nothing_active``: the GEMV with an all-False mask: launch, compaction prologue, atomics of
  zeros and finish, no weight read;
- the GEMV at several sparsities, and a least-squares line time = fixed + bytes / rate through
  them: ``fixed_us`` is the intercept, ``rate_tbps`` the marginal bandwidth;
- dense ``F.linear`` on the same weights, and the read bandwidth of the device.

The issue's targets (1.0x at sparsity 0, 1.8x at 0.5, 5x at 0.9 against dense) translate into a
largest fixed cost at the measured rate, printed beside the measured one.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

import triton_kernels as tk

from . import cases as cs
from .sweep import DTYPES, bandwidths, n_copies, time_calls

TARGETS = {0.0: 1.0, 0.5: 1.8, 0.9: 5.0}


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def _empty_kernel():
    import triton

    @triton.jit
    def empty(ptr):
        pass

    return empty


def measure_shape(K: int, N: int, dtype: torch.dtype, sparsities: list[float],
                  replays: int, read_bw: float, device: str = "cuda") -> dict:
    """Every quantity of the module docstring for one [K -> N] GEMV at batch 1."""
    from triton_kernels.input_sparse.kernel import FINISH_BLOCK, _finish_kernel

    case = cs.Case("input_sparse", "anatomy", K, N)
    n = n_copies(case, dtype, max(sparsities), 24 * 2**30, device)
    dense = [cs.dense_weights(case, dtype, device) for _ in range(n)]
    w_ts = [cs.sparse_weights(case, d)[0] for d in dense]
    x = torch.randn(1, K, device=device).to(dtype)
    out = {"K": K, "N": N, "dtype": str(dtype).replace("torch.", ""), "copies": n}

    def timed(calls: list) -> float:
        return time_calls(calls, replays, device)

    out["dense_us"] = timed([lambda d=d: F.linear(x, d[0]) for d in dense])
    empty, token = _empty_kernel(), torch.zeros(1, device=device)
    out["launch_floor_us"] = timed([lambda: empty[(1,)](token)] * n)
    sums = torch.zeros(N, device=device)
    y = torch.empty(1, N, dtype=dtype, device=device)
    out["finish_us"] = timed(
        [lambda: _finish_kernel[(-(-N // FINISH_BLOCK),)](sums, y, N, BLOCK=FINISH_BLOCK)] * n)
    none = torch.zeros(1, K, dtype=torch.bool, device=device)
    points = {s: cs.make_point(case, 1, s, dtype, (w_ts[0],)) for s in sparsities}
    out["nothing_active_us"] = timed(
        [lambda w=w: tk.input_sparse_gemv(x, w, mask=none) for w in w_ts])
    xs, ys, errs = [], [], []
    for s, p in points.items():
        ref = tk.input_sparse_gemv_ref(p.x, w_ts[0], threshold=p.threshold)
        errs.append(cs.rel_error(tk.input_sparse_gemv(p.x, w_ts[0], threshold=p.threshold), ref))
        us = timed([lambda w=w: tk.input_sparse_gemv(p.x, w, threshold=p.threshold)
                    for w in w_ts])
        out[f"us_at_{s}"] = us
        out[f"speedup_at_{s}"] = out["dense_us"] / us
        xs.append(cs.needed_bytes(case, 1, dtype, p.active_fraction))
        ys.append(us)
    fixed, slope = fit_line(xs, ys)
    # slope in us per byte: 1e-6 / slope is TB/s
    out.update(fixed_us=fixed, rate_tbps=1e-6 / slope if slope else float("inf"),
               max_rel_err=max(errs), correct=max(errs) <= cs.REL_TOL[dtype])
    dense_bytes = cs.needed_bytes(case, 1, dtype, None)
    rate = out["rate_tbps"] * 1e12
    # Target at sparsity s: fixed + (1 - s) * bytes / rate <= dense / target.
    out["fixed_us_allowed_by_target"] = {str(s): out["dense_us"] / t - (1 - s) * dense_bytes
                                         / rate * 1e6 for s, t in TARGETS.items()}
    out["dense_bound_us"] = dense_bytes / read_bw * 1e6
    return out


def report(rows: list[dict]) -> str:
    lines = ["| shape | nothing active us | fixed us (fit) | rate TB/s | "
             "speedup s=0 / 0.5 / 0.9 | correct |", "|---|---|---|---|---|---|"]
    for r in rows:
        sp = " / ".join(f"{r[f'speedup_at_{s}']:.2f}x" for s in (0.0, 0.5, 0.9)
                        if f"speedup_at_{s}" in r)
        lines.append(f"| {r['K']}->{r['N']} {r['dtype']} | {r['nothing_active_us']:.2f} | "
                     f"{r['fixed_us']:.2f} | {r['rate_tbps']:.2f} | {sp} | {r['correct']} |")
    for r in rows:
        allowed = ", ".join(f"s={s}: {a:.2f}" for s, a in r["fixed_us_allowed_by_target"].items())
        lines.append(f"\n{r['K']}->{r['N']}: dense {r['dense_us']:.2f} us (bound "
                     f"{r['dense_bound_us']:.2f}); one graph node {r['launch_floor_us']:.2f} us; "
                     f"finish kernel {r['finish_us']:.2f} us; fixed cost the targets allow: "
                     f"{allowed} us")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x14336,14336x4096", help="comma list of KxN")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--sparsities", default="0,0.25,0.5,0.75,0.9")
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--json", default="", help="file for the results")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests this script "
                    "(under TRITON_INTERPRET=1, host timing, meaningless numbers)")
    args = ap.parse_args(argv)
    if not tk.kernels_available(args.device):
        print(f"the anatomy needs the Triton kernels on {args.device}: a CUDA GPU, or "
              "TRITON_INTERPRET=1 for a CPU smoke run", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    _, read_bw = bandwidths(args.replays, args.device)
    import triton

    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    meta = {"device": name, "torch": torch.__version__,
            "triton": triton.__version__, "read_tbps": read_bw / 1e12}
    rows = []
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        rows.append(measure_shape(K, N, DTYPES[args.dtype],
                                  [float(s) for s in args.sparsities.split(",")],
                                  args.replays, read_bw, args.device))
        print(json.dumps(rows[-1]), flush=True)
    print(meta)
    print(report(rows))
    if args.json:  # with the launch configs the tuner chose, which the times depend on
        tuning = [{"key": [str(k) for k in e["key"]], "chosen": str(e["chosen"])}
                  for e in tk.tuning_log()]
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "tuning": tuning}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
