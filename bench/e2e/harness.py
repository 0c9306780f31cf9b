"""Decode timing in two harnesses (sparseffn.generate, HF generate with a static cache), a
step profile, and teacher-forced logits (for the correctness check in ``bench.e2e.check``)."""
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
                                  "_output_sparse_kernel", "_finish_kernel")),
              ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
              ("dense GEMM/GEMV", ("gemm", "gemv", "cutlass", "sm90_xmma", "nvjet", "cublas")))


def _profiled(model: nn.Module, harness: str, ids: torch.Tensor, tokens: int
              ) -> tuple[dict[str, tuple[float, int]], dict[str, int]]:
    """One profiled greedy decode of ``tokens`` tokens after ``ids``: device time (us) and
    count per kernel name, and host launch calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_decode(model, harness, ids, tokens)
        _sync("cuda")
    kernels: dict[str, tuple[float, int]] = {}
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
        if t > 0:
            kernels[evt.key] = (t, evt.count)
    return kernels, launches


def category(kernel_name: str) -> str:
    """The profile category of a kernel name (CATEGORIES, else "other").

    Inductor's generated kernels (``triton_poi_``, ``triton_red_``, ``triton_per_``) are
    "other" whatever they are named after: their names list the ops they fused, e.g. an RMSNorm
    fused with views of ``input_sparse_gemv``'s output or a rotary embedding with the SDPA's
    input copies, and would otherwise count as GEMV or attention time."""
    key = kernel_name.lower()
    if key.startswith(("triton_poi_", "triton_red_", "triton_per_")):
        return "other"
    return next((name for name, pats in CATEGORIES if any(p in key for p in pats)), "other")


def profile_steps(model: nn.Module, batch: int, prompt: int, steps: int = 16,
                  harness: str = "lean", top: int = 25) -> dict:
    """GPU time of one decode step by category and by kernel, in microseconds.

    Two profiled runs after a warm-up: the prefill and first token alone, and the same with
    ``steps`` more tokens; their difference over ``steps`` is one decode step without the
    prefill. Also host calls per step (CUDA-graph replays against
    single kernel launches: a step that replays one graph launches nothing else; many
    launches mean the graph was skipped or split). ``kernels``: the ``top`` kernels by time
    per step, with their launches per step."""
    ids = prompt_ids(model, batch, prompt)
    run_decode(model, harness, ids, steps + 1)
    run_decode(model, harness, ids, 1)
    _sync("cuda")
    k_full, l_full = _profiled(model, harness, ids, steps + 1)
    k_pre, l_pre = _profiled(model, harness, ids, 1)
    per_step: dict[str, tuple[float, float]] = {}
    for name, (t, n) in k_full.items():
        t0, n0 = k_pre.get(name, (0.0, 0))
        per_step[name] = ((t - t0) / steps, (n - n0) / steps)
    out = {name: 0.0 for name, _ in CATEGORIES}
    out["other"] = 0.0
    for name, (t, _) in per_step.items():
        out[category(name)] += t
    for key in l_full:
        out[key] = (l_full[key] - l_pre[key]) / steps
    out["gpu_per_step_us"] = sum(t for t, _ in per_step.values())
    # (No wall time: under the profiler a difference of two wall times was off the GPU time by
    # up to 80%; tokens/s comes from the unprofiled timing.)
    out["harness"] = harness
    ranked = sorted(per_step.items(), key=lambda kv: -kv[1][0])[:top]
    out["kernels"] = [{"name": name[:120], "category": category(name), "us": round(t, 2),
                       "launches": round(n, 2)} for name, (t, n) in ranked]
    return out
