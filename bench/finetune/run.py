"""Fine-tuning towards sparsity on SmolLM2-135M, CPU, every method against a plain fine-tune.

For each method (and ``none``: the same steps and data without a regularizer) the recipe of
``sparseffn finetune`` trains the built-in model on Austen (calibration books); then each model,
and the untouched base model (training-free), is measured on held-out text (*Persuasion*, and
a second source, ``pydoc`` by default):

- dense perplexity, and activation sparsity at the base model's per-layer median |a| (the
  fraction of activations a regularizer pushed below where half of the base model's were);
- calibrated (CHESS by default) at each level: measured sparsity and perplexity on both texts.

    python -m bench.finetune.run --csv docs/results/finetune_smollm2.csv \
        --curve-csv docs/results/finetune_smollm2_curve.csv --plot docs/img/finetune_smollm2.png

Wall times are recorded per phase and in total, with the process's CPU time and the load
average (other work on the machine slows a run down); nothing is cached between runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import sparseffn
from bench.finetune.report import markdown_tables, plot, write_csv
from sparseffn.data import load_texts, token_windows
from sparseffn.eval.perplexity import perplexity
from sparseffn.finetune import SparsityRegularization, training_windows
from sparseffn.finetune.recipe import (FINETUNE_METHODS, FinetuneConfig, calibrate_finetuned,
                                       finetune)
from sparseffn.models import load_builtin_model


@dataclass
class ModelRow:
    """One model: trained with ``method`` (or ``base``: not trained)."""

    method: str
    train_seconds: float
    final_train_loss: float
    ppl_heldout: float
    ppl_other: float
    sparsity_at_base_median: float  # on the held-out text
    exact_zero_fraction: float
    eval_seconds: float


@dataclass
class CurveRow:
    method: str
    target: float
    measured: float
    ffn_bytes_skipped: float
    ppl_heldout: float
    ppl_other: float


def _measure(model, windows, tolerance):
    """(perplexity, density per layer) with activation counting on."""
    reg = SparsityRegularization(model, [], tolerance=tolerance)
    try:
        ppl = perplexity(model, windows)
        return ppl, reg.density(), [reg.tolerance(i).clone() for i in range(len(reg.probes))]
    finally:
        reg.remove(keep_activation=True)


def evaluate(name, model, tokenizer, data, args, base_tolerance, log):
    """ModelRow fields after training, plus the calibrated curve."""
    start = time.time()
    ppl_held, density, tol = _measure(model, data["heldout"], base_tolerance)
    _, zeros_density, _ = _measure(model, data["heldout"][:1], 0.0)
    ppl_other = perplexity(model, data["other"])
    curve = []
    for level in args.levels:
        calibrate_finetuned(model, tokenizer, data["calib"], level, args.calib_method,
                            n_tokens=args.calib_tokens)
        sparseffn.reset_sparsity_stats(model)
        ppl_h = perplexity(model, data["heldout"])
        report = sparseffn.sparsity_report(model)
        ppl_o = perplexity(model, data["other"])
        sparseffn.unsparsify(model)
        curve.append(CurveRow(name, level, report.overall, report.ffn_bytes_skipped, ppl_h, ppl_o))
        log(f"  {name:<10} {args.calib_method} {level:.2f}: measured {report.overall:.3f} "
            f"ppl {ppl_h:.2f} / {ppl_o:.2f}")
    stats = dict(ppl_heldout=ppl_held, ppl_other=ppl_other,
                 sparsity_at_base_median=1.0 - float(density.mean()),
                 exact_zero_fraction=1.0 - float(zeros_density.mean()),
                 eval_seconds=time.time() - start)
    return stats, curve, tol


def config_for(method: str, args) -> FinetuneConfig:
    weight = {"l1": args.l1_weight, "prosparse": args.l1_weight,
              "density": args.density_weight}.get(method, 0.0)
    return FinetuneConfig(method=method, sparsity=args.target,
                          threshold_method=args.threshold_method, steps=args.steps,
                          batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                          weight=weight, warmup=args.warmup, stages=args.stages,
                          relu_shift=args.relu_shift, trainable=args.trainable,
                          lora_r=args.lora_r, lora_alpha=2.0 * args.lora_r,
                          calib_tokens=args.calib_tokens, seed=args.seed,
                          logging_steps=max(1, args.steps // 10))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["none", "l1", "density", "fixed", "relu"],
                   choices=FINETUNE_METHODS)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--trainable", default="ffn", choices=("lora", "ffn", "all"))
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--target", type=float, default=0.7, help="training target sparsity")
    p.add_argument("--threshold-method", default="chess", choices=("cats", "chess"),
                   help="thresholds the 'fixed' method trains with")
    p.add_argument("--l1-weight", type=float, default=10.0)
    p.add_argument("--density-weight", type=float, default=5.0)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--relu-shift", type=float, default=0.0)
    p.add_argument("--levels", nargs="+", type=float, default=[0.5, 0.7, 0.8])
    p.add_argument("--calib-method", default="chess", choices=("cats", "chess"))
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--data", default="austen", help="training and calibration text")
    p.add_argument("--other", default="pydoc", help="second held-out source")
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", help="per-model results")
    p.add_argument("--curve-csv", help="perplexity against calibrated sparsity")
    p.add_argument("--plot", help="PNG of the curves")
    p.add_argument("--json", help="everything, with the training logs")
    args = p.parse_args(argv)

    t0, cpu0, load0 = time.time(), time.process_time(), os.getloadavg()
    log = lambda msg: print(f"[{time.time() - t0:7.0f}s] {msg}", flush=True)  # noqa: E731
    torch.manual_seed(args.seed)
    model, tokenizer = load_builtin_model()
    train_texts = load_texts(args.data, "calibration")
    data = {"calib": train_texts,
            "heldout": token_windows(tokenizer, load_texts(args.data, "eval"),
                                     args.eval_tokens, 512, "evaluation"),
            "other": token_windows(tokenizer, load_texts(args.other, "eval"),
                                   args.eval_tokens, 512, "evaluation")}
    windows = training_windows(tokenizer, train_texts, args.steps * args.batch_size, args.seq_len)
    log(f"training windows {tuple(windows.shape)}; held-out {args.data} "
        f"{data['heldout'].numel()} and {args.other} {data['other'].numel()} tokens")

    stats, curve, base_tol = evaluate("base", model, tokenizer, data, args, None, log)
    rows = [ModelRow("base", 0.0, float("nan"), **stats)]
    curves, logs = list(curve), {}
    log(f"base: ppl {stats['ppl_heldout']:.2f} / {stats['ppl_other']:.2f}")
    for method in args.methods:
        model, _ = load_builtin_model()
        config = config_for(method, args)
        result = finetune(model, tokenizer, windows, config, calibration_texts=train_texts,
                          progress=False)
        losses = [e["loss"] for e in result.log_history if "loss" in e]
        log(f"{method}: trained {args.steps} steps in {result.seconds:.0f} s, "
            f"last logged loss {losses[-1]:.3f}")
        stats, curve, _ = evaluate(method, result.model, tokenizer, data, args, base_tol, log)
        rows.append(ModelRow(method, result.seconds, losses[-1], **stats))
        curves.extend(curve)
        logs[method] = {"config": asdict(config), "trainer": result.log_history,
                        "sparsity": result.history}
        log(f"{method}: ppl {stats['ppl_heldout']:.2f} / {stats['ppl_other']:.2f}, sparsity at "
            f"base median {stats['sparsity_at_base_median']:.3f}")
    total = time.time() - t0
    meta = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "train_data": args.data,
            "heldout": f"{args.data} eval split", "other": f"{args.other} eval split",
            "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "lr": args.lr, "trainable": args.trainable, "calib_method": args.calib_method,
            "total_seconds": round(total), "process_cpu_seconds": round(time.process_time() - cpu0),
            "loadavg_start": round(load0[0], 2), "loadavg_end": round(os.getloadavg()[0], 2)}
    print(markdown_tables(rows, curves, args))
    log(f"total wall time {total:.0f} s")
    if args.csv:
        write_csv([asdict(r) for r in rows], args.csv, meta)
    if args.curve_csv:
        write_csv([asdict(r) for r in curves], args.curve_csv, meta)
    if args.plot:
        plot(rows, curves, args.plot,
             f"SmolLM2-135M, CPU: {args.steps} steps x {args.batch_size} x {args.seq_len} tokens "
             f"of {args.data}, {args.trainable}; {args.calib_method} calibration", other=args.other)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "logs": logs}, indent=1,
                                              default=str))


if __name__ == "__main__":
    main()
