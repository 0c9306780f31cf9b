"""Command line: ``sparseffn calibrate | eval | demo | finetune | bench e2e | bench check |
bench kernels | bench anatomy``.

Every command works offline on the built-in model (``--model builtin``, the default) and
built-in text; ``--model`` also takes any local Hugging Face folder or hub name.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from calibrate.fit import MIN_TOKENS

DESCRIPTION = """Activation sparsity for Hugging Face LLMs: calibrate, evaluate, demo, fine-tune and
benchmark. Every command works offline on the built-in model (--model builtin, the default) and
built-in text; --model also takes a local Hugging Face folder or a hub name."""

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(name: str, dtype: str, device: str):
    """(model, tokenizer) for ``name`` ("builtin" or a transformers path/name)."""
    if name == "builtin":
        from sparseffn.models import load_builtin_model
        return load_builtin_model(DTYPES[dtype], device)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype]).to(device)
    except (OSError, ValueError) as exc:
        raise _flag_error("--model", f"cannot load {name!r} as a transformers causal LM "
                                     f"({str(exc).splitlines()[0]}); pass 'builtin', a local "
                                     "model folder or a hub name reachable from here") from None
    return model.eval(), tokenizer


def calib_tokens_arg(text: str) -> int:
    """argparse type of a calibration token count: an int of at least MIN_TOKENS."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < MIN_TOKENS:
        raise argparse.ArgumentTypeError(f"{value} is fewer than the {MIN_TOKENS} tokens "
                                         "calibration needs for stable thresholds")
    return value


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin",
                   help="'builtin' (SmolLM2-135M, offline) or a transformers folder/name")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="austen",
                   help="calibration text: a built-in source (austen, pydoc, news) or a "
                        ".txt/.jsonl file or folder")
    p.add_argument("--tokens", type=calib_tokens_arg, default=16384,
                   help=f"calibration tokens (at least {MIN_TOKENS})")
    p.add_argument("--seq-len", type=int, default=512)


def _flag_error(flag: str, what: str) -> Exception:
    from sparseffn.errors import SparseFFNError
    return SparseFFNError(f"{flag}: {what}")


def _check_out_folder(out: str, overwrite: bool) -> None:
    """Refuse --out before any work: an existing folder that is not a calibration, or a
    calibration without --overwrite."""
    from calibrate.artifact import JSON_NAME
    path = Path(out)
    if path.exists():
        if not (path / JSON_NAME).exists():
            raise _flag_error("--out", f"{path} exists and is not a calibration folder; "
                                       "choose a new --out")
        if not overwrite:
            raise _flag_error("--out", f"{path} already holds a calibration; pass --overwrite "
                                       "to replace it")


def _configs(specs: Sequence[str], levels: Sequence[float], flag: str) -> None:
    """Validate every ``method[:scope[:allocation]][:option=value]`` spec at every level before
    any work."""
    from sparseffn.config import SparsityConfig
    from sparseffn.errors import SparseFFNError
    from sparseffn.eval.sweep import parse_method
    for spec in specs:
        for level in levels:
            try:
                SparsityConfig(sparsity=level, **parse_method(spec))
            except SparseFFNError as exc:
                raise _flag_error(flag, f"{spec!r} at {level}: {exc}") from None


def cmd_calibrate(args: argparse.Namespace) -> None:
    import sparseffn
    from sparseffn.data import load_texts
    config = sparseffn.SparsityConfig(method=args.method, sparsity=args.sparsity,
                                      scope=args.scope, allocation=args.allocation,
                                      predictor_rank=args.predictor_rank,
                                      predictor_epochs=args.predictor_epochs,
                                      rotation=args.rotation)
    _check_out_folder(args.out, args.overwrite)
    load_texts(args.data, "calibration")  # refuse a bad source before loading the model
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    sparseffn.sparsify(model, calibration=args.data, tokenizer=tokenizer, config=config,
                       n_tokens=args.tokens, seq_len=args.seq_len)
    path = sparseffn.save_calibration(model, args.out, overwrite=args.overwrite)
    print(f"saved {args.method} calibration at sparsity {args.sparsity} to {path}")


def cmd_eval(args: argparse.Namespace) -> None:
    from sparseffn.data import load_texts
    from sparseffn.eval.sweep import (check_prompt_len, markdown_table, plot, quality_sweep,
                                      write_csv)
    _configs(args.methods, args.sparsities, "--methods/--sparsities")
    load_texts(args.data, "calibration")  # refuse a bad source before loading the model
    if args.harness == "lm-eval":
        return _eval_lm_eval(args)
    if not 0 <= args.prompt_len < args.seq_len - 1:
        raise _flag_error("--prompt-len", f"must be in [0, {args.seq_len - 2}] (below "
                          f"--seq-len {args.seq_len}), got {args.prompt_len}")
    check_prompt_len(args.methods, args.prompt_len)
    if args.tasks or args.limit is not None:
        from sparseffn.errors import SparseFFNError
        raise SparseFFNError("--tasks and --limit are lm-eval options: add --harness lm-eval")
    eval_texts = load_texts(args.eval_data, "eval")
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    extra = _run_facts(args)
    rows = quality_sweep(model, tokenizer, args.methods, args.sparsities, args.data, eval_texts,
                         eval_tokens=args.eval_tokens, seq_len=args.seq_len,
                         n_tokens=args.tokens, n_items=args.items,
                         on_row=(lambda done: write_csv(done, args.csv, extra)) if args.csv
                         else None, decode_tokens=args.decode_tokens,
                         prompt_len=args.prompt_len)
    print(markdown_table(rows))
    if args.csv:
        print(f"wrote {args.csv}")
    if args.plot:
        plot(rows, args.plot, f"{args.model} ({args.dtype}); calibration {args.data} "
                              f"{args.tokens} tok; held-out {args.eval_data} "
                              f"{args.eval_tokens} tok, {args.items} items per task")
        print(f"wrote {args.plot}")


def _run_facts(args: argparse.Namespace) -> dict[str, str]:
    """Device, versions, model and data: the columns every result line of ``eval`` carries."""
    from sparseffn.eval.speed import device_name
    return {"device": args.device, "device_name": device_name(args.device),
            "threads": str(torch.get_num_threads()), "torch": torch.__version__,
            "model": args.model, "dtype": args.dtype, "calibration_data": args.data,
            "eval_data": args.eval_data}


def _eval_lm_eval(args: argparse.Namespace) -> None:
    """``eval --harness lm-eval``: lm-eval's tasks on dense and every method/level."""
    from sparseffn.data import BUILTIN_SOURCES
    from sparseffn.errors import SparseFFNError
    from sparseffn.eval import harness
    from sparseffn.eval.sweep import decides_at_prompt, write_csv

    at_prompt = [m for m in args.methods if decides_at_prompt(m)]
    if at_prompt:
        raise SparseFFNError(f"{at_prompt} compute a prompt densely and decide from it; "
                             "lm-eval scores whole passages in one forward, which would "
                             "measure the dense model. Use the built-in harness with "
                             "--prompt-len")
    if not harness.lm_eval_available():
        raise SparseFFNError("--harness lm-eval needs lm-eval: pip install 'sparseffn[lm-eval]'")
    if args.plot:
        raise SparseFFNError("--plot draws the built-in evaluation; with --harness lm-eval "
                             "use --csv (one line per task and metric)")
    if args.tasks:
        tasks = args.tasks
    elif args.eval_data in BUILTIN_SOURCES:
        tasks = harness.offline_task_names((args.eval_data,))
    else:
        raise SparseFFNError(f"--eval-data {args.eval_data!r} is not a built-in source, so "
                             "there are no offline tasks for it: name lm-eval tasks with --tasks")
    sources = sorted({t.rsplit("_", 1)[1] for t in tasks if t.startswith(harness.PREFIX)})
    folder = harness.write_offline_tasks(sources, args.items) if sources else None
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    extra = {**_run_facts(args), "harness": "lm-eval " + _lm_eval_version()}
    rows = harness.harness_sweep(
        model, tokenizer, args.methods, args.sparsities, args.data, tasks,
        include_path=folder, batch_size=args.batch_size, limit=args.limit,
        n_tokens=args.tokens, seq_len=args.seq_len,
        on_row=(lambda done: write_csv(done, args.csv, extra)) if args.csv else None)
    print(harness.harness_table(rows))
    if args.csv:
        print(f"wrote {args.csv}")


def _lm_eval_version() -> str:
    from importlib.metadata import version
    return version("lm_eval")


def cmd_demo(args: argparse.Namespace) -> None:
    import sparseffn
    from sparseffn.data import load_texts, token_windows
    from sparseffn.eval.perplexity import perplexity
    from sparseffn.eval.sweep import decides_at_prompt, evaluate
    from sparseffn.eval.speed import decode_speed
    from sparseffn.eval.tasks import build_tasks

    _configs([f"{args.method}:{args.scope}"], [args.sparsity], "--method/--sparsity/--scope")
    start = time.time()
    print(f"sparseffn demo: {args.method} at sparsity {args.sparsity} on the built-in "
          "SmolLM2-135M (Python {}, torch {}, {})".format(platform.python_version(),
                                                         torch.__version__, args.device))
    model, tokenizer = load_model("builtin", args.dtype, args.device)
    eval_texts = load_texts(args.eval_data, "eval")
    windows = token_windows(tokenizer, eval_texts, args.eval_tokens, 512, "evaluation")
    tasks = build_tasks(tokenizer, eval_texts, args.items)
    print(f"held-out text: {args.eval_data} ({windows.numel()} tokens for perplexity, "
          f"{args.items} items per accuracy task)")
    # A method that decides at the prompt is scored on decode steps after half of each window
    # (dense too); its accuracy tasks (whole-passage forwards) would measure the dense model.
    at_prompt = decides_at_prompt(args.method)
    prompt_len = windows.shape[1] // 2 if at_prompt else 0
    if at_prompt:
        print(f"{args.method} decides at the prompt: perplexity on the decode steps after "
              f"{prompt_len} prompt tokens of each window; no accuracy tasks")
    phase = time.time()
    print("evaluating the dense model ...", flush=True)
    dense = evaluate(model, windows, tasks, progress=True, prompt_len=prompt_len)
    dense_speed = decode_speed(model, new_tokens=args.decode_tokens) \
        if args.decode_tokens else None
    from sparseffn.methods import method_class
    source = f"on {args.tokens} tokens of {args.data}" \
        if method_class(args.method).needs_calibration else "(no calibration text needed)"
    print(f"  done in {time.time() - phase:.0f} s; calibrating {args.method} at "
          f"{args.sparsity} {source} ...", flush=True)
    phase = time.time()
    sparseffn.sparsify(model, args.method, args.sparsity, args.data, tokenizer=tokenizer,
                       scope=args.scope, n_tokens=args.tokens)
    print(f"  done in {time.time() - phase:.0f} s; evaluating the sparse model ...", flush=True)
    phase = time.time()
    sparseffn.reset_sparsity_stats(model)
    sparse = {"perplexity": perplexity(model, windows, progress=True, prompt_len=prompt_len)}
    report = sparseffn.sparsity_report(model)  # over the held-out perplexity windows only
    sparse.update({task.name: float("nan") if at_prompt else task.evaluate(model, progress=True)
                   for task in tasks})
    sparse_speed = decode_speed(model, new_tokens=args.decode_tokens) \
        if args.decode_tokens else None
    print(f"  done in {time.time() - phase:.0f} s", flush=True)
    print(f"\n{'':<28}{'dense':>10}{'sparse':>10}")
    for key, label in (("perplexity", "perplexity"), ("next_sentence", "next-sentence acc"),
                       ("last_word", "last-word acc")):
        print(f"{label:<28}{dense[key]:>10.3f}{sparse[key]:>10.3f}")
    print(f"{'measured sparsity':<28}{0:>10.3f}{report.overall:>10.3f}  (target {args.sparsity})")
    print(f"{'FFN weight bytes skipped':<28}{0:>10.3f}{report.ffn_bytes_skipped:>10.3f}  "
          "(per decode step)")
    if dense_speed is not None and sparse_speed is not None:
        print(f"{'decode tokens/s':<28}{dense_speed.tokens_per_s:>10.1f}"
              f"{sparse_speed.tokens_per_s:>10.1f}  "
              f"({sparse_speed.tokens_per_s / dense_speed.tokens_per_s:.2f}x; "
              f"{sparse_speed.describe()})")
    prompt = "It is a truth universally acknowledged that"
    ids = tokenizer(prompt, return_tensors="pt").to(args.device)
    out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    print(f"\nsparse model, greedy: {tokenizer.decode(out[0], skip_special_tokens=True)!r}")
    print(f"\ndone in {time.time() - start:.0f} s")


#: ``sparseffn bench NAME``: the benchmark module it runs, and what it does.
BENCHMARKS = {
    "e2e": ("bench.e2e.run", "end-to-end decode speed, dense against sparse, on a random-weight "
                             "model of a real shape (a GPU)"),
    "check": ("bench.e2e.check", "kernel path against reference path on one model (logits, "
                                 "greedy tokens, every module; a GPU, or the CPU under "
                                 "TRITON_INTERPRET=1)"),
    "kernels": ("bench.kernels.sweep", "kernel sweep: copy bandwidth, dense cuBLAS and our ops "
                                       "over real shapes, CSV + plot (a GPU)"),
    "anatomy": ("bench.kernels.anatomy", "fixed cost and streaming rate of one input-sparse "
                                         "GEMV call (a GPU)"),
}


def source_root() -> Path:
    """The source checkout this package runs from (the benchmarks live there, not in the
    installed package), or a SparseFFNError saying how to get one."""
    from sparseffn.errors import SparseFFNError
    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "__init__.py").exists():
        raise SparseFFNError("the benchmarks ship with the source repository, not the installed "
                             "package: clone it and run `pip install -e .` from the clone")
    return root


def _bench(module: str):
    """Run ``python -m module`` on the arguments the subcommand did not parse itself, with the
    checkout on the path and the current directory unchanged (relative --csv paths)."""
    def run(args: argparse.Namespace) -> int:
        root = str(source_root())
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return subprocess.call([sys.executable, "-m", module, *args.rest], env=env)
    return run


def default_sweep(names: Sequence[str], inputs: Sequence[str]) -> list[str]:
    """The quality sweep's default specs: each input method over all projections (the first
    one over the MLP too), then every other method, trained ones (predictors) and those
    that decide at the prompt (scored on decode steps only, ``--prompt-len``) left out."""
    from sparseffn.methods import method_class
    out = [f"{n}:all" for n in inputs]
    out[1:1] = [f"{inputs[0]}:mlp"] if inputs else []
    return out + [n for n in names if n not in inputs and not method_class(n).trained
                  and not method_class(n).decides_at_prompt]


def build_parser() -> argparse.ArgumentParser:
    from sparseffn.config import ALLOCATIONS, SCOPES, input_methods
    from sparseffn.methods import DEFAULT_METHOD, method_names
    parser = argparse.ArgumentParser(prog="sparseffn", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("calibrate", help="fit thresholds on text and save them")
    _model_args(p)
    _calib_args(p)
    p.add_argument("--method", default=DEFAULT_METHOD, choices=method_names())
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--scope", default="mlp", choices=SCOPES)
    p.add_argument("--allocation", default="uniform", choices=ALLOCATIONS)
    p.add_argument("--predictor-rank", type=int, default=0,
                   help="rank of the predictor method's networks (0: hidden / 16 in [64, 1024])")
    p.add_argument("--predictor-epochs", type=int, default=4,
                   help="passes over the calibration text that train the predictors")
    p.add_argument("--rotation", type=int, default=0,
                   help="teal/wina: test the MLP input in a basis rotated by blocks of this "
                        "many channels, fitted on the calibration text (0: none; 64 or 128)")
    p.add_argument("--out", required=True, help="folder for the calibration artifact")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("eval", help="perplexity and accuracy against sparsity, table + plot")
    _model_args(p)
    _calib_args(p)
    p.add_argument("--methods", nargs="+",
                   default=default_sweep(method_names(), input_methods()),
                   help="method[:scope[:allocation]][:rotation=B] specs (default: every method "
                        "that needs "
                        "no trained parts, input methods over all projections and teal-like "
                        "ones over the MLP too)")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.25, 0.4, 0.5, 0.65])
    p.add_argument("--eval-data", default="austen", help="held-out text source")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--items", type=int, default=500,
                   help="items per accuracy task (and passages of the lm-eval perplexity task); "
                        "500 puts a 5-point change beyond two standard errors")
    p.add_argument("--harness", choices=["builtin", "lm-eval"], default="builtin",
                   help="builtin: perplexity and two accuracy tasks here; lm-eval: "
                        "EleutherAI's lm-eval harness drives the patched model")
    p.add_argument("--tasks", nargs="+",
                   help="lm-eval tasks (default: the offline tasks over --eval-data, "
                        "sparseffn_{ppl,nextsent,lastword}_<source>; standard tasks such as "
                        "hellaswag need their datasets from the Hub)")
    p.add_argument("--limit", type=int, help="lm-eval: at most this many documents per task")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size")
    p.add_argument("--decode-tokens", type=int, default=32,
                   help="greedy tokens timed per row for decode tokens/s on this machine "
                        "(0: skip)")
    p.add_argument("--prompt-len", type=int, default=0,
                   help="score perplexity on decode steps after this many prompt tokens of "
                        "each window, dense and sparse (0: whole windows); needed by methods "
                        "that decide at the prompt (coreinfer)")
    p.add_argument("--csv", help="write results here")
    p.add_argument("--plot", help="write a PNG plot here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="dense vs sparse on the built-in model, in a few minutes")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=method_names())
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--scope", default="mlp", choices=SCOPES)
    p.add_argument("--data", default="austen")
    p.add_argument("--eval-data", default="austen")
    p.add_argument("--tokens", type=calib_tokens_arg, default=8192,
                   help=f"calibration tokens (at least {MIN_TOKENS})")
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--items", type=int, default=60)
    p.add_argument("--decode-tokens", type=int, default=64,
                   help="greedy tokens timed for decode tokens/s, dense and sparse (0: skip)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=cmd_demo)

    from sparseffn.finetune.cli import add_parser as add_finetune_parser
    add_finetune_parser(sub)

    p = sub.add_parser("bench", help="benchmarks, from a source checkout (see bench/)")
    bench = p.add_subparsers(dest="bench", required=True)
    for name, (module, what) in BENCHMARKS.items():
        k = bench.add_parser(name, help=what, add_help=False,
                             description=f"{what}; `sparseffn bench {name} --help` lists its "
                                         f"options (runs `python -m {module}`)")
        k.set_defaults(func=_bench(module), forward=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from sparseffn.errors import SparseFFNError
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "forward", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        rc = args.func(args)
    except SparseFFNError as exc:
        print(f"sparseffn: error: {exc}", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
