"""Decode timing in two harnesses (sparseffn.generate, HF generate with a static cache), a
step profile, and the kernel-path correctness check."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

import sparseffn


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_seconds(fn: Callable[[], object], repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prompt_ids(model: nn.Module, batch: int, prompt: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return torch.randint(1, vocab, (batch, prompt), generator=g).to(model.device)


def run_decode(model: nn.Module, harness: str, ids: torch.Tensor, new_tokens: int) -> None:
    """Greedy-decode ``new_tokens`` after ``ids`` through ``harness`` ("lean" or "generate")."""
    if harness == "lean":
        sparseffn.generate(model, ids, new_tokens, eos_token_id=None,
                           max_cache_len=ids.shape[1] + new_tokens)
    elif harness == "generate":
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=None, do_sample=False,
                       cache_implementation="static", eos_token_id=None, pad_token_id=0)
    else:
        raise ValueError(f"unknown harness {harness!r}")


def decode_rate(model: nn.Module, harness: str, batch: int, prompt: int, new_tokens: int,
                repeats: int = 3) -> float:
    """Decode tokens per second (all sequences): the time of ``new_tokens`` steps less the
    time of the prefill and first token, over the remaining steps. Warm-up runs first, so
    compilation, CUDA-graph recording and kernel tuning are not timed."""
    ids = prompt_ids(model, batch, prompt)
    device = str(ids.device)
    for n in (new_tokens, new_tokens, 1):
        run_decode(model, harness, ids, n)
    full = _median_seconds(lambda: run_decode(model, harness, ids, new_tokens), repeats, device)
    first = _median_seconds(lambda: run_decode(model, harness, ids, 1), repeats, device)
    return batch * (new_tokens - 1) / max(full - first, 1e-9)


CATEGORIES = (("sparse kernels", ("_input_sparse_kernel", "_gate_up_kernel",
                                  "_output_sparse_kernel")),
              ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
              ("dense GEMM/GEMV", ("gemm", "gemv", "cutlass", "sm90_xmma", "nvjet", "cublas")))


def profile_steps(model: nn.Module, batch: int, prompt: int, steps: int = 16,
                  harness: str = "lean") -> dict:
    """One profiled decode of ``steps`` + 1 tokens through ``harness`` (after a warm-up run):
    GPU time per step by category in microseconds, the wall time per step, and host calls
    per step (CUDA-graph replays against single kernel launches: a step that replays one
    graph launches nothing else; many launches mean the graph was skipped or split)."""
    from torch.profiler import ProfilerActivity, profile

    ids = prompt_ids(model, batch, prompt)
    run_decode(model, harness, ids, steps + 1)
    _sync("cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        run_decode(model, harness, ids, steps + 1)
        _sync("cuda")
        wall = time.perf_counter() - t0
    out = {name: 0.0 for name, _ in CATEGORIES}
    out["other"] = 0.0
    launches = {"graph_launches": 0, "kernel_launches": 0}
    for evt in prof.key_averages():
        key = evt.key.lower()
        if key.startswith("cudagraphlaunch"):
            launches["graph_launches"] += evt.count
        elif key.startswith(("cudalaunchkernel", "culaunchkernel")):
            launches["kernel_launches"] += evt.count
        if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CPU:
            continue
        t = getattr(evt, "self_device_time_total", 0.0) or getattr(evt, "self_cuda_time_total", 0)
        if t <= 0:
            continue
        cat = next((name for name, pats in CATEGORIES if any(p in key for p in pats)), "other")
        out[cat] += t
    # The prefill is profiled too; it is one forward of `prompt` tokens, averaged in.
    result = {k: v / (steps + 1) for k, v in {**out, **launches}.items()}
    result["wall_per_step_us"] = wall * 1e6 / (steps + 1)
    result["harness"] = harness
    return result


@torch.no_grad()
def teacher_forced_logits(model: nn.Module, ids: torch.Tensor, tokens: torch.Tensor,
                          before_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Logits [steps, B, V] (fp32) of feeding ``tokens`` [B, steps] one at a time after ``ids``;
    ``before_step(t)`` is called before decode step t."""
    from transformers import DynamicCache

    from sparseffn.generation import cache_kwarg

    cache = {cache_kwarg(model): DynamicCache(config=model.config)}
    model(input_ids=ids, use_cache=True, **cache)
    out = []
    for t in range(tokens.shape[1]):
        if before_step is not None:
            before_step(t)
        step = model(input_ids=tokens[:, t:t + 1], use_cache=True, **cache)
        out.append(step.logits[:, -1].float())
    return torch.stack(out)


@torch.no_grad()
def check_kernel_path(model: nn.Module, batch: int = 1, prompt: int = 64,
                      new_tokens: int = 64, kernel_mode: str = "auto") -> dict:
    """Kernel path against the reference path on one patched model and one input.

    Both paths are fed the same 64 tokens (the kernel path's greedy output): the largest
    logit difference, relative to the logits' spread, and whether each step's argmax agrees;
    then both decode greedily on their own and the generations are compared. ``in_model_*``
    compares every wrapper's output *inside* the kernel-path run with its reference output on
    the same input, which names the first module that departs if the logits do.
    """
    ids = prompt_ids(model, batch, prompt, seed=7)
    module_err = module_errors(model, ids, kernel_mode)
    sparseffn.set_kernel_mode(model, kernel_mode)
    gen_kernel = sparseffn.generate(model, ids, new_tokens, eos_token_id=None, compile=False)
    tokens = gen_kernel[:, prompt:]
    kern, in_model = in_model_errors(model, ids, tokens, kernel_mode)
    sparseffn.set_kernel_mode(model, "never")
    ref = teacher_forced_logits(model, ids, tokens)
    gen_ref = sparseffn.generate(model, ids, new_tokens, eos_token_id=None, compile=False)
    sparseffn.set_kernel_mode(model, kernel_mode)
    diff = (kern - ref).abs()
    same = gen_kernel[:, prompt:] == gen_ref[:, prompt:]
    first_diff = int((~same).float().argmax(dim=1).min()) if not bool(same.all()) else new_tokens
    return {**module_err, **in_model, "max_abs_logit_diff": float(diff.max()),
            "logit_std": float(ref.std()),
            "rel_max_diff": float(diff.max() / ref.std()),
            "argmax_agree_teacher_forced": float((kern.argmax(-1) == ref.argmax(-1)).float()
                                                 .mean()),
            "greedy_tokens_identical": float(same.float().mean()),
            "greedy_first_divergence": first_diff}


#: Relative error above which ``in_model_errors`` reports a module as departing.
DEPART = 0.05


@torch.no_grad()
def in_model_errors(model: nn.Module, ids: torch.Tensor, tokens: torch.Tensor,
                    kernel_mode: str = "auto") -> tuple[torch.Tensor, dict]:
    """Teacher-forced logits of the kernel path, and each wrapper's in-run output against its
    reference output on the input it saw there (decode steps only): max and median relative
    error, and the first (step, module) whose error exceeds ``DEPART``."""
    from sparseffn.patching import sparse_modules

    mods = [(f"layer{i}.{type(m).__name__}.{getattr(m, 'site', 'mlp')}", m)
            for i, m in sparse_modules(model)]
    seen: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
    step = {"n": -1}  # -1: prefill, not recorded

    def recorder(i: int) -> Callable:
        def hook(mod, args, out):
            if step["n"] >= 0:
                seen.append((step["n"], i, args[0].detach().clone(), out.detach().clone()))
        return hook
    hooks = [m.register_forward_hook(recorder(i)) for i, (_, m) in enumerate(mods)]
    sparseffn.set_kernel_mode(model, kernel_mode)
    try:
        logits = teacher_forced_logits(model, ids, tokens,
                                       before_step=lambda t: step.__setitem__("n", t))
    finally:
        for h in hooks:
            h.remove()
    sparseffn.set_kernel_mode(model, "never")
    errs, first = [], None
    for t, i, x, y in seen:
        r = mods[i][1](x).float()
        e = float((y.float() - r).norm() / r.norm().clamp_min(1e-30))
        errs.append(e)
        if first is None and e > DEPART:
            first = f"step {t} {mods[i][0]} ({e:.3g})"
    sparseffn.set_kernel_mode(model, kernel_mode)
    return logits, {
        "in_model_rel_err_max": max(errs) if errs else 0.0,
        "in_model_rel_err_median": statistics.median(errs) if errs else 0.0,
        "in_model_first_departure": first or "none"}


@torch.no_grad()
def module_errors(model: nn.Module, ids: torch.Tensor, kernel_mode: str = "auto") -> dict:
    """Per-module relative error of the kernel path against the reference path on the same
    decode-step input (each wrapper's real input at one decode step): ||k - r|| / ||r||."""
    from sparseffn.patching import sparse_modules

    inputs: dict[int, torch.Tensor] = {}
    mods = [m for _, m in sparse_modules(model)]
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach().clone()))
        for i, m in enumerate(mods)]
    sparseffn.set_kernel_mode(model, "never")
    teacher_forced_logits(model, ids, ids[:, -1:])  # one decode step after the prompt
    for h in hooks:
        h.remove()
    errs = []
    for i, m in enumerate(mods):
        x = inputs[i]
        m.set_kernel_mode(kernel_mode)
        k = m(x).float()
        m.set_kernel_mode("never")
        r = m(x).float()
        errs.append(float((k - r).norm() / r.norm()))
    sparseffn.set_kernel_mode(model, kernel_mode)
    return {"module_rel_err_max": max(errs), "module_rel_err_median": statistics.median(errs)}
