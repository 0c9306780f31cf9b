"""What the quality probes share: the built-in model, its held-out windows per domain (Austen's
held-out books in-domain, news as another domain) with their dense perplexity, and the
arguments that size them."""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from torch import nn

import sparseffn
from sparseffn.data import builtin_texts, token_windows
from sparseffn.eval.perplexity import perplexity
from sparseffn.eval.sweep import write_csv

DOMAINS = {"austen": "in-domain", "news": "other domain"}


def add_args(p: argparse.ArgumentParser, calib_tokens: int = 8192) -> None:
    """--calib-tokens, --windows, --seq-len, --threads and --csv."""
    p.add_argument("--calib-tokens", type=int, default=calib_tokens)
    p.add_argument("--windows", type=int, default=16, help="held-out windows per domain")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--csv")


def setup(a: argparse.Namespace, prompt_len: int = 0
          ) -> tuple[nn.Module, object, dict[str, torch.Tensor], dict[str, float]]:
    """(model, tokenizer, held-out windows [N, L] per domain, dense perplexity per domain; on
    the decode steps after ``prompt_len`` tokens of each window if > 0)."""
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    model, tok = sparseffn.load_builtin_model()
    evals = {d: token_windows(tok, builtin_texts(d, "eval"), a.windows * a.seq_len, a.seq_len,
                              purpose="evaluation")[:a.windows] for d in DOMAINS}
    dense = {d: perplexity(model, w, batch(a.windows, prompt_len), prompt_len=prompt_len)
             for d, w in evals.items()}
    print(f"dense perplexity {dense}", flush=True)
    return model, tok, evals, dense


def batch(windows: int, prompt_len: int) -> int:
    """Windows per forward: 4 for whole windows; all ``windows`` for decode steps after a
    prompt, whose one-token forwards cost their fixed overhead per call."""
    return windows if prompt_len else 4


def calibration_windows(tok, a: argparse.Namespace) -> torch.Tensor:
    """``--calib-tokens`` of Austen's calibration books in windows of ``--seq-len``."""
    return token_windows(tok, builtin_texts("austen", "calibration"), a.calib_tokens, a.seq_len,
                         purpose="calibration")


def add_perplexities(row: dict, ppl: dict[str, float], dense: dict[str, float]) -> None:
    """``ppl_{domain}`` and ``increase_{domain}`` (over dense) into ``row``."""
    for d in DOMAINS:
        row[f"ppl_{d}"] = round(ppl[d], 3)
        row[f"increase_{d}"] = round(ppl[d] / dense[d] - 1, 4)


def write(rows: list[dict], a: argparse.Namespace, **meta: str) -> None:
    """The rows so far to ``--csv`` (if given), with the run's facts as its header."""
    if a.csv:
        write_csv(rows, a.csv, {"model": "SmolLM2-135M", "torch": torch.__version__,
                                "calib_tokens": str(a.calib_tokens),
                                "windows": f"{a.windows}x{a.seq_len}", **meta})


@torch.no_grad()
def run_hooked(model: nn.Module, windows: torch.Tensor, handles: list) -> None:
    """Run ``windows`` [N, L] through ``model`` in batches of 4, then remove the hook
    ``handles`` (also on error)."""
    try:
        for batch in windows.split(4):
            model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()


def hooked_point(model: nn.Module, evals: dict[str, torch.Tensor], dense: dict[str, float],
                 install: Callable[[list[float]], list], row: dict, label: str) -> None:
    """One probe point: for each domain, hooks from ``install(tally)`` (which count
    [dropped, total] into ``tally``) around a perplexity pass, removed after it; adds
    ``measured_{domain}`` and the perplexities to ``row`` and prints it after ``label``."""
    t0 = time.time()
    ppl = {}
    for d, windows in evals.items():
        tally = [0.0, 0.0]
        handles = install(tally)
        try:
            ppl[d] = perplexity(model, windows)
        finally:
            for h in handles:
                h.remove()
        row[f"measured_{d}"] = round(tally[0] / tally[1], 4)
    add_perplexities(row, ppl, dense)
    print(f"{label}: " + ", ".join(
        f"{DOMAINS[d]} sparsity {row[f'measured_{d}']:.3f} +{100 * row[f'increase_{d}']:.1f}%"
        for d in DOMAINS) + f"  [{time.time() - t0:.0f} s]", flush=True)


def hooked_sweep(a: argparse.Namespace, model: nn.Module, evals: dict[str, torch.Tensor],
                 dense: dict[str, float], column: str, kinds: list[str],
                 fit: Callable[[str], object],
                 install: Callable[[object, float, list[float]], list]) -> list[dict]:
    """One ``hooked_point`` per (kind, level of ``a.levels``): ``fit(kind)`` once per kind,
    then hooks from ``install(fitted, level, tally)``; each row names its kind under
    ``column``, and the CSV is rewritten after every row."""
    rows = []
    width = max(len(kind) for kind in kinds)
    for kind in kinds:
        fitted = fit(kind)
        for level in a.levels:
            row = {column: kind, "level": level}
            hooked_point(model, evals, dense,
                         lambda tally: install(fitted, level, tally),
                         row, f"{kind:<{width}} level {level:.2f}")
            rows.append(row)
            write(rows, a)
    return rows
