"""Plots of a kernel sweep: speedup over dense against measured sparsity, with the ideal line.

``python -m bench.kernels.plot CSV PREFIX`` redraws them from a CSV written by the sweep.
"""
from __future__ import annotations

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first, for headless machines)


# Drawn on the panel of the op they are the reference for, not on a panel of their own.
OVERLAYS = {"input_sparse_oracle": ("input_sparse", "cuBLAS, needed rows compacted ahead")}


def _panels(rows: list[dict]) -> list[tuple]:
    return sorted({(r["op"], r["model"], int(r["K"]), int(r["N"])) for r in rows
                   if r["op"] not in OVERLAYS})


def _overlay(ax, rows: list[dict], key: tuple, batch: int) -> None:
    """Reference curves (OVERLAYS) of panel ``key``'s shape at ``batch``, dashed."""
    for op, (target, label) in OVERLAYS.items():
        if target != key[0]:
            continue
        sel = [r for r in rows if (r["op"], r["model"], int(r["K"]), int(r["N"])) ==
               (op,) + key[1:] and int(r["batch"]) == batch]
        for dt in sorted({r["dtype"] for r in sel}):
            pts = sorted((1 - float(r["active_fraction"]), float(r["speedup"]))
                         for r in sel if r["dtype"] == dt)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "x--", ms=4, lw=1,
                    label=f"{label} {dt}")


def _title(key: tuple) -> str:
    op, model, K, N = key
    return f"{op} {model} {K}x{N}" if op.startswith("mlp") else f"{op} {model} {K}->{N}"


def _grid(n: int):
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _ideal(ax, rows: list[dict]) -> None:
    """Byte-bound speedup: needed bytes at dense over needed bytes at this point."""
    pts = sorted((1 - float(r["active_fraction"]), float(r["ideal_speedup"])) for r in rows)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", lw=1,
            label="ideal: dense bytes / needed bytes (1/(1-s) for a GEMV)")
    ax.axhline(1.0, color="grey", lw=0.8)


def plot_sweep(rows: list[dict], prefix: str, prior: dict) -> list[str]:
    """Write ``{prefix}_batch1.png`` (fp16/bf16 at batch 1, with the published kernels) and
    ``{prefix}_batch.png`` (batch sizes, fp16 or the first dtype); return the paths."""
    ok = [r for r in rows if r["speedup"] not in ("", None)]
    paths = []
    panels = _panels(ok)
    fig, axes = _grid(len(panels))
    for ax, key in zip(axes, panels):
        sel = [r for r in ok if (r["op"], r["model"], int(r["K"]), int(r["N"])) == key
               and int(r["batch"]) == 1]
        if not sel:
            continue
        _ideal(ax, sel)
        for dt in sorted({r["dtype"] for r in sel}):
            pts = sorted((1 - float(r["active_fraction"]), float(r["speedup"]))
                         for r in sel if r["dtype"] == dt)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=f"ours {dt}")
        _overlay(ax, ok, key, 1)
        if not key[0].startswith("mlp"):
            for (name, pub), mk in zip(prior.items(), ("s", "^")):
                ax.plot(list(pub), list(pub.values()), mk, mfc="none", label=f"{name} (published)")
        ax.set(title=_title(key), xlabel="measured sparsity (union)", ylabel="speedup over dense")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(f"{prefix}_batch1.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    dtypes = sorted({r["dtype"] for r in ok})
    dt = "float16" if "float16" in dtypes else dtypes[0]
    fig, axes = _grid(len(panels))
    for ax, key in zip(axes, panels):
        sel = [r for r in ok if (r["op"], r["model"], int(r["K"]), int(r["N"])) == key
               and r["dtype"] == dt]
        _ideal(ax, [r for r in sel if int(r["batch"]) == 1])
        for b in sorted({int(r["batch"]) for r in sel}):
            pts = sorted((1 - float(r["active_fraction"]), float(r["speedup"]))
                         for r in sel if int(r["batch"]) == b)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=f"batch {b}")
        ax.set(title=f"{_title(key)} {dt}", xlabel="measured sparsity (union over the batch)",
               ylabel="speedup over dense")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(f"{prefix}_batch.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


if __name__ == "__main__":
    from .sweep import PRIOR

    with open(sys.argv[1]) as f:
        print(plot_sweep(list(csv.DictReader(f)), sys.argv[2], PRIOR))
