"""Quality and measured sparsity per domain: each method spec at each target, calibrated on
Austen (or ``--calibration`` sources), evaluated on held-out Austen and news, with the bytes
each domain's text really skipped.

    python -m bench.quality.per_domain --specs teal:all teal:all:rotation=64 \
        --levels 0.44 0.47 0.5 --csv per_domain.csv

A criterion's measured sparsity moves with the text: thresholds fitted on one domain keep
more (or fewer) channels on another, so a comparison between criteria must be made at the
bytes each domain measured, not at the target. Each spec is calibrated at each level by
``sparseffn.sparsify`` (``--calib-tokens``); perplexity over ``--windows`` held-out
windows of ``--seq-len`` tokens per domain, the sparsity counters reset before each domain.
With ``--prompt-len P`` perplexity (dense too) and bytes are read on the decode steps after
the first P tokens of each window, which methods that decide at the prompt (coreinfer) need.
"""
from __future__ import annotations

import argparse
import sys

import torch

import sparseffn
from bench.quality import heldout
from bench.quality.heldout import DOMAINS
from sparseffn.data import builtin_texts, token_windows
from sparseffn.eval.perplexity import perplexity
from sparseffn.eval.sweep import check_prompt_len, parse_method
from sparseffn.families import window_bos


def run(a: argparse.Namespace) -> list[dict]:
    model, tok, evals, dense = heldout.setup(a, a.prompt_len)
    # Several sources: an equal share of 512-token windows from each (sparsify's own window
    # length), given as token ids.
    calib = builtin_texts(a.calibration[0], "calibration") if len(a.calibration) == 1 else \
        torch.cat([token_windows(tok, builtin_texts(src, "calibration"),
                                 a.calib_tokens // len(a.calibration), 512,
                                 bos=window_bos(model, tok)) for src in a.calibration])
    rows = []
    for spec in a.specs:
        for level in a.levels:
            sparseffn.sparsify(model, sparsity=level, calibration=calib, tokenizer=tok,
                               n_tokens=a.calib_tokens, progress=False, **parse_method(spec))
            try:
                row = {"spec": spec, "target": level}
                for d, windows in evals.items():
                    sparseffn.reset_sparsity_stats(model)
                    ppl = perplexity(model, windows, heldout.batch(a.windows, a.prompt_len),
                                     prompt_len=a.prompt_len)
                    report = sparseffn.sparsity_report(model)
                    row[f"all_bytes_skipped_{d}"] = round(report.all_bytes_skipped, 4)
                    row[f"ffn_bytes_skipped_{d}"] = round(report.ffn_bytes_skipped, 4)
                    row[f"ppl_{d}"] = round(ppl, 3)
                    row[f"increase_{d}"] = round(ppl / dense[d] - 1, 4)
            finally:
                sparseffn.unsparsify(model)
            rows.append(row)
            print(f"{spec} at {level}: " + " | ".join(
                f"{DOMAINS[d]}: skips {row[f'all_bytes_skipped_{d}']:.3f} of all bytes, "
                f"+{100 * row[f'increase_{d}']:.1f}%" for d in DOMAINS), flush=True)
            heldout.write(rows, a, calibration="+".join(a.calibration),
                          prompt_len=str(a.prompt_len))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.quality.per_domain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", nargs="+", required=True,
                   help="method[:scope[:allocation]][:option=value] specs")
    p.add_argument("--levels", nargs="+", type=float, default=[0.5])
    p.add_argument("--calibration", nargs="+", default=["austen"],
                   choices=["austen", "news", "pydoc"],
                   help="built-in sources of the calibration text (their calibration splits)")
    p.add_argument("--prompt-len", type=int, default=0,
                   help="score the decode steps after this many tokens of each window")
    heldout.add_args(p)
    a = p.parse_args(argv)
    check_prompt_len(a.specs, a.prompt_len)
    for spec in a.specs:  # refuse a bad spec before loading anything
        for level in a.levels:
            sparseffn.SparsityConfig(sparsity=level, **parse_method(spec))
    run(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
