"""The kernel path against the reference path on one patched model: logits, greedy generations,
and every module on the inputs it saw.

    python -m bench.e2e.check --model builtin --methods teal:all chess --sparsities 0 0.5
    python -m bench.e2e.check --model llama3-8b --methods teal:all --sparsities 0 0.5

The reference runs the same thresholds through PyTorch on the kernels' weight layout, so the
prefill of both paths is bit-identical and only the decode steps differ.

Why the check carries yardsticks: a threshold makes the sparse model discontinuous. An input
within rounding of its threshold may be decided either way, and one channel decided the other
way changes its projection's output by about 1/sqrt(active channels) of its size (2% at 50% of
4096), far more than rounding; over many layers such changes compound. So the check also
measures how far the reference path moves under rounding alone, and the kernel path should move
no further:
  ``rounding_*``: the reference path on the original weight layout (F.linear sums in another
      order) against the reference path on the kernels' layout. On the H200 the Llama-3-8B shape
      with random weights under TEAL 50% departed as far this way as with the kernel path, in
      fp32 too (docs/e2e.md). Some models give bit-identical results here (SmolLM2 did).
  ``one_rounding_*``: every sparse module's output rounded once more (``one_rounding``).
In bf16 both paths' greedy generations part within a few tokens on SmolLM2 too, as they do
under one extra rounding; greedy agreement is a test of the model's margins, not of the
kernels. ``in_model_*`` names the first module whose output departs from its reference on the
same input inside the kernel-path run: that is where a kernel bug would show.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

import sparseffn
from bench.e2e.harness import prompt_ids
from sparseffn.patching import set_kernel_mode, sparse_modules
from sparseffn.testing import teacher_forced_logits

#: Relative error of one module's output (same input) above which it is reported as departing.
#: A channel decided the other way near its threshold moves an output by about
#: 1/sqrt(active channels): 0.13 at 90% sparsity of 576 channels (SmolLM2), the worst case we
#: run; a kernel that computes something else (stale data, a wrong row) gives errors near 1.
DEPART = 0.25


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Logits a, b [steps, B, V]: the largest difference, relative to b's spread, and how often
    the argmax agrees."""
    diff = (a - b).abs()
    return {"max_abs_logit_diff": float(diff.max()), "logit_std": float(b.std()),
            "rel_max_diff": float(diff.max() / b.std()),
            "argmax_agree_teacher_forced": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def _greedy(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return sparseffn.generate(model, ids, new_tokens, eos_token_id=None, compile=False)


@torch.no_grad()
def check_kernel_path(model: nn.Module, batch: int = 1, prompt: int = 64,
                      new_tokens: int = 64, kernel_mode: str = "auto",
                      ids: torch.Tensor | None = None) -> dict:
    """Kernel path against the reference path (on the kernels' layout) on one input.

    ``ids`` [B, P] (default: random tokens, ``batch`` x ``prompt``). Both paths are fed the
    kernel path's greedy tokens (teacher forcing): the largest logit difference relative to the
    logits' spread, and how often each step's argmax agrees; then both decode greedily on their
    own. ``rounding_*`` and ``one_rounding_*``: the same comparisons for the reference path on
    the original layout, and with every sparse output rounded once more, against the reference
    path (the yardsticks of the module docstring); ``within_rounding`` sums them up.
    ``module_*``: each module alone on a real decode-step input; ``in_model_*``: each module
    inside the kernel-path run.
    """
    ids = ids if ids is not None else prompt_ids(model, batch, prompt, seed=7)
    P = ids.shape[1]
    module_err = module_errors(model, ids, kernel_mode)
    set_kernel_mode(model, kernel_mode)
    gen_kernel = _greedy(model, ids, new_tokens)
    tokens = gen_kernel[:, P:]
    kern, in_model = in_model_errors(model, ids, tokens, kernel_mode)
    set_kernel_mode(model, "never", keep_layout=True)
    ref = teacher_forced_logits(model, ids, tokens)
    gen_ref = _greedy(model, ids, new_tokens)
    with perturbed_outputs(model):  # one rounding more
        ref_noisy = teacher_forced_logits(model, ids, tokens)
        gen_noisy = _greedy(model, ids, new_tokens)
    set_kernel_mode(model, "never")
    ref_orig = teacher_forced_logits(model, ids, tokens)
    gen_orig = _greedy(model, ids, new_tokens)
    set_kernel_mode(model, kernel_mode)

    def greedy(a: torch.Tensor, b: torch.Tensor, prefix: str) -> dict:
        same = a[:, P:] == b[:, P:]
        first = int((~same).float().argmax(dim=1).min()) if not bool(same.all()) else new_tokens
        return {f"{prefix}greedy_tokens_identical": float(same.float().mean()),
                f"{prefix}greedy_first_divergence": first}
    out = {**module_err, **in_model, **_agreement(kern, ref), **greedy(gen_kernel, gen_ref, "")}
    for prefix, logits, gen in (("rounding_", ref_orig, gen_orig),
                                ("one_rounding_", ref_noisy, gen_noisy)):
        out.update({prefix + k: v for k, v in _agreement(logits, ref).items()
                    if k != "logit_std"})
        out.update(greedy(gen, gen_ref, prefix))
    yardstick = max(out["rounding_rel_max_diff"], out["one_rounding_rel_max_diff"])
    out["within_rounding"] = bool(
        out["rel_max_diff"] <= 2 * yardstick + 1e-3
        and out["in_model_rel_err_max"] < DEPART and out["module_rel_err_max"] < DEPART)
    return out


@contextmanager
def perturbed_outputs(model: nn.Module, scale: float | None = None, normal: bool = False,
                      seed: int = 0) -> Iterator[None]:
    """Every sparse module's output y becomes y * (1 + scale * e), e uniform in [-1/2, 1/2]
    (or standard normal); ``scale`` None is the eps of y's dtype: a different rounding of each
    output element, about what another summation order gives (the ``one_rounding_*``
    yardstick of ``check_kernel_path``)."""
    gen: dict[torch.device, torch.Generator] = {}

    def hook(mod, args, out):
        if out.device not in gen:
            gen[out.device] = torch.Generator(device=out.device).manual_seed(seed)
        draw = torch.randn if normal else torch.rand
        e = draw(out.shape, generator=gen[out.device], device=out.device)
        e = e if normal else e - 0.5
        s = torch.finfo(out.dtype).eps if scale is None else scale
        return (out.float() * (1 + s * e)).to(out.dtype)
    hooks = [m.register_forward_hook(hook) for _, m in sparse_modules(model)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def in_model_errors(model: nn.Module, ids: torch.Tensor, tokens: torch.Tensor,
                    kernel_mode: str = "auto") -> tuple[torch.Tensor, dict]:
    """Teacher-forced logits of the kernel path, and each wrapper's in-run output against its
    reference output on the input it saw there (decode steps only): max and median relative
    error, and the first (step, module) whose error exceeds ``DEPART``."""
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
    set_kernel_mode(model, kernel_mode)
    try:
        logits = teacher_forced_logits(model, ids, tokens,
                                       before_step=lambda t: step.__setitem__("n", t))
    finally:
        for h in hooks:
            h.remove()
    set_kernel_mode(model, "never", keep_layout=True)
    errs, first = [], None
    for t, i, x, y in seen:
        r = mods[i][1](x).float()
        e = float((y.float() - r).norm() / r.norm().clamp_min(1e-30))
        errs.append(e)
        if first is None and e > DEPART:
            first = f"step {t} {mods[i][0]} ({e:.3g})"
    set_kernel_mode(model, kernel_mode)
    return logits, {
        "in_model_rel_err_max": max(errs) if errs else 0.0,
        "in_model_rel_err_median": statistics.median(errs) if errs else 0.0,
        "in_model_first_departure": first or "none"}


@torch.no_grad()
def module_errors(model: nn.Module, ids: torch.Tensor, kernel_mode: str = "auto") -> dict:
    """Per-module relative error of the kernel path against the reference path on the same
    decode-step input (each wrapper's real input at one decode step): ||k - r|| / ||r||."""
    inputs: dict[int, torch.Tensor] = {}
    mods = [m for _, m in sparse_modules(model)]
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach().clone()))
        for i, m in enumerate(mods)]
    set_kernel_mode(model, kernel_mode)
    set_kernel_mode(model, "never", keep_layout=True)
    teacher_forced_logits(model, ids, ids[:, -1:])  # one decode step after the prompt
    for h in hooks:
        h.remove()
    errs = []
    for i, m in enumerate(mods):
        x = inputs[i]
        m.set_kernel_mode(kernel_mode)
        k = m(x).float()
        m.set_kernel_mode("never", keep_layout=True)
        r = m(x).float()
        errs.append(float((k - r).norm() / r.norm()))
    set_kernel_mode(model, kernel_mode)
    return {"module_rel_err_max": max(errs), "module_rel_err_median": statistics.median(errs)}


def _builtin(dtype: torch.dtype, device: str, batch: int, prompt: int):
    """SmolLM2, its calibration text (pydoc topics, always present) and real-text prompts."""
    from sparseffn.data import builtin_texts, token_windows
    from sparseffn.models import load_builtin_model

    model, tok = load_builtin_model(dtype, device)
    prompts = token_windows(tok, builtin_texts("pydoc", "eval"), batch * prompt, prompt,
                            purpose="prompt")[:batch].to(device)
    return model, tok, builtin_texts("pydoc", "calibration"), prompts


def run(args: argparse.Namespace) -> dict:
    from sparseffn.calibration import calibrate_model
    from sparseffn.config import SparsityConfig
    from sparseffn.patching import install, update_thresholds

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    if args.model == "builtin":
        model, tok, texts, ids = _builtin(dtype, args.device, args.batch, args.prompt)
    else:
        from bench.e2e.shapes import build_model
        model = build_model(args.model, dtype, args.device, args.layers)
        tok, ids = None, prompt_ids(model, args.batch, args.prompt, seed=7)
        g = torch.Generator().manual_seed(11)
        texts = torch.randint(1, model.config.vocab_size, (max(1, args.calib_tokens // 256), 256),
                              generator=g)
    settings = {k: v for k, v in vars(args).items() if not callable(v)}  # not the CLI's func
    results: dict = {"args": settings, "checks": {}}
    for spec in args.methods:
        method, _, scope = spec.partition(":")
        cals = [calibrate_model(model, tok, texts, SparsityConfig(method=method, sparsity=s,
                                                                  scope=scope or "mlp"),
                                args.calib_tokens, 256, batch_size=4, progress=False,
                                data_name="pydoc" if tok is not None else "random token ids")
                for s in args.sparsities]
        install(model, cals[0], kernel_mode=args.kernel_mode)
        for s, cal in zip(args.sparsities, cals):
            update_thresholds(model, cal)
            res = check_kernel_path(model, new_tokens=args.new_tokens,
                                    kernel_mode=args.kernel_mode, ids=ids)
            results["checks"][f"{spec}@{s}"] = res
            print(f"[{time.perf_counter() - t0:5.0f}s] {spec}@{s}: {res}", flush=True)
            if args.json:  # after every check: a cut-off run keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
        sparseffn.unsparsify(model)
    print(summary_table(results["checks"]))
    return results


def summary_table(checks: dict[str, dict]) -> str:
    """One line per checked point: the verdict and the numbers behind it."""
    lines = [f"{'point':<18} {'verdict':<18} {'greedy same':>11} {'argmax agree':>12} "
             f"{'max rel err':>11}  first departing module"]
    for point, c in checks.items():
        verdict = "within rounding" if c["within_rounding"] else "BEYOND ROUNDING"
        lines.append(f"{point:<18} {verdict:<18} {c['greedy_tokens_identical']:>11.3f} "
                     f"{c['argmax_agree_teacher_forced']:>12.3f} "
                     f"{c['in_model_rel_err_max']:>11.2e}  {c['in_model_first_departure']}")
    return "\n".join(lines)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="bench.e2e.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin",
                   help="'builtin' (SmolLM2, real text) or a shape of bench.e2e.shapes")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (shapes only)")
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", default=["teal:all", "chess"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.5])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--kernel-mode", default="auto", choices=["auto", "always"])
    p.add_argument("--json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import triton_kernels.cpu
    from sparseffn.dispatch import kernels_on
    device_type = torch.device(args.device).type
    # On the CPU the kernel path is the compiled CPU ops (or, under TRITON_INTERPRET=1 and
    # --kernel-mode always, the Triton interpreter).
    runs = kernels_on(device_type) if device_type == "cuda" else (
        device_type == "cpu" and (triton_kernels.cpu.available()
                                  or (kernels_on("cpu") and args.kernel_mode == "always")))
    if not runs:
        # Otherwise the "kernel path" would be the reference path compared with itself.
        raise SystemExit(
            f"bench check compares the kernel path with the reference path, and it does not "
            f"run on {args.device} here under --kernel-mode {args.kernel_mode}: use a CUDA "
            "device, or on the CPU a machine with a C++ compiler (the CPU ops), or set "
            "TRITON_INTERPRET=1 and pass --kernel-mode always --dtype float32")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
