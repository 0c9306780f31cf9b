"""Markdown tables of a kernel sweep (the ones in docs/kernels.md), and its plots.

    python -m bench.kernels.report docs/results/kernels_h100_batch1.csv \\
        --batch-csv docs/results/kernels_h100_batch.csv --plot docs/img/kernels_h100
"""
from __future__ import annotations

import argparse
import csv

from .cases import Case
from .sweep import PRIOR

TARGETS = {0.0: 1.0, 0.5: 1.8, 0.9: 5.0}  # minimum speedup over dense at batch 1
SHOWN = ("0.0", "0.25", "0.4", "0.5", "0.6", "0.75", "0.9", "0.95")


def _load(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _key(r: dict) -> tuple:
    return r["op"], r["model"], int(r["K"]), int(r["N"])


def speedup_table(rows: list[dict], dtype: str) -> str:
    """Batch-1 speedup over dense, with the fraction of the bandwidth bound in brackets."""
    sel = [r for r in rows if r["batch"] == "1" and r["dtype"] == dtype]
    head = "| case | dense us | " + " | ".join(f"s={s}" for s in SHOWN) + " |"
    lines = [head, "|" + " --- |" * (len(SHOWN) + 2)]
    for key in sorted({_key(r) for r in sel}):
        pts = {r["sparsity"]: r for r in sel if _key(r) == key}
        cells = [f"{pts[s]['speedup'] or 'FAIL'}x ({float(pts[s]['frac_of_bound']):.2f})"
                 if s in pts else "" for s in SHOWN]
        lines.append(f"| {Case(*key).label} | {pts['0.0']['dense_us']} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def target_table(rows: list[dict]) -> str:
    """The issue's targets at batch 1 on 4096x14336, both directions, fp16 and bf16."""
    lines = ["| case | dtype | min bound 0..0.9 | x@0 | x@0.5 | x@0.9 | beats TEAL | "
             "beats Deja Vu |", "|" + " --- |" * 8]
    for r0 in rows:
        if r0["batch"] != "1" or r0["sparsity"] != "0.0" or r0["op"].startswith("mlp") \
                or {int(r0["K"]), int(r0["N"])} != {4096, 14336}:
            continue
        pts = {float(r["sparsity"]): r for r in rows if r["batch"] == "1"
               and _key(r) == _key(r0) and r["dtype"] == r0["dtype"]}
        sp = {s: float(r["speedup"] or 0) for s, r in pts.items()}
        bound = min(float(r["frac_of_bound"]) for s, r in pts.items() if s <= 0.9)
        # Only the published points this sweep measured count (a sweep may skip some levels).
        shared = {n: [s for s in pub if s in sp] for n, pub in PRIOR.items()}
        beats = {n: sum(sp[s] > PRIOR[n][s] for s in shared[n]) for n in PRIOR}
        cells = [f"{bound:.2f}"] + [(f"{sp[s]:.2f}" + ("" if sp[s] >= t else " (miss)"))
                                     if s in sp else "-" for s, t in TARGETS.items()]
        cells += [f"{beats[n]}/{len(shared[n])}" for n in PRIOR]
        lines.append(f"| {Case(*_key(r0)).label} | {r0['dtype']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def batch_table(rows: list[dict]) -> str:
    """Speedup (measured union of active rows) by batch size."""
    lines = ["| case | batch | " + " | ".join(f"s={s}" for s in ("0.0", "0.5", "0.9"))
             + " |", "|" + " --- |" * 5]
    for key in sorted({_key(r) for r in rows}):
        for b in sorted({int(r["batch"]) for r in rows if _key(r) == key}):
            pts = {r["sparsity"]: r for r in rows if _key(r) == key and int(r["batch"]) == b}
            cells = [f"{pts[s]['speedup']}x (union {1 - float(pts[s]['active_fraction']):.2f})"
                     if s in pts else "" for s in ("0.0", "0.5", "0.9")]
            lines.append(f"| {Case(*key).label} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", help="batch-1 sweep CSV")
    ap.add_argument("--batch-csv", default="", help="sweep CSV with batch sizes > 1")
    ap.add_argument("--plot", default="", help="PNG prefix for the plots")
    args = ap.parse_args()
    rows = _load(args.csv)
    batch = _load(args.batch_csv) if args.batch_csv else []
    for dt in sorted({r["dtype"] for r in rows}):
        print(f"\n### batch 1, {dt}\n\n{speedup_table(rows, dt)}")
    print(f"\n### targets\n\n{target_table(rows)}")
    if batch:
        b1 = [r for r in rows if r["model"] == batch[0]["model"]
              and r["dtype"] == batch[0]["dtype"] and r["sparsity"] in ("0.0", "0.5", "0.9")]
        print(f"\n### batch sizes\n\n{batch_table(b1 + batch)}")
    if args.plot:
        from .plot import plot_sweep

        print(plot_sweep(rows + batch, args.plot, PRIOR))


if __name__ == "__main__":
    main()
