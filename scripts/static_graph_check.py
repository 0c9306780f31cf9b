"""Diagnostic of 2026-12-07 (`python scripts/static_graph_check.py 32`, deleted in the next commit): one process, the sparse model's timings in every order after
the static-graph fix, counting on and off, dense lean and dense generate in the same process."""
from __future__ import annotations

import sys

import torch

import sparseffn
from bench.e2e import harness as H
from bench.e2e.run import calibrations, _recompile
from bench.e2e.shapes import build_model
from sparseffn.patching import install


def rate(model, harness, label):
    r = H.decode_rate(model, harness, 1, 128, 64, repeats=3)
    print(f"{label:<44} {r:7.1f} tok/s", flush=True)
    return r


def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    model = build_model("llama3-8b", torch.bfloat16, "cuda", layers)
    cals, _ = calibrations(model, "teal", "all", [0.5], 1024, 256, False)
    rate(model, "lean", "dense lean")
    rate(model, "generate", "dense generate (transformers)")
    install(model, cals[0], kernel_mode="auto")
    _recompile(model)
    rate(model, "generate", "sparse generate, counting on (first)")
    rate(model, "lean", "sparse lean, counting on (second)")
    rate(model, "generate", "sparse generate again (same graphs)")
    print(sparseffn.sparsity_report(model).overall, flush=True)
    sparseffn.track_sparsity(model, False)
    _recompile(model)
    rate(model, "lean", "sparse lean, counting off")
    rate(model, "generate", "sparse generate, counting off")
    sparseffn.track_sparsity(model, True)
    _recompile(model)
    rate(model, "lean", "sparse lean, counting on again")


if __name__ == "__main__":
    main()
