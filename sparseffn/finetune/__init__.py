"""Fine-tuning towards sparse FFN activations: regularizers, schedules, LoRA, Trainer callback.

    from sparseffn.finetune import (ProgressiveL1, ProgressiveSchedule, SparsityCallback,
                                    SparsityRegularization, apply_lora, merge_lora)

    reg = SparsityRegularization(model, [ProgressiveL1(ProgressiveSchedule.even(20, 200,
                                                                              [0.5, 1.0, 2.0]))])
    peft_model = apply_lora(model)                       # optional
    Trainer(model=peft_model, ..., callbacks=[SparsityCallback(reg)]).train()
    # or a plain loop: loss = model(**batch).loss + reg.term(step)
    model = merge_lora(peft_model); reg.remove()
    sparseffn.sparsify(model, method="chess", sparsity=0.7, calibration=..., tokenizer=...)

The Trainer-facing names (``SparsityCallback``, ``finetune``, ``FinetuneConfig``) load
transformers' Trainer on first use.
"""
from __future__ import annotations

from typing import Any

from sparseffn.finetune.data import WindowDataset, training_texts, training_windows
from sparseffn.finetune.errors import FinetuneError
from sparseffn.finetune.lora import (adapter_projections, apply_lora, default_lora_targets,
                                     lora_target_modules, merge_lora)
from sparseffn.finetune.probe import ActivationProbe, ShiftedReLU, fat_relu, unwrap_model
from sparseffn.finetune.regularization import SparsityRegularization
from sparseffn.finetune.regularizers import (DensityLoss, FixedThreshold, ProgressiveL1,
                                             Regularizer, ReluSubstitution)
from sparseffn.finetune.schedule import (ConstantSchedule, LinearSchedule, ProgressiveSchedule,
                                         Schedule)

_LAZY = {
    "SparsityCallback": "sparseffn.finetune.callback",
    "FinetuneConfig": "sparseffn.finetune.recipe",
    "FinetuneResult": "sparseffn.finetune.recipe",
    "FINETUNE_METHODS": "sparseffn.finetune.recipe",
    "build_regularizers": "sparseffn.finetune.recipe",
    "calibrate_finetuned": "sparseffn.finetune.recipe",
    "finetune": "sparseffn.finetune.recipe",
    "save_finetuned": "sparseffn.finetune.recipe",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparseffn.finetune' has no attribute {name!r}")


__all__ = [
    "ActivationProbe", "ConstantSchedule", "DensityLoss", "FinetuneError", "FixedThreshold",
    "LinearSchedule", "ProgressiveL1", "ProgressiveSchedule", "Regularizer",
    "ReluSubstitution", "Schedule", "ShiftedReLU", "SparsityRegularization", "WindowDataset",
    "adapter_projections", "apply_lora", "default_lora_targets", "fat_relu",
    "lora_target_modules", "merge_lora", "training_texts", "training_windows",
    "unwrap_model", *_LAZY,
]
