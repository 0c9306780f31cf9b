"""CoreInfer: each sequence's core neurons, chosen once from its prompt, serve every decode step.

The prompt runs densely. Its mean |act(gate(x)) * up(x)| per neuron over the prompt's real
tokens ranks the neurons; the top ``k = I - round(sparsity * I)`` are the sequence's core set,
fixed for the rest of the generation, and every other neuron's gate row, up row and down column
is skipped on decode steps. No calibration text: the set comes from the prompt itself.

CoreInfer (Wang et al., 2024) counts how often a neuron is among each token's top activations;
on SmolLM2 (SiLU) the mean magnitude of the neuron's contribution keeps far more quality at the
same size (docs/quality.md), so that is the score here.

What counts as a prompt: a forward with more than one token per sequence, or the first forward
after ``start_sequences`` (which ``generate`` and the lean loop call before each prompt, with the
attention mask so that left padding does not vote). A one-token forward otherwise is a decode
step of the sequences whose core sets are held.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseffn import decode
from sparseffn.methods.base import register_method
from sparseffn.methods.gates import FractionGate, FractionMethod
from sparseffn.modules import ACT_SITE, SparseGatedMLP


class CoreGate(FractionGate):
    """Decode steps keep each sequence's prompt-chosen core neurons; prompts run densely.

    Its "threshold" is the sparsity; a new level applies from the next prompt (held core sets
    keep their size). Buffer ``core``: bool [B, I], the sequences' core sets
    (updated in place while the batch size holds, so a captured CUDA graph reads the new sets).
    Decode plan: ``sparse_gated_mlp`` with the core set as mask, which reads the gate, up and
    down rows of core neurons only.
    """

    rows_per_neuron = 3  # gate row, up row, down column

    def __init__(self, sparsity: float, intermediate: int, device: torch.device) -> None:
        super().__init__(sparsity, intermediate)
        self.register_buffer("core", torch.zeros(0, intermediate, dtype=torch.bool,
                                                 device=device), persistent=False)
        self._starting = True
        self._prompt_mask: torch.Tensor | None = None

    def start_sequences(self, prompt_mask: torch.Tensor | None = None) -> None:
        self._starting = True
        self._prompt_mask = prompt_mask

    def _is_prompt(self, batch: int, tokens: int) -> bool:
        return self._starting or tokens > 1 or self.core.shape[0] != batch

    def _choose(self, h: torch.Tensor) -> None:
        """Core sets from the prompt's h = act * up [B, T, I]."""
        magnitude = h.detach().abs().float()
        weight = torch.ones(magnitude.shape[:2], device=h.device)
        mask = self._prompt_mask
        if mask is not None and mask.dim() == 2 and mask.shape[0] == h.shape[0] \
                and mask.shape[1] >= h.shape[1]:
            weight = mask[:, :h.shape[1]].to(device=h.device, dtype=torch.float32)
        score = (magnitude * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp_min(1)
        core = decode.largest(score, self.k)
        if self.core.shape == core.shape:
            self.core.copy_(core)
        else:
            self.core = core
        self._starting, self._prompt_mask = False, None

    def mask(self, x: torch.Tensor, act: torch.Tensor,
             up: torch.Tensor | None = None) -> torch.Tensor:
        if act.dim() != 3:
            raise ValueError(f"coreinfer's gate takes activations [batch, tokens, I], got "
                             f"{list(act.shape)}")
        if self._is_prompt(act.shape[0], act.shape[1]):
            if up is None:
                raise ValueError("coreinfer chooses its core set from act * up: pass up")
            self._choose(act * up)
            return torch.ones_like(act, dtype=torch.bool)
        return self.core[:, None, :].expand_as(act)

    def has_decode_plan(self, kernel_act: str | None) -> bool:
        return kernel_act is not None

    def decode(self, mlp: SparseGatedMLP, x: torch.Tensor) -> torch.Tensor:
        w_gate, w_up = mlp.gate_up_weights()
        w_down = mlp.base.down_proj.weight
        if self._is_prompt(x.shape[0], 1):  # a one-token prompt: dense, and it sets the core
            h = mlp.act_fn()(F.linear(x, w_gate)) * F.linear(x, w_up)
            self._choose(h[:, None, :])
            mlp.count(ACT_SITE, torch.ones_like(h, dtype=torch.bool))
            return F.linear(h, w_down)
        mlp.count(ACT_SITE, self.core)
        return decode.gated_masked(x, w_gate, w_up, w_down, self.core, mlp.kernel_act,
                                   mlp._cpu_path)

    def extra_repr(self) -> str:
        return f"sparsity={self.sparsity}, k={self.k}, sequences={self.core.shape[0]}"


@register_method
class CoreInfer(FractionMethod):
    name = "coreinfer"
    criterion = "the k neurons of largest mean \\|act(gate(x)) * up(x)\\| over the prompt"
    granularity = "per sequence, fixed from its prompt (prompt dense, no calibration text)"
    skips = "rows of gate and up, columns of down (decode steps)"
    decides_at_prompt = True

    def neuron_gate(self, mlp: nn.Module, threshold: torch.Tensor,
                    extras: dict[str, torch.Tensor]) -> CoreGate:
        return CoreGate(float(threshold), mlp.down_proj.weight.shape[1],
                        mlp.down_proj.weight.device)
