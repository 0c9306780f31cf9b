"""The whole recipe in one call: regularize, train with the Trainer, merge, calibrate, save.

``finetune`` is what ``sparseffn finetune`` and ``bench/finetune`` run; each step is also a
public function for people who assemble their own loop.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from sparseffn.finetune.callback import SparsityCallback
from sparseffn.finetune.data import WindowDataset
from sparseffn.finetune.errors import FinetuneError
from sparseffn.finetune.lora import apply_lora, merge_lora
from sparseffn.finetune.probe import unwrap_model
from sparseffn.finetune.regularization import SparsityRegularization
from sparseffn.finetune.regularizers import (DensityLoss, FixedThreshold, ProgressiveL1,
                                             Regularizer, ReluSubstitution)
from sparseffn.finetune.schedule import ProgressiveSchedule
from sparseffn.methods import ACT_SITE, DEFAULT_METHOD, method_class, method_names

# method name -> what it combines
FINETUNE_METHODS = ("none", "l1", "density", "fixed", "relu", "fatrelu", "prosparse")
#: Registered methods whose neuron gate is a threshold on |act| (what "fixed" trains with).
THRESHOLD_METHODS = tuple(n for n in method_names() if method_class(n).act_threshold)
TRAINABLE = ("lora", "ffn", "all")


@dataclass
class FinetuneConfig:
    """One fine-tuning run.

    Attributes:
        method: one of ``FINETUNE_METHODS`` ("none" is a plain fine-tune, the baseline).
        sparsity: target FFN sparsity: the threshold level for "fixed", 1 - the target
            density for "density", and the calibration level of the saved model.
        threshold_method: the calibrated thresholds "fixed" trains with, one of
            ``THRESHOLD_METHODS`` (CATS: one per layer; CHESS: per neuron).
        steps, batch_size, seq_len, lr: optimizer steps, windows per step and process,
            tokens per window, peak learning rate (constant after ``lr_warmup`` steps).
        weight: the L1/density factor reached at the end of the schedule.
        warmup, stages: the ``ProgressiveSchedule``: steps at factor 0, then this many sine
            stages of equal length up to ``weight``.
        relu_shift: FATReLU shift ("fatrelu").
        trainable: "lora" (adapters on ``lora_targets``), "ffn" (all FFN weights) or "all".
        lora_r, lora_alpha, lora_targets: LoRA settings (default targets: every projection).
        reference_sparsity: quantile that places the zero tolerance (density measurement).
        calib_tokens: calibration tokens for the "fixed" thresholds.
        seed: data order and adapter initialisation.
    """

    method: str = "fixed"
    sparsity: float = 0.7
    threshold_method: str = DEFAULT_METHOD
    steps: int = 200
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-4
    lr_warmup: int = 0
    weight: float = 1.0
    warmup: int = 0
    stages: int = 3
    relu_shift: float = 0.0
    trainable: str = "lora"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_targets: Sequence[str] | None = None
    reference_sparsity: float = 0.5
    calib_tokens: int = 4096
    seed: int = 0
    logging_steps: int = 10

    def __post_init__(self) -> None:
        if self.method not in FINETUNE_METHODS:
            raise FinetuneError(f"unknown fine-tuning method {self.method!r}; choose one of "
                                f"{', '.join(FINETUNE_METHODS)}")
        if self.threshold_method not in THRESHOLD_METHODS:
            raise FinetuneError(f"threshold_method must be one of {THRESHOLD_METHODS}, got "
                                f"{self.threshold_method!r}")
        if self.trainable not in TRAINABLE:
            raise FinetuneError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if not 0.0 < self.sparsity < 1.0:
            raise FinetuneError(f"target sparsity must lie in (0, 1), got {self.sparsity}")
        for name in ("steps", "batch_size", "seq_len", "stages", "logging_steps"):
            if getattr(self, name) <= 0:
                raise FinetuneError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup >= self.steps and self.method in ("l1", "density", "prosparse"):
            raise FinetuneError(
                f"the schedule ends (step {self.steps}) before it starts (warm-up {self.warmup}); "
                "use fewer warm-up steps than training steps"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise FinetuneError(f"learning rate must be > 0, got {self.lr}")


def build_regularizers(config: FinetuneConfig) -> list[Regularizer]:
    """The regularizers of ``config.method``."""
    peaks = [config.weight * (k + 1) / config.stages for k in range(config.stages)]
    schedule = None
    if config.method in ("l1", "density", "prosparse"):
        schedule = ProgressiveSchedule.even(config.warmup, config.steps, peaks)
    return {
        "none": lambda: [],
        "l1": lambda: [ProgressiveL1(schedule)],
        "density": lambda: [DensityLoss(1.0 - config.sparsity, schedule)],
        "fixed": lambda: [FixedThreshold()],
        "relu": lambda: [ReluSubstitution(0.0)],
        "fatrelu": lambda: [ReluSubstitution(config.relu_shift)],
        "prosparse": lambda: [ReluSubstitution(0.0), ProgressiveL1(schedule)],
    }[config.method]()


def set_trainable(model: nn.Module, trainable: str) -> list[str]:
    """Freeze all but the FFN weights ("ffn") or nothing ("all"); returns trainable names."""
    names = []
    for name, p in model.named_parameters():
        train = trainable == "all" or (".mlp." in f".{name}" and name.endswith("weight"))
        p.requires_grad_(train)
        if train:
            names.append(name)
    return names


@dataclass
class FinetuneResult:
    """What ``finetune`` returns.

    Attributes:
        model: the trained model: adapters merged, unpatched, a ReLU substitution kept.
        history: the callback's log entries (term, penalties, density per layer).
        log_history: the Trainer's log (loss, learning rate, ...).
        seconds: training wall time.
    """

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def finetune(model: nn.Module, tokenizer: Any, windows: torch.Tensor, config: FinetuneConfig,
             calibration_texts: list[str] | None = None, progress: bool = True,
             output_dir: str | Path | None = None) -> FinetuneResult:
    """Fine-tune ``model`` on ``windows`` [N, L] with ``config``'s method (Trainer + callback).

    For "fixed" the model is first patched with ``config.threshold_method`` thresholds fitted
    on ``calibration_texts`` at ``config.sparsity`` and trained with them active. Works under
    ``accelerate launch`` (every process calls it; each reads its own share of the windows).
    """
    import time

    from transformers import Trainer, TrainingArguments, default_data_collator

    import sparseffn

    model = unwrap_model(model)
    dataset = WindowDataset(windows)
    regs = build_regularizers(config)
    if config.method == "fixed":
        if calibration_texts is None:
            raise FinetuneError("method 'fixed' fits its thresholds on text: pass "
                                "calibration_texts (the training text will do)")
        sparseffn.sparsify(model, config.threshold_method, config.sparsity, calibration_texts,
                           tokenizer=tokenizer, n_tokens=config.calib_tokens,
                           progress=progress)
    reg = SparsityRegularization(model, regs, reference_sparsity=config.reference_sparsity)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    torch.manual_seed(config.seed)
    if config.trainable == "lora":
        trained = apply_lora(model, config.lora_r, config.lora_alpha,
                             targets=config.lora_targets)
    else:
        set_trainable(model, config.trainable)
        trained = model
    callback = SparsityCallback(reg)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=str(output_dir or tmp), max_steps=config.steps,
            per_device_train_batch_size=config.batch_size, learning_rate=config.lr,
            lr_scheduler_type="constant_with_warmup", warmup_steps=config.lr_warmup,
            weight_decay=0.0, logging_steps=config.logging_steps, save_strategy="no",
            report_to=[], seed=config.seed, data_seed=config.seed,
            disable_tqdm=not progress, remove_unused_columns=False,
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
        trainer = Trainer(model=trained, args=args, train_dataset=dataset,
                          data_collator=default_data_collator, callbacks=[callback])
        start = time.time()
        trainer.train()
        seconds = time.time() - start
        log_history = list(trainer.state.log_history)
    model = merge_lora(trained) if config.trainable == "lora" else trained
    model = unwrap_model(model)
    reg.remove(keep_activation=True)
    if sparseffn.is_sparsified(model):
        sparseffn.unsparsify(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = use_cache
    model.eval()
    return FinetuneResult(model, callback.history, log_history, seconds)


def calibrate_finetuned(model: nn.Module, tokenizer: Any, texts: list[str], sparsity: float,
                        method: str = DEFAULT_METHOD, n_tokens: int = 4096, seq_len: int = 512,
                        progress: bool = False) -> nn.Module:
    """Patch a fine-tuned model at ``sparsity``; a FATReLU shift floors the thresholds.

    A model trained with FATReLU is saved with plain ReLU (transformers has no shifted ReLU);
    raising every neuron threshold to at least the shift reproduces FATReLU exactly, since
    |relu(x)| > t with t >= shift is x > t.
    """
    import sparseffn
    from sparseffn.patching import update_thresholds

    sparseffn.sparsify(model, method, sparsity, texts, tokenizer=tokenizer, n_tokens=n_tokens,
                       seq_len=seq_len, progress=progress)
    shift = float(getattr(model.config, "sparseffn_relu_shift", 0.0) or 0.0)
    if shift > 0:
        calib = sparseffn.get_calibration(model)
        floored = {k: v.clamp_min(shift) if k.endswith(f".{ACT_SITE}") else v
                   for k, v in calib.thresholds.items()}
        update_thresholds(model, replace(calib, thresholds=floored))
    return model


def save_finetuned(model: nn.Module, tokenizer: Any, out: str | Path, texts: list[str],
                   sparsity: float, method: str = DEFAULT_METHOD,
                   config: FinetuneConfig | None = None,
                   n_tokens: int = 4096, progress: bool = False) -> tuple[Path, Path]:
    """Save the merged model (``out/model``) and its calibration (``out/calibration``)."""
    import json

    import sparseffn

    out = Path(out)
    model_dir, calib_dir = out / "model", out / "calibration"
    unwrap_model(model).save_pretrained(model_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(model_dir)
    calibrate_finetuned(model, tokenizer, texts, sparsity, method, n_tokens, progress=progress)
    sparseffn.save_calibration(model, calib_dir, overwrite=True)
    sparseffn.unsparsify(model)
    if config is not None:
        (out / "finetune_config.json").write_text(json.dumps(asdict(config), indent=2,
                                                             default=list))
    return model_dir, calib_dir
