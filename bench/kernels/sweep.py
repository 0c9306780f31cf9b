"""Kernel sweep: copy bandwidth, dense cuBLAS and our ops over real shapes, dtypes, batch sizes
and sparsities, in one run on one GPU. Writes CSV rows and plots, prints a table and the targets.

    python -m bench.kernels.sweep --csv docs/results/kernels_h100.csv --plot docs/img/kernels_h100

Timing: each point is a CUDA graph of one op call per weight copy; copies are clones of one
weight, enough of them that the bytes one replay needs exceed the L2 cache several times, so that
no call finds its weights in L2 (as in a real model, whose other layers evict them). The time per
call is the median over replays divided by the number of calls, with warm-up before capture.
A speedup is reported only where the output matched the fp32 reference at that point.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from typing import Callable

import torch

import triton_kernels as tk

from . import cases as cs

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_SPARSITIES = "0,0.1,0.2,0.25,0.3,0.4,0.5,0.6,0.7,0.75,0.8,0.9,0.95"
# Published H100 speedups over dense (batch 1, fp16, 4096x14336), DESIGN.md section 3.
PRIOR = {"TEAL": {0.25: 1.35, 0.4: 1.58, 0.5: 1.73, 0.6: 0.97, 0.75: 1.81, 0.9: 1.22},
         "DejaVu": {0.25: 1.14, 0.4: 1.31, 0.5: 1.47, 0.6: 1.72, 0.75: 1.21, 0.9: 2.62}}
FIELDS = ["device", "torch", "triton", "op", "model", "K", "N", "dtype", "batch", "sparsity",
          "active_fraction", "us", "dense_us", "speedup", "ideal_speedup", "bound_us",
          "frac_of_bound", "dense_frac_of_bound", "rel_err", "correct", "copies"]


def time_calls(calls: list[Callable[[], object]], replays: int, device: str = "cuda") -> float:
    """Median microseconds per call of a CUDA graph that makes every call once.

    On the CPU (smoke runs only) the calls are timed with the host clock instead.
    """
    if device != "cuda":
        for c in calls:
            c()
        times = []
        for _ in range(replays):
            t0 = time.perf_counter()
            for c in calls:
                c()
            times.append((time.perf_counter() - t0) * 1e6 / len(calls))
        return statistics.median(times)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles and tunes) outside the capture
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def bandwidths(replays: int, device: str) -> tuple[float, float]:
    """(copy, read) bytes per second over 1 GiB of float32 (64 MiB on the CPU): a copy counts
    bytes read plus written, a sum the bytes read."""
    a = torch.randn(2**28 if device == "cuda" else 2**24, device=device)
    b = torch.empty_like(a)
    nbytes = a.numel() * a.element_size()
    copy = 2 * nbytes / (time_calls([lambda: b.copy_(a)], replays, device) * 1e-6)
    read = nbytes / (time_calls([lambda: a.sum()], replays, device) * 1e-6)
    return copy, read


def n_copies(case: cs.Case, dtype: torch.dtype, max_sparsity: float, cap_bytes: float,
             device: str) -> int:
    """Copies so that one replay needs >= 4x L2 even at the highest sparsity."""
    if device != "cuda":
        return 2
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    need = cs.needed_bytes(case, 1, dtype, max(1e-3, 1.0 - max_sparsity))
    per_copy = 2 * cs.weight_bytes(case, dtype)  # dense layout + sparse layout
    return max(3, min(64, math.ceil(4 * l2 / need), int(cap_bytes // per_copy)))


def run_case(case: cs.Case, dtype: torch.dtype, batches: list[int], sparsities: list[float],
             bw: float, args, meta: dict) -> list[dict]:
    dev = args.device
    n = n_copies(case, dtype, max(sparsities), args.mem_gib * 2**30, dev)
    dense0 = cs.dense_weights(case, dtype, dev)
    dense = [dense0] + [tuple(t.clone() for t in dense0) for _ in range(n - 1)]
    sparse = [cs.sparse_weights(case, d) for d in dense]
    rows = []
    for batch in batches:
        x = torch.randn(batch, case.K, device=dev).to(dtype)
        dense_us = time_calls([lambda d=d: cs.dense_call(case, x, d) for d in dense],
                              args.replays, dev)
        dense_bound = cs.needed_bytes(case, batch, dtype, None) / bw * 1e6
        for s in sparsities:
            p = cs.make_point(case, batch, s, dtype, sparse[0])
            bound_ops = [cs.bind(case, p, w) for w in sparse]
            err = cs.rel_error(cs.sparse_call(case, p, bound_ops[0]),
                               cs.reference(case, p, sparse[0]))
            ok = err <= cs.REL_TOL[dtype]
            us = time_calls([lambda w=w: cs.sparse_call(case, p, w) for w in bound_ops],
                            args.replays, dev)
            del bound_ops
            bound = cs.needed_bytes(case, batch, dtype, p.active_fraction) / bw * 1e6
            rows.append({**meta, "op": case.op, "model": case.model, "K": case.K, "N": case.N,
                         "dtype": str(dtype).replace("torch.", ""), "batch": batch,
                         "sparsity": s, "active_fraction": round(p.active_fraction, 4),
                         "us": round(us, 2), "dense_us": round(dense_us, 2),
                         "speedup": round(dense_us / us, 3) if ok else "",
                         "ideal_speedup": round(dense_bound / bound, 3),
                         "bound_us": round(bound, 2), "frac_of_bound": round(bound / us, 3),
                         "dense_frac_of_bound": round(dense_bound / dense_us, 3),
                         "rel_err": f"{err:.2e}", "correct": ok, "copies": n})
            r = rows[-1]
            print(f"{case.label:42s} {r['dtype']:8s} B={batch} s={s:<4} "
                  f"act={r['active_fraction']:.3f}"
                  f" {us:8.2f}us dense {dense_us:8.2f}us x{r['speedup'] or 'FAIL'}"
                  f" bound {r['frac_of_bound']:.2f}", flush=True)
    del dense, sparse
    if dev == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_tables(rows: list[dict]) -> None:
    """Batch-1 speedups (fraction of bound) per case and dtype, then the targets."""
    b1 = [r for r in rows if r["batch"] == 1]
    sps = sorted({r["sparsity"] for r in b1})
    print("\nbatch 1: speedup over dense (fraction of the bandwidth bound); FAIL = wrong output")
    print(f"{'case':40s}{'dtype':9s}" + "".join(f"{s:>15}" for s in sps))
    for key in sorted({(r["op"], r["model"], r["K"], r["N"], r["dtype"]) for r in b1}):
        pts = {r["sparsity"]: r for r in b1
               if (r["op"], r["model"], r["K"], r["N"], r["dtype"]) == key}
        cells = ""
        for s in sps:
            r = pts.get(s)
            cell = f"{r['speedup'] or 'FAIL'} ({r['frac_of_bound']:.2f})" if r else ""
            cells += f"{cell:>15}"
        label = cs.Case(key[0], key[1], key[2], key[3]).label
        print(f"{label:40s}{key[4]:9s}{cells}")
    print("\ntargets (batch 1, 4096x14336 both directions, fp16/bf16):")
    for r in b1:
        if {r["K"], r["N"]} != {4096, 14336} or r["dtype"] == "float32" \
                or r["op"].startswith("mlp"):
            continue
        s, sp = r["sparsity"], r["speedup"] or 0.0
        misses = []
        if s <= 0.9 and r["frac_of_bound"] < 0.85:
            misses.append(f"bound {r['frac_of_bound']:.2f}<0.85")
        need = {0.0: 1.0, 0.5: 1.8, 0.9: 5.0}.get(s)
        if need and sp < need:
            misses.append(f"speedup {sp}<{need}")
        for name, pub in PRIOR.items():
            if s in pub and sp <= pub[s]:
                misses.append(f"{name} {pub[s]}>={sp}")
        if misses:
            print(f"  MISS {r['op']} {r['K']}->{r['N']} {r['dtype']} s={s}: " + "; ".join(misses))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", default=",".join(cs.OPS), help=f"comma list of {cs.ALL_OPS}")
    ap.add_argument("--models", default="llama3-8b,mistral-7b,qwen2.5-7b",
                    help=f"comma list of {list(cs.MODELS)}")
    ap.add_argument("--dtypes", default="fp16,bf16", help="comma list of fp16,bf16,fp32")
    ap.add_argument("--batch", default="1,2,4,8", help="comma list of batch sizes")
    ap.add_argument("--sparsities", default=DEFAULT_SPARSITIES, help="comma list in [0, 1)")
    ap.add_argument("--replays", type=int, default=15, help="timed graph replays per point")
    ap.add_argument("--mem-gib", type=float, default=24.0, help="cap on weight copies (GiB)")
    ap.add_argument("--csv", default="kernels_sweep.csv", help="CSV to write")
    ap.add_argument("--plot", default="", help="PNG path prefix for the plots ('' = none)")
    ap.add_argument("--tuning-log", default="", help="JSON file for the tuning decisions")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests this script "
                    "(reference path, host timing, meaningless numbers)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not tk.kernels_available("cuda"):
        print("the sweep needs a CUDA GPU with Triton (or --device cpu for a smoke run)",
              file=sys.stderr)
        return 2
    import triton

    torch.manual_seed(0)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    meta = {"device": name, "torch": torch.__version__, "triton": triton.__version__}
    copy_bw, read_bw = bandwidths(args.replays, args.device)
    bw = max(copy_bw, read_bw)  # the bound uses the faster of the two: the stricter bound
    print(f"{meta}  copy {copy_bw / 1e12:.3f} TB/s, read {read_bw / 1e12:.3f} TB/s", flush=True)
    rows = []
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    meta.update(copy_tbps=round(copy_bw / 1e12, 3), read_tbps=round(read_bw / 1e12, 3))
    with open(args.csv, "w", newline="") as f:  # rows are written as they come
        w = csv.DictWriter(f, fieldnames=FIELDS + ["copy_tbps", "read_tbps"])
        w.writeheader()
        for case in cs.cases(args.ops.split(","), args.models.split(",")):
            for dtype in dtypes:
                new = run_case(case, dtype, batches, sparsities, bw, args, meta)
                w.writerows(new)
                f.flush()
                rows += new
    print_tables(rows)
    if args.tuning_log:
        with open(args.tuning_log, "w") as f:
            json.dump([{**e, "key": [str(k) for k in e["key"]], "chosen": str(e["chosen"])}
                       for e in tk.tuning_log()], f, indent=1)
    if args.plot:
        from .plot import plot_sweep

        for path in plot_sweep(rows, args.plot, PRIOR):
            print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
