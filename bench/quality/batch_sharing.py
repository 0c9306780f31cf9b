"""The quality cost of batch-shared sparsity: perplexity on held-out text when the sequences of
a batch share one active set per site (``sparseffn.set_batch_sharing``), against per-token sets.

    python -m bench.quality.batch_sharing --methods teal:all chess --batches 1 4 8 16 \\
        --csv docs/results/batch_sharing_smollm2.csv

The built-in SmolLM2-135M is calibrated on Austen (``--calib-tokens``) at ``--sparsity`` per
method, then scored teacher-forced on held-out windows of Austen (in-domain) and of news (another
domain), in batches of each size: every position of a batch shares its sets, as a decode step of
that many sequences would. A batch takes windows from far-apart parts of the text (window i of
batch j is window j + i * N/B), so its sequences are about unrelated passages, as different
users' are. Per-token sets give the same perplexity at every batch size, so they are scored once.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

import sparseffn
from sparseffn.data import builtin_texts, token_windows
from sparseffn.eval.perplexity import perplexity
from sparseffn.eval.sweep import parse_method

DOMAINS = {"austen": "in-domain", "news": "other domain"}


def interleaved(windows: torch.Tensor, batch: int) -> torch.Tensor:
    """windows [N, L] reordered so that batch j of ``batch`` windows holds windows j, j + N/B,
    j + 2N/B, ... (N a multiple of ``batch``)."""
    n = windows.shape[0]
    return windows[torch.arange(n).reshape(batch, n // batch).t().flatten()]


def batch_args(prog: str, doc: str, methods: list[str], batches: list[int], windows: int,
               seq_len: int, argv: list[str] | None) -> argparse.Namespace:
    """The batch probes' command line (methods, sparsity, batches, held-out windows, ...)."""
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=methods)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--batches", nargs="+", type=int, default=batches)
    p.add_argument("--windows", type=int, default=windows, help="held-out windows per domain "
                   "(a multiple of every batch size)")
    p.add_argument("--seq-len", type=int, default=seq_len)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--csv")
    a = p.parse_args(argv)
    bad = [b for b in a.batches if a.windows % b]
    if bad:
        raise SystemExit(f"--windows {a.windows} is not a multiple of batch sizes {bad}")
    torch.set_num_threads(a.threads)
    return a


def held_out_windows(tok, a: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Domain -> its ``a.windows`` held-out windows of ``a.seq_len`` tokens."""
    return {d: token_windows(tok, builtin_texts(d, "eval"), a.windows * a.seq_len,
                             a.seq_len, purpose="evaluation")[:a.windows] for d in DOMAINS}


def main(argv: list[str] | None = None) -> int:
    a = batch_args("bench.quality.batch_sharing", __doc__,
                   ["teal:all", "teal:mlp", "wina:all", "cats", "chess"], [1, 4, 8, 16], 48,
                   256, argv)
    model, tok = sparseffn.load_builtin_model()
    held_out = held_out_windows(tok, a)
    rows = []

    def record(method: str, sharing: str, batch: int | str) -> None:
        row = {"method": method, "sparsity": a.sparsity if method != "dense" else 0.0,
               "sharing": sharing, "batch": batch}
        for d, w in held_out.items():
            bsz = batch if isinstance(batch, int) else 8
            row[f"ppl_{d}"] = round(perplexity(model, interleaved(w, bsz), bsz), 3)
        if method != "dense":
            row["measured_sparsity"] = round(sparseffn.sparsity_report(model).overall, 4)
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    record("dense", "-", "any")
    for spec in a.methods:
        sparseffn.sparsify(model, sparsity=a.sparsity, calibration="austen", tokenizer=tok,
                           n_tokens=a.calib_tokens, progress=False, kernel_mode="never",
                           **parse_method(spec))
        sparseffn.reset_sparsity_stats(model)
        record(spec, "per-token", "any")
        sparseffn.set_batch_sharing(model, True)
        for b in a.batches:
            sparseffn.reset_sparsity_stats(model)
            record(spec, "shared", b)
        sparseffn.unsparsify(model)
    dense = rows[0]
    print("\n| method | sets | batch | " + " | ".join(
        f"{d} ppl ({kind})" for d, kind in DOMAINS.items()) + " |")
    print("|---|---|---|" + "---|" * len(DOMAINS))
    for r in rows:
        cells = [f"{r[f'ppl_{d}']:.2f} ({100 * (r[f'ppl_{d}'] / dense[f'ppl_{d}'] - 1):+.1f}%)"
                 for d in DOMAINS]
        print(f"| {r['method']} | {r['sharing']} | {r['batch']} | " + " | ".join(cells) + " |")
    if a.csv:
        Path(a.csv).parent.mkdir(parents=True, exist_ok=True)
        fields = ["method", "sparsity", "sharing", "batch", *(f"ppl_{d}" for d in DOMAINS),
                  "measured_sparsity", "windows", "seq_len", "calib_tokens", "torch"]
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in rows:
                w.writerow({**r, "windows": a.windows, "seq_len": a.seq_len,
                            "calib_tokens": a.calib_tokens, "torch": torch.__version__})
    return 0


if __name__ == "__main__":
    sys.exit(main())
