"""Decode speed on this CPU: the built-in SmolLM2-135M, dense against sparse, same run.

    python -m bench.cpu.decode --methods teal:all chess --sparsities 0.5 --threads 2 \
        --csv cpu_decode.csv

Each point calibrates with ``sparsify`` (2048 tokens of Austen) under ``--kernel-mode``
("always": the ops' CPU decode path; "auto": the reference path on the CPU), then times greedy
``model.generate`` (``sparseffn.eval.speed.decode_speed``: decode steps only, prefill
subtracted, median of repeats); the dense model is timed first in the same process. Rows name
the CPU, the thread count and the versions.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

import sparseffn
from sparseffn.eval.speed import decode_speed
from sparseffn.eval.sweep import parse_method


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.cpu.decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["teal:all", "chess"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--kernel-mode", default="always", choices=["always", "auto"])
    p.add_argument("--csv")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tokenizer = sparseffn.load_builtin_model()
    dense = decode_speed(model, a.prompt, a.new_tokens, a.repeats)
    rows = [{"method": "dense", "target": 0.0, "measured": 0.0,
             "tok_s": round(dense.tokens_per_s, 2), "speedup": 1.0}]
    print(f"{dense.describe()}, torch {torch.__version__}")
    print(f"dense            {dense.tokens_per_s:7.1f} tok/s", flush=True)
    for spec in a.methods:
        for level in a.sparsities:
            sparseffn.sparsify(model, sparsity=level, calibration="austen", tokenizer=tokenizer,
                               n_tokens=a.calib_tokens, progress=False,
                               kernel_mode=a.kernel_mode, **parse_method(spec))
            sparseffn.reset_sparsity_stats(model)
            speed = decode_speed(model, a.prompt, a.new_tokens, a.repeats)
            measured = sparseffn.sparsity_report(model).overall
            sparseffn.unsparsify(model)
            rows.append({"method": spec, "target": level, "measured": round(measured, 4),
                         "tok_s": round(speed.tokens_per_s, 2),
                         "speedup": round(speed.tokens_per_s / dense.tokens_per_s, 3)})
            print(f"{spec:<10} {level:.2f} {speed.tokens_per_s:7.1f} tok/s "
                  f"x{rows[-1]['speedup']:.2f} (measured sparsity {measured:.3f})", flush=True)
    if a.csv:
        Path(a.csv).parent.mkdir(parents=True, exist_ok=True)
        extra = {"cpu": dense.device, "threads": a.threads, "torch": torch.__version__,
                 "kernel_mode": a.kernel_mode,
                 "prompt": a.prompt, "new_tokens": a.new_tokens}
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*extra, *rows[0]])
            w.writeheader()
            for r in rows:
                w.writerow({**extra, **r})
    return 0


if __name__ == "__main__":
    sys.exit(main())
