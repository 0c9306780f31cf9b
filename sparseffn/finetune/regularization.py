"""Attach sparsity regularizers to a model: the regularization term and measured density.

``SparsityRegularization`` installs activation probes (``sparseffn.finetune.probe``) and two
hooks on the transformers model: one marks the start of a forward pass, the other its end. In
between, every probe reports its layer's activation a = act(gate(x)) [..., I]:

- in training (grad enabled), a is kept, graph and all, for the regularizers' penalty;
- always, the entries with |a| above the layer's *zero tolerance* are counted on the device
  (no host sync), for the measured density per layer.

A plain loop adds ``reg.term()`` to its loss. With ``add_to_loss = True`` (what
``SparsityCallback`` sets for the Trainer) the end hook adds the term to the model output's
``loss`` itself, weighted by the batch's share of label tokens when the model receives
``num_items_in_batch``; so the term is averaged exactly like the language-modelling loss under
gradient accumulation and several processes, whatever the Trainer does next with that loss.

Zero tolerance of layer l, in order of precedence: the ``tolerance`` argument; the neuron
threshold of a patched model (CATS/CHESS, so density is exactly the mask's); else it is frozen
at the first forward pass to the ``reference_sparsity`` quantile of |a| (averaged over
processes), i.e. the density starts near 1 - reference_sparsity and falls as a regularizer works.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from sparseffn.families import decoder_layers, layer_mlp
from sparseffn.finetune.errors import FinetuneError
from sparseffn.finetune.probe import install_probes, remove_probes, unwrap_model
from sparseffn.finetune.regularizers import Regularizer
from sparseffn.modules import SparseGatedMLP

QUANTILE_SAMPLE = 1 << 16  # entries of |a| used to place a frozen tolerance


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    if _distributed():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


class SparsityRegularization:
    """Regularizers attached to a model, plus per-layer density counters.

    Args:
        model: a transformers causal LM of a supported family, plain, patched by
            ``sparseffn.sparsify``, or wrapped by peft.
        regularizers: applied together (their terms add up); may be empty to only measure.
        tolerance: zero tolerance: one float for every layer, or a sequence of per-layer
            floats/tensors ([] or [I]); default: see the module docstring.
        reference_sparsity: quantile used to freeze a tolerance that is not given.
        add_to_loss: add the term to ``output.loss`` in training forwards (Trainer use).

    Raises:
        FinetuneError: a model without a gated FFN, a bad regularizer or tolerance.
    """

    def __init__(self, model: nn.Module, regularizers: Sequence[Regularizer] = (), *,
                 tolerance: float | Sequence[float | torch.Tensor] | None = None,
                 reference_sparsity: float = 0.5, add_to_loss: bool = False) -> None:
        self.regularizers = list(regularizers)
        for r in self.regularizers:
            if not isinstance(r, Regularizer):
                raise FinetuneError(f"not a sparseffn.finetune Regularizer: {r!r}")
        if not 0.0 < reference_sparsity < 1.0:
            raise FinetuneError(f"reference_sparsity must lie in (0, 1), got {reference_sparsity}")
        who = ", ".join(type(r).__name__ for r in self.regularizers) or "sparsity measurement"
        self.model = unwrap_model(model)
        self.reference_sparsity = reference_sparsity
        self.add_to_loss = add_to_loss
        self.step = 0
        self._acts: dict[int, torch.Tensor] = {}
        self._in_forward = False
        self.probes = install_probes(self.model, self, who)
        n = len(self.probes)
        try:
            self._tolerance = self._initial_tolerance(tolerance, n)
            for r in self.regularizers:
                r.attach(self)
        except Exception:
            remove_probes(self.model, keep_substitution=False)
            raise
        self._scale: list[torch.Tensor | None] = [None] * n
        self._active: list[torch.Tensor | None] = [None] * n
        self._total: list[torch.Tensor | None] = [None] * n
        self._term_sum = torch.zeros((), dtype=torch.float64)
        self._penalty_sums = {r.name: torch.zeros((), dtype=torch.float64)
                              for r in self.regularizers if r.adds_term}
        self._term_count = 0
        self._hooks = [self.model.register_forward_pre_hook(self._begin),
                       self.model.register_forward_hook(self._end, with_kwargs=True)]

    # --- tolerance -------------------------------------------------------------------------
    def patched_mlps(self) -> list[SparseGatedMLP | None]:
        """Per layer, the SparseGatedMLP patched in, or None."""
        return [m if isinstance(m, SparseGatedMLP) else None
                for m in (layer_mlp(layer) for layer in decoder_layers(self.model))]

    def _initial_tolerance(self, tolerance: Any, n: int) -> list[torch.Tensor | None]:
        if tolerance is None:
            out: list[torch.Tensor | None] = []
            for mlp in self.patched_mlps():
                gate = mlp.neuron_gate if mlp is not None else None
                t = gate.act_threshold() if gate is not None else None
                out.append(None if t is None else t.detach().float().clone())
            return out
        if isinstance(tolerance, (int, float)):
            tolerance = [float(tolerance)] * n
        values = list(tolerance)
        if len(values) != n:
            raise FinetuneError(f"tolerance has {len(values)} entries; the model has {n} layers")
        out = [torch.as_tensor(v, dtype=torch.float32).detach().clone() for v in values]
        if any(bool((t < 0).any()) or not bool(torch.isfinite(t).all()) for t in out):
            raise FinetuneError("tolerances must be finite and >= 0")
        return out

    def tolerance(self, layer: int) -> torch.Tensor:
        """Zero tolerance of ``layer`` (float32, [] or [I]); frozen at the first forward."""
        t = self._tolerance[layer]
        if t is None:
            raise FinetuneError(f"layer {layer}'s tolerance is set by the first forward pass")
        return t

    def scale(self, layer: int) -> torch.Tensor:
        """Typical |a| of ``layer``: its tolerance where > 0, else its first-pass mean |a|."""
        t = self.tolerance(layer)
        return torch.where(t > 0, t, self._scale[layer])

    def _freeze(self, layer: int, act: torch.Tensor) -> None:
        sample = act.detach().float().abs().flatten()
        stride = max(1, sample.numel() // QUANTILE_SAMPLE)
        sample = sample[::stride]
        if self._tolerance[layer] is None:
            q = torch.quantile(sample, self.reference_sparsity)
            self._tolerance[layer] = _mean_over_processes(q) if self.model.training else q
        mean = sample.mean()
        self._scale[layer] = _mean_over_processes(mean) if self.model.training else mean

    # --- hooks ---------------------------------------------------------------------------
    def observe(self, layer: int, act: torch.Tensor) -> None:
        """Probe callback: count layer ``layer``'s activation [..., I] and keep it to train."""
        if not self._in_forward:  # e.g. a gradient-checkpointing recomputation
            return
        if self._scale[layer] is None:
            self._freeze(layer, act)
        with torch.no_grad():
            tol = self._tolerance[layer]
            if tol.device != act.device:
                tol = self._tolerance[layer] = tol.to(act.device)
                self._scale[layer] = self._scale[layer].to(act.device)
            active = (act.abs() > tol).sum()
            if self._active[layer] is None:
                self._active[layer] = torch.zeros((), dtype=torch.int64, device=act.device)
                self._total[layer] = torch.zeros((), dtype=torch.int64, device=act.device)
            self._active[layer] += active
            self._total[layer] += act.numel()
        if self.model.training and torch.is_grad_enabled():
            self._acts[layer] = act

    def _begin(self, module: nn.Module, args: Any) -> None:
        self._acts.clear()
        self._in_forward = True

    def _end(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        self._in_forward = False
        if not (self.add_to_loss and module.training and torch.is_grad_enabled()):
            return None
        loss = output.get("loss") if isinstance(output, dict) else (
            output[0] if isinstance(output, tuple) and len(output) else None)
        if loss is None:
            return None
        term = self.term()
        labels, n_items = kwargs.get("labels"), kwargs.get("num_items_in_batch")
        if labels is not None and n_items is not None:
            # The model's loss is this batch's label-token sum over all accumulated tokens:
            # weight the term (a per-batch mean) by the same share of tokens.
            local = (labels[..., 1:] != -100).sum().to(term.device)
            term = term * local / torch.as_tensor(n_items, device=term.device)
        new_loss = loss + term.to(loss.device, loss.dtype)
        if isinstance(output, dict):
            output["loss"] = new_loss
            return output
        return (new_loss, *output[1:])

    # --- the term -----------------------------------------------------------------------
    def factors(self, step: int | None = None) -> dict[str, float]:
        """Each regularizer's schedule factor at ``step`` (default: ``self.step``)."""
        step = self.step if step is None else step
        return {r.name: r.schedule(step) for r in self.regularizers if r.adds_term}

    def term(self, step: int | None = None) -> torch.Tensor:
        """The weighted regularization term (0-dim, float32) of the latest training forward.

        ``sum_r factor_r(step) * penalty_r(activations)``; 0 when nothing was recorded (no
        training forward since the last call, or only methods without a loss term). The kept
        activations are released, so call it once per forward.
        """
        step = self.step if step is None else step
        acts = [self._acts[i] for i in sorted(self._acts)]
        self._acts.clear()
        device = acts[0].device if acts else next(self.model.parameters()).device
        total = torch.zeros((), dtype=torch.float32, device=device)
        for r in self.regularizers:
            if not r.adds_term:
                continue
            factor = r.schedule(step)
            if not acts or factor == 0.0:
                continue
            penalty = r.penalty(acts, self)
            if penalty is None:
                continue
            self._accumulate(r.name, penalty)
            total = total + factor * penalty
        if acts:
            self._accumulate(None, total)
            self._term_count += 1
        return total

    def _accumulate(self, name: str | None, value: torch.Tensor) -> None:
        """Add to a logged sum on the value's device (no host sync per step)."""
        value = value.detach().double()
        if name is None:
            self._term_sum = self._term_sum.to(value.device) + value
        else:
            self._penalty_sums[name] = self._penalty_sums[name].to(value.device) + value

    # --- measurement --------------------------------------------------------------------
    def density(self) -> torch.Tensor:
        """Measured density per layer since the last reset: float64 [L] (NaN: nothing seen)."""
        out = []
        for active, total in zip(self._active, self._total):
            if active is None or int(total) == 0:
                out.append(float("nan"))
            else:
                out.append(int(active) / int(total))
        return torch.tensor(out, dtype=torch.float64)

    def reset_stats(self) -> None:
        """Zero the density counters and the logged term averages."""
        for t in (*self._active, *self._total):
            if t is not None:
                t.zero_()
        self._term_sum.zero_()
        for v in self._penalty_sums.values():
            v.zero_()
        self._term_count = 0

    def logs(self, sync: bool = False, reset: bool = True) -> dict[str, float]:
        """Averages since the last reset: term, each penalty and factor, density per layer.

        Args:
            sync: sum the counts over processes first (every process must call it then).
            reset: zero the counters afterwards.
        """
        counts = [torch.stack([a if a is not None else torch.zeros((), dtype=torch.int64),
                               t if t is not None else torch.zeros((), dtype=torch.int64)]).cpu()
                  for a, t in zip(self._active, self._total)]
        sums = torch.stack([self._term_sum.cpu(), torch.tensor(float(self._term_count)),
                            *(v.cpu() for v in self._penalty_sums.values())])
        if sync and _distributed():
            packed = torch.cat([torch.stack(counts).flatten().double(), sums])
            if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
                packed = packed.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(packed)
            packed = packed.cpu()
            n = len(counts)
            counts = list(packed[:2 * n].view(n, 2))
            sums = packed[2 * n:]
        steps = max(float(sums[1]), 1.0)
        out = {"reg/term": float(sums[0]) / steps}
        for k, name in enumerate(self._penalty_sums):
            out[f"reg/{name}"] = float(sums[2 + k]) / steps
        for name, factor in self.factors().items():
            out[f"reg/{name}_factor"] = factor
        densities = [float(c[0]) / float(c[1]) if float(c[1]) else float("nan") for c in counts]
        seen = [d for d in densities if d == d]
        out["density/mean"] = sum(seen) / len(seen) if seen else float("nan")
        for i, d in enumerate(densities):
            out[f"density/layer_{i:02d}"] = d
        if reset:
            self.reset_stats()
        return out

    def remove(self, keep_activation: bool = True) -> nn.Module:
        """Detach hooks and probes; keep a ReLU/FATReLU substitution if asked. Returns the model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._acts.clear()
        remove_probes(self.model, keep_substitution=keep_activation)
        return self.model
