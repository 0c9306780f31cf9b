"""Decode speed on this CPU: the built-in SmolLM2-135M, dense against sparse, same run.

    python -m bench.cpu.decode --methods teal:all chess --sparsities 0 0.5 --threads 2 \
        --csv cpu_decode.csv

Each point calibrates with ``sparsify`` (2048 tokens of Austen) under ``--kernel-mode``
("auto": the compiled CPU ops where the probe measures them faster, as users get it; "always":
the CPU ops everywhere), then times greedy ``model.generate``
(``sparseffn.eval.speed.decode_speed``: decode steps only, prefill subtracted, median of
repeats); the dense model is timed first in the same process. Two views: ``speedup`` over the
dense model as loaded (what a user gets), and ``over_level0`` over the same method and path at
sparsity 0 (every row read: what the skipped rows alone buy, without the faster GEMV of the CPU
ops). ``same_tokens``: whether greedy decoding of ``--new-tokens`` after the first ``--prompt``
tokens of held-out news text gives the same tokens on the measured path as on the reference
path (``kernel_mode="never"``) of the same sparse model. Rows name the CPU, the thread count and
the versions.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

import sparseffn
from sparseffn.data import load_texts
from sparseffn.eval.speed import decode_speed
from sparseffn.eval.sweep import parse_method


def _greedy(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=0)[0, ids.shape[1]:]


def same_tokens(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int,
                kernel_mode: str) -> bool:
    """Greedy tokens on ``kernel_mode``'s path equal those of the reference path."""
    fast = _greedy(model, ids, new_tokens)
    sparseffn.set_kernel_mode(model, "never")
    reference = _greedy(model, ids, new_tokens)
    sparseffn.set_kernel_mode(model, kernel_mode)
    return bool(torch.equal(fast, reference))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.cpu.decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["teal:all", "chess"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.5])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--kernel-mode", default="auto", choices=["always", "auto"])
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--sharing", default="per-token", choices=["per-token", "shared"],
                   help="active sets per sequence, or one per batch "
                   "(sparseffn.set_batch_sharing)")
    p.add_argument("--shape", help="a random-weight model of this bench.e2e.shapes shape "
                   "(fp32) instead of the built-in model, calibrated on random token ids")
    p.add_argument("--layers", type=int, help="with --shape: this many decoder layers")
    p.add_argument("--csv")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.shape:
        from bench.e2e.shapes import build_model
        model, tokenizer = build_model(a.shape, torch.float32, "cpu", a.layers), None
        g = torch.Generator().manual_seed(11)
        vocab = model.config.vocab_size
        calibration = torch.randint(1, vocab, (max(1, a.calib_tokens // 256), 256), generator=g)
        prompt_ids = torch.randint(1, vocab, (1, a.prompt), generator=g)
    else:
        model, tokenizer = sparseffn.load_builtin_model()
        calibration = "austen"
        text = " ".join(load_texts("news", split="eval"))
        prompt_ids = tokenizer(text, return_tensors="pt").input_ids[:, :a.prompt]
    dense = decode_speed(model, a.prompt, a.new_tokens, a.repeats, batch=a.batch)
    rows = [{"method": "dense", "target": 0.0, "measured": 0.0,
             "tok_s": round(dense.tokens_per_s, 2), "speedup": 1.0, "over_level0": "",
             "same_tokens": ""}]
    print(f"{dense.describe()}, torch {torch.__version__}")
    print(f"dense            {dense.tokens_per_s:7.1f} tok/s", flush=True)
    for spec in a.methods:
        level0 = None
        for level in a.sparsities:
            sparseffn.sparsify(model, sparsity=level, calibration=calibration, tokenizer=tokenizer,
                               n_tokens=a.calib_tokens, progress=False,
                               kernel_mode=a.kernel_mode,
                               batch_shared=a.sharing == "shared", **parse_method(spec))
            sparseffn.reset_sparsity_stats(model)
            speed = decode_speed(model, a.prompt, a.new_tokens, a.repeats, batch=a.batch)
            measured = sparseffn.sparsity_report(model).overall
            same = same_tokens(model, prompt_ids, a.new_tokens, a.kernel_mode)
            sparseffn.unsparsify(model)
            if level == 0:
                level0 = speed.tokens_per_s
            over0 = round(speed.tokens_per_s / level0, 3) if level0 else ""
            rows.append({"method": spec, "target": level, "measured": round(measured, 4),
                         "tok_s": round(speed.tokens_per_s, 2),
                         "speedup": round(speed.tokens_per_s / dense.tokens_per_s, 3),
                         "over_level0": over0, "same_tokens": same})
            print(f"{spec:<10} {level:.2f} {speed.tokens_per_s:7.1f} tok/s "
                  f"x{rows[-1]['speedup']:.2f} over dense"
                  + (f", x{over0:.2f} over sparsity 0" if over0 else "")
                  + f" (measured sparsity {measured:.3f}; greedy tokens "
                  f"{'equal' if same else 'DIFFER from'} the reference path's)", flush=True)
    if a.csv:
        Path(a.csv).parent.mkdir(parents=True, exist_ok=True)
        extra = {"model": f"{a.shape} ({a.layers or 'all'} layers, random weights)" if a.shape
                 else "SmolLM2-135M", "cpu": dense.device, "threads": a.threads,
                 "torch": torch.__version__, "batch": a.batch, "sharing": a.sharing,
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
