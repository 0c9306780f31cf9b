"""Tables, CSV and the plot of ``bench.finetune.run``; replots from the CSVs alone:

    python -m bench.finetune.report --csv docs/results/finetune_smollm2.csv \
        --curve-csv docs/results/finetune_smollm2_curve.csv --plot docs/img/finetune_smollm2.png
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

from sparseffn.eval.sweep import save_figure

# One color per method, the same in every plot.
COLORS = {"none": "C0", "l1": "C1", "density": "C2", "fixed": "C3", "relu": "C4",
          "fatrelu": "C5", "prosparse": "C6"}


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path, meta: dict[str, Any]) -> None:
    """``rows`` with ``meta`` columns (device, versions, data) on every line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(meta) + list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**meta, **{k: round(v, 4) if isinstance(v, float) else v
                                        for k, v in row.items()}})


def markdown_tables(rows, curves, args) -> str:
    """Per-model table (dense and at the training target) and the curve table."""
    target = min(args.levels, key=lambda lv: abs(lv - args.target))
    base = rows[0]
    at_target = {c.method: c for c in curves if c.target == target}
    lines = [
        f"| model | train s | held-out ppl | {args.other} ppl | sparsity at base median | "
        f"{args.calib_method} {target:.2f}: measured | held-out ppl | vs dense base | "
        f"{args.other} ppl |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        c = at_target.get(r.method)
        rel = (c.ppl_heldout / base.ppl_heldout - 1) * 100 if c else float("nan")
        lines.append(
            f"| {r.method} | {r.train_seconds:.0f} | {r.ppl_heldout:.2f} | {r.ppl_other:.2f} | "
            f"{r.sparsity_at_base_median:.3f} | {c.measured:.3f} | {c.ppl_heldout:.2f} | "
            f"{rel:+.1f}% | {c.ppl_other:.2f} |" if c else f"| {r.method} | ... |")
    lines += ["", "| model | target | measured | held-out ppl | " + f"{args.other} ppl |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {c.method} | {c.target:.2f} | {c.measured:.3f} | {c.ppl_heldout:.2f} | "
              f"{c.ppl_other:.2f} |" for c in curves]
    return "\n".join(lines)


def plot(rows, curves, path: str | Path, title: str, other: str = "pydoc") -> None:
    """Perplexity against measured sparsity on both held-out texts, one line per model.

    A model's dense point sits at its fraction of exact zeros (0 for SiLU/GELU; a ReLU model
    skips its zeros without any threshold).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows[0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    panels = (("ppl_heldout", "held-out Austen (Persuasion)"),
              ("ppl_other", f"held-out {other} (other source)"))
    for ax, (field, label) in zip(axes, panels):
        for r in rows:
            pts = [(r.exact_zero_fraction, getattr(r, field))] + [(c.measured, getattr(c, field))
                                                for c in curves if c.method == r.method]
            style = dict(color="k", ls="--", marker="s") if r.method == "base" else dict(
                marker="o", color=COLORS.get(r.method))
            name = "base (training-free)" if r.method == "base" else r.method
            if r.method == "none":
                name = "none (plain fine-tune)"
            ax.plot(*zip(*pts), label=name, **style)
        ax.axhline(getattr(base, field) * 1.1, color="grey", lw=0.8, ls=":",
                   label="dense base +10%")
        ax.set_xlabel("measured FFN neuron sparsity (0 = dense)")
        ax.set_ylabel(f"perplexity, {label} (log)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, title, path)


def _read(path: str | Path) -> list[SimpleNamespace]:
    with Path(path).open() as f:
        return [SimpleNamespace(**{k: _number(v) for k, v in row.items()})
                for row in csv.DictReader(f)]


def _number(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        return value


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="replot bench.finetune.run results from its CSVs")
    p.add_argument("--csv", required=True)
    p.add_argument("--curve-csv", required=True)
    p.add_argument("--plot", required=True)
    args = p.parse_args(argv)
    rows, curves = _read(args.csv), _read(args.curve_csv)
    m = rows[0]
    plot(rows, curves, args.plot,
         f"SmolLM2-135M, CPU: {int(m.steps)} steps x {int(m.batch_size)} x {int(m.seq_len)} "
         f"tokens of {m.train_data}, {m.trainable}; {m.calib_method} calibration",
         other=str(m.other).split()[0])


if __name__ == "__main__":
    main()
