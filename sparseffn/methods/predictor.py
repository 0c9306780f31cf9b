"""Neuron predictors (Deja Vu, PowerInfer): a trained low-rank network per layer scores each
neuron from the MLP input; neuron i is active when its score B (A x) is above the layer's
threshold, so the gate rows of inactive neurons are skipped too. Trained by
``calibrate.predictor``, whose score quantiles are this method's statistics."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calibrate.predictor import SCORE_GRID_KEY, threshold_from_grid, train_predictors
from sparseffn import decode
from sparseffn.errors import CalibrationError
from sparseffn.methods.base import (FitContext, Method, StatSpec, register_method,
                                    require_extras)
from sparseffn.methods.gates import ActThresholdGate
from sparseffn.modules import ACT_SITE, NeuronGate, SparseGatedMLP, above, own_copy, set_buffer


class PredictorGate(NeuronGate):
    """Neuron i is active when its predictor score is above the threshold.

    Buffers: ``pred_a`` [r, H], ``pred_b`` [I, r] (the MLP's dtype), ``value`` float32 [].
    Decode plan: ``sparse_gated_mlp`` with the mask, which reads the gate, up and down rows of
    active neurons only.
    """

    rows_per_neuron = 3  # gate row, up row, down column

    def __init__(self, threshold: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 mlp: nn.Module) -> None:
        super().__init__()
        hidden, inter = mlp.down_proj.weight.shape
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != hidden or b.shape[0] != inter \
                or a.shape[0] != b.shape[1] or not (a.isfinite().all() and b.isfinite().all()):
            raise CalibrationError(
                f"the calibration's predictor shapes {list(a.shape)}, {list(b.shape)} do not fit "
                f"an MLP of hidden {hidden} and intermediate {inter}, or hold non-finite "
                "values; recalibrate")
        device, dtype = mlp.down_proj.weight.device, mlp.down_proj.weight.dtype
        self.register_buffer("pred_a", a.detach().to(device=device, dtype=dtype, copy=True))
        self.register_buffer("pred_b", b.detach().to(device=device, dtype=dtype, copy=True))
        self.register_buffer("value", own_copy(threshold, device))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> neuron scores [..., I] (higher: more likely needed)."""
        return F.linear(F.linear(x, self.pred_a), self.pred_b)

    def mask(self, x: torch.Tensor, act: torch.Tensor,
             up: torch.Tensor | None = None) -> torch.Tensor:
        return above(self.scores(x), self.value)

    def threshold(self) -> torch.Tensor:
        return self.value

    def set_threshold(self, value: torch.Tensor) -> None:
        set_buffer(self, "value", value)

    def has_decode_plan(self, kernel_act: str | None) -> bool:
        return kernel_act is not None

    def decode(self, mlp: SparseGatedMLP, x: torch.Tensor) -> torch.Tensor:
        w_gate, w_up = mlp.gate_up_weights()
        mask = above(self.scores(x), self.value)
        mlp.count(ACT_SITE, mask)
        return decode.gated_masked(x, w_gate, w_up, mlp.base.down_proj.weight, mask,
                                   mlp.kernel_act, mlp._cpu_path)

    def overhead_elements(self) -> int:
        return self.pred_a.numel() + self.pred_b.numel()  # read every step, never skipped

    def extra_repr(self) -> str:
        return f"rank={self.pred_a.shape[0]}"


@register_method
class Predictor(Method):
    name = "predictor"
    criterion = "a small low-rank network predicts the active neurons from the layer input"
    granularity = "per neuron (trained on the calibration text)"
    skips = "rows of gate and up, columns of down"
    trained = True

    def stat_specs(self, scope: str) -> tuple[StatSpec, ...]:
        return ()  # the predictor trainer records its own statistics

    def fit(self, stats: dict[str, torch.Tensor], site: str, sparsity: float) -> torch.Tensor:
        return threshold_from_grid(stats[SCORE_GRID_KEY], sparsity)

    def train(self, ctx: FitContext):
        per_layer = [ctx.sparsities[f"layers.{i}.{ACT_SITE}"] for i, _, _ in ctx.mlps]
        predictors, grids, metrics = train_predictors(
            ctx.model, ctx.mlps, ctx.windows, per_layer, ctx.config.predictor_rank,
            ctx.config.predictor_epochs, batch_size=ctx.batch_size, progress=ctx.progress)
        return grids, predictors, metrics

    def neuron_gate(self, mlp: nn.Module, threshold: torch.Tensor,
                    extras: dict[str, torch.Tensor]) -> PredictorGate:
        return PredictorGate(threshold, extras["a"], extras["b"], mlp)

    def calibration_gate(self, mlp: nn.Module, threshold: torch.Tensor) -> ActThresholdGate:
        # No predictor exists before training: the passes that train it watch a dense MLP.
        return ActThresholdGate(threshold, mlp.down_proj.weight.device)

    @classmethod
    def check(cls, thresholds: dict[str, torch.Tensor], extras: dict[str, torch.Tensor],
              where: str) -> None:
        require_extras(extras, thresholds, ("a", "b"), where)
