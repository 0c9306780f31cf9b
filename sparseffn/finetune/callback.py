"""Hugging Face ``Trainer`` integration: a callback that drives the schedule and logs.

    reg = SparsityRegularization(model, [ProgressiveL1(schedule)])
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[SparsityCallback(reg)])
    trainer.train()

At the start of training the callback sets ``reg.add_to_loss``, so each training forward's
``loss`` carries the regularization term (weighted like the LM loss, see
``sparseffn.finetune.regularization``): nothing else in the Trainer changes, which is why it
runs unchanged under ``accelerate launch`` with several processes. Before each optimizer step it
hands the step number to the schedules; at every log it adds the averaged term, each penalty and
its factor, and the measured activation density (mean and per layer, summed over processes) to
the Trainer's log entry.
"""
from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from sparseffn.finetune.regularization import SparsityRegularization


class SparsityCallback(TrainerCallback):
    """Drives a ``SparsityRegularization`` from a ``transformers.Trainer``.

    Args:
        reg: the regularization attached to the model the Trainer trains.
        per_layer: also log ``density/layer_XX`` for every layer (else only the mean).
    """

    def __init__(self, reg: SparsityRegularization, per_layer: bool = True) -> None:
        self.reg = reg
        self.per_layer = per_layer
        self.history: list[dict[str, float]] = []

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        self.reg.add_to_loss = True
        self.reg.step = state.global_step
        self.reg.reset_stats()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState,
                      control: TrainerControl, **kwargs: Any) -> None:
        self.reg.step = state.global_step

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs:  # evaluation logs: nothing trained since
            return
        values = self.reg.logs(sync=True)
        if not self.per_layer:
            values = {k: v for k, v in values.items() if not k.startswith("density/layer_")}
        values = {k: round(v, 6) for k, v in values.items()}
        logs.update(values)  # seen by callbacks after this one (the progress bar / printer)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
        self.history.append({"step": state.global_step, **values})

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        self.reg.add_to_loss = False
