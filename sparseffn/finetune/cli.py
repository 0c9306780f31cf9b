"""``sparseffn finetune``: train a model towards sparse FFN activations, save it calibrated.

    sparseffn finetune --method fixed --sparsity 0.7 --steps 200 --data austen --out ft/
    accelerate launch --num_processes 2 -m sparseffn.cli finetune ...   # several GPUs/processes

Writes ``OUT/model`` (the merged model, loadable with ``from_pretrained``), ``OUT/calibration``
(load with ``sparseffn.sparsify(model, calibration="OUT/calibration")``),
``OUT/finetune_config.json`` and ``OUT/log.json`` (loss, regularizer and density per log step).
Only this module's ``add_parser`` is imported by ``sparseffn.cli``; everything heavy loads when
the command runs.
"""
from __future__ import annotations

import argparse

DESCRIPTION = """Train a model towards sparse FFN activations, then save it calibrated.

  sparseffn finetune --method fixed --sparsity 0.7 --steps 200 --data austen --out ft/
  accelerate launch --num_processes 2 -m sparseffn.cli finetune ...   (several processes)

Writes OUT/model (the merged model, loadable with from_pretrained), OUT/calibration (load it
with sparseffn.sparsify(model, calibration="OUT/calibration")), OUT/finetune_config.json and
OUT/log.json (loss, regularizer and density per log step)."""
import json
from pathlib import Path

METHOD_HELP = ("none: plain fine-tune (baseline); l1: progressive L1 on activations (ProSparse "
               "schedule); density: differentiable density loss to 1-SPARSITY; fixed: train with "
               "calibrated thresholds at SPARSITY active (CATS-style; see --threshold-method); "
               "relu / fatrelu: ReLU / shifted ReLU in place of SiLU/GELU; "
               "prosparse: relu + progressive L1")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``finetune`` subcommand on ``sparseffn``'s subparsers."""
    from sparseffn.finetune.recipe import FINETUNE_METHODS, THRESHOLD_METHODS, TRAINABLE
    from sparseffn.cli import calib_tokens_arg
    from sparseffn.methods import DEFAULT_METHOD

    p = sub.add_parser("finetune", help="fine-tune towards sparse FFN activations, then "
                                        "calibrate and save", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin",
                   help="'builtin' (SmolLM2-135M, offline) or a transformers folder/name")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    data = p.add_argument_group("training data")
    data.add_argument("--data", default="austen",
                      help="built-in source (austen, pydoc, news: its calibration split) or a "
                           ".txt/.jsonl file or folder")
    data.add_argument("--dataset", help="a `datasets` dataset name (overrides --data)")
    data.add_argument("--dataset-config")
    data.add_argument("--dataset-split", default="train")
    data.add_argument("--text-field", default="text")
    train = p.add_argument_group("method and schedule")
    train.add_argument("--method", default="fixed", choices=FINETUNE_METHODS, help=METHOD_HELP)
    train.add_argument("--threshold-method", default=DEFAULT_METHOD, choices=THRESHOLD_METHODS,
                       help="thresholds 'fixed' trains with (a method that thresholds "
                            "|act(gate(x))|)")
    train.add_argument("--sparsity", type=float, default=0.7,
                       help="target FFN sparsity (training target and calibration level)")
    train.add_argument("--weight", type=float, default=1.0,
                       help="final factor of the l1/density term")
    train.add_argument("--warmup", type=int, default=0,
                       help="steps before the l1/density term starts")
    train.add_argument("--stages", type=int, default=3,
                       help="sine stages from the warm-up to the last step")
    train.add_argument("--relu-shift", type=float, default=0.0, help="FATReLU shift")
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--batch-size", type=int, default=4, help="windows per step and process")
    train.add_argument("--seq-len", type=int, default=128)
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--lr-warmup", type=int, default=0)
    train.add_argument("--seed", type=int, default=0)
    lora = p.add_argument_group("parameters")
    lora.add_argument("--trainable", default="lora", choices=TRAINABLE,
                      help="lora: adapters only; ffn: all FFN weights; all: every weight")
    lora.add_argument("--lora-r", type=int, default=16)
    lora.add_argument("--lora-alpha", type=float, default=32.0)
    lora.add_argument("--lora-targets", nargs="+",
                      help="projection names (default: every projection of the family)")
    out = p.add_argument_group("output")
    out.add_argument("--calib-method", default=DEFAULT_METHOD, choices=THRESHOLD_METHODS,
                     help="criterion of the saved calibration")
    out.add_argument("--calib-tokens", type=calib_tokens_arg, default=4096,
                     help="calibration tokens ('fixed' training thresholds and the saved one; "
                          "at least 1024)")
    out.add_argument("--out", required=True, help="output folder")
    out.add_argument("--overwrite", action="store_true")
    out.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_finetune)


def _training_data(args: argparse.Namespace):
    from sparseffn.finetune.data import training_texts
    from sparseffn.finetune.errors import FinetuneError
    if args.dataset:
        import datasets
        try:
            ds = datasets.load_dataset(args.dataset, args.dataset_config, split=args.dataset_split)
        except (FileNotFoundError, ValueError, ConnectionError) as exc:
            raise FinetuneError(f"could not load dataset {args.dataset!r}: {exc}") from exc
        return training_texts(ds, args.text_field)
    return training_texts(args.data, args.text_field)


def cmd_finetune(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from sparseffn.cli import load_model
    from sparseffn.finetune.data import training_windows
    from sparseffn.finetune.errors import FinetuneError
    from sparseffn.finetune.recipe import FinetuneConfig, finetune, save_finetuned

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FinetuneError(f"{out} exists and is not empty; pass --overwrite or another --out")
    config = FinetuneConfig(
        method=args.method, sparsity=args.sparsity, threshold_method=args.threshold_method,
        steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, lr_warmup=args.lr_warmup,
        weight=args.weight, warmup=args.warmup, stages=args.stages, relu_shift=args.relu_shift,
        trainable=args.trainable, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_targets=args.lora_targets, seed=args.seed, calib_tokens=args.calib_tokens,
        logging_steps=max(1, args.steps // 20))
    texts = _training_data(args)
    model, tokenizer = load_model(args.model, args.dtype, "cpu")
    windows = training_windows(tokenizer, texts, args.steps * args.batch_size, args.seq_len)
    result = finetune(model, tokenizer, windows, config, calibration_texts=texts,
                      progress=not args.no_progress)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    model = result.model
    model_dir, calib_dir = save_finetuned(model, tokenizer, out, texts, args.sparsity,
                                          args.calib_method, config, args.calib_tokens,
                                          progress=not args.no_progress)
    (out / "log.json").write_text(json.dumps({"trainer": result.log_history,
                                              "sparsity": result.history,
                                              "train_seconds": result.seconds}, indent=1))
    print(f"trained {args.method} for {args.steps} steps in {result.seconds:.0f} s; "
          f"saved the model to {model_dir} and its {args.calib_method} calibration at "
          f"sparsity {args.sparsity} to {calib_dir}")
