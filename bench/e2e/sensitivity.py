"""How far a patched model's outputs move under rounding-sized changes, layer by layer.

    python -m bench.e2e.sensitivity --shape llama3-8b --method teal:all --sparsity 0.5 \
        --json out.json

Feeds one prompt and 32 random tokens (teacher forcing) through the reference path and through
variants of it, and reports for each variant the relative difference of the new token's hidden
state after every layer, at the prefill and at every decode step, and the logits' agreement:
    kernel path (twice); the reference path on the kernels' weight layout (same math, another
    summation order in F.linear); the reference path with 1e-3 relative noise on every sparse
    module's output.
This is the tool that showed the H200 whole-model check failure to be the random model's
sensitivity, not a kernel fault (docs/e2e.md, docs/results/rounding_*.json).
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch

import sparseffn
from bench.e2e.check import perturbed_outputs
from bench.e2e.run import calibrations
from bench.e2e.shapes import build_model
from sparseffn.patching import install, set_kernel_mode


@torch.no_grad()
def teacher_forced_states(model, ids, tokens):
    """((prefill logits [B, V], hidden states [L+1, B, H]), step logits [T, B, V], step hidden
    states [T, L+1, B, H]) of the last position, feeding ``tokens`` [B, T] one at a time."""
    from transformers import DynamicCache

    from sparseffn.generation import cache_kwarg
    cache = {cache_kwarg(model): DynamicCache(config=model.config)}
    o = model(input_ids=ids, use_cache=True, output_hidden_states=True, **cache)
    pre = (o.logits[:, -1].float(), torch.stack([h[:, -1].float() for h in o.hidden_states]))
    logits, hs = [], []
    for t in range(tokens.shape[1]):
        o = model(input_ids=tokens[:, t:t + 1], use_cache=True, output_hidden_states=True,
                  **cache)
        logits.append(o.logits[:, -1].float())
        hs.append(torch.stack([h[:, -1].float() for h in o.hidden_states]))
    return pre, torch.stack(logits), torch.stack(hs)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(name, res, ref):
    (pl, ph), lg, hs = res
    (rpl, rph), rlg, rhs = ref
    T, L = hs.shape[0], hs.shape[1]
    out = {
        "prefill_logit_rel": rel(pl, rpl),
        "prefill_argmax_same": bool((pl.argmax(-1) == rpl.argmax(-1)).all()),
        "prefill_hidden_rel_by_layer": [round(rel(ph[i], rph[i]), 6) for i in range(L)],
        "argmax_agree_by_step": [int((lg[t].argmax(-1) == rlg[t].argmax(-1)).all())
                                 for t in range(T)],
        "logit_rel_by_step": [round(rel(lg[t], rlg[t]), 5) for t in range(T)],
        "hidden_rel_step0_by_layer": [round(rel(hs[0, i], rhs[0, i]), 6) for i in range(L)],
        "hidden_rel_last_by_layer": [round(rel(hs[-1, i], rhs[-1, i]), 6) for i in range(L)],
        "final_hidden_rel_by_step": [round(rel(hs[t, -1], rhs[t, -1]), 5) for t in range(T)],
        "max_abs_logit_diff_over_std": float((lg - rlg).abs().max() / rlg.std()),
    }
    short = {k: out[k] for k in ("prefill_logit_rel", "prefill_argmax_same",
                                 "max_abs_logit_diff_over_std")}
    short["argmax_agree"] = sum(out["argmax_agree_by_step"]) / T
    short["step0_layers"] = out["hidden_rel_step0_by_layer"][:6] + ["..."] + \
        out["hidden_rel_step0_by_layer"][-3:]
    short["logit_rel_steps"] = out["logit_rel_by_step"][:6]
    print(f"== {name}: {short}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="bench.e2e.sensitivity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--method", default="teal:all")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--mode", default="auto")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--json")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype)
    model = build_model(a.shape, dtype, dev, a.layers)
    method, _, scope = a.method.partition(":")
    cals, _ = calibrations(model, method, scope or "mlp", [a.sparsity], 1024, 256, False)
    install(model, cals[0], kernel_mode="never")
    print(f"[{time.perf_counter() - t0:.0f}s] built and calibrated", flush=True)
    g = torch.Generator().manual_seed(7)
    V = model.config.vocab_size
    ids = torch.randint(1, V, (1, a.prompt), generator=g).to(dev)
    tokens = torch.randint(1, V, (1, a.steps), generator=g).to(dev)
    results = {}

    def run(mode, ctx=None, keep_layout_reference=False):
        """Teacher-forced states under ``mode``, inside ``ctx``."""
        with ctx or nullcontext():
            sparseffn.set_kernel_mode(model, mode)
            if keep_layout_reference:  # the kernels' layout, then the reference path on it
                set_kernel_mode(model, "never", keep_layout=True)
            r = teacher_forced_states(model, ids, tokens)
        sparseffn.set_kernel_mode(model, "never")
        return r

    ref = run("never")
    results["ref_again"] = compare("ref again (determinism)", run("never"), ref)
    results["kernel"] = compare("kernel path", run(a.mode), ref)
    results["kernel_again"] = compare("kernel path again", run(a.mode), ref)
    # the kernels' weight layout, reference math on decode steps
    results["layout_only"] = compare("layout only", run(a.mode, keep_layout_reference=True),
                                     ref)
    results["noise_1e-3"] = compare("reference + 1e-3 noise", run(
        "never", perturbed_outputs(model, 1e-3, normal=True, seed=3)), ref)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), **results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
