"""Diagnostic (not kept): why the harness timed second runs slower for the sparse model.

For each timing prints tok/s and the host's share: the wall time until the decode call
returned (before the final sync) over the total. A share near 1 means the host, not the GPU,
set the pace."""
from __future__ import annotations

import statistics
import sys
import time

import torch

import sparseffn
from bench.e2e import harness as H
from bench.e2e.run import calibrations, _recompile
from bench.e2e.shapes import build_model


def timed(model, harness, ids, n):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    H.run_decode(model, harness, ids, n)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return t2 - t0, t1 - t0


def rate(model, harness, label, new=64, repeats=3):
    ids = H.prompt_ids(model, 1, 128)
    for n in (new, new, 1):
        H.run_decode(model, harness, ids, n)
    full = [timed(model, harness, ids, new) for _ in range(repeats)]
    first = [timed(model, harness, ids, 1) for _ in range(repeats)]
    f = statistics.median(t for t, _ in full)
    s = statistics.median(t for t, _ in first)
    host = statistics.median(h / t for t, h in full)
    r = (new - 1) / (f - s)
    print(f"{label:<40} {r:7.1f} tok/s   host share {host:.2f}   step {1e3 * (f - s) / (new - 1):.3f} ms",
          flush=True)
    return r


def main() -> None:
    """The first H100 call of 2026-12-07 (`python scripts/order_effect.py 32`): sparse timings
    with counting on (the default), then dense in the same process."""
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    torch._dynamo.config.cache_size_limit = 64
    model = build_model("llama3-8b", torch.bfloat16, "cuda", layers)
    cals, _ = calibrations(model, "teal", "all", [0.5], 1024, 128, False)
    from sparseffn.patching import install

    install(model, cals[0], kernel_mode="auto")
    _recompile(model)
    rate(model, "lean", "sparse lean (fresh process)")
    rate(model, "generate", "sparse generate (2nd)")
    rate(model, "lean", "sparse lean (3rd, same graphs)")
    _recompile(model)
    rate(model, "generate", "sparse generate after dynamo reset")
    sparseffn.unsparsify(model)
    _recompile(model)
    rate(model, "lean", "dense lean")
    rate(model, "generate", "dense generate")
    install(model, cals[0], kernel_mode="auto")
    _recompile(model)
    rate(model, "lean", "sparse lean after dense (reset)")
    torch.cuda.empty_cache()
    print(f"memory allocated {torch.cuda.memory_allocated() / 2**30:.1f} GiB, "
          f"reserved {torch.cuda.memory_reserved() / 2**30:.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
