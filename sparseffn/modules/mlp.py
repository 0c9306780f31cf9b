"""A gated MLP, down(act(gate(x)) * up(x)), with sparsity at its input sites and its neurons."""
from __future__ import annotations

import torch
from torch import nn

from calibrate.rotation import rotate, rotate_weight, unrotate
from sparseffn import cuda_probe, decode, layout
from sparseffn.dispatch import KernelMode, is_plain_linear, kernel_activation
from sparseffn.families import FamilySpec, activation, gate_and_up
from sparseffn.modules.base import SiteCounter, SparseModule, own_copy

#: The site of the FFN neurons: neuron i off skips its up row and down column (and under a
#: predictor its gate row).
ACT_SITE = "act"
#: The per-layer extra tensor (``Calibration.extras``) holding a rotation of the MLP input.
ROTATION_EXTRA = "rotation.mlp_in"


class NeuronGate(nn.Module):
    """Chooses each token's active FFN neurons; a method's runtime gate (``sparseffn.methods``).

    A gate owns its threshold (or whatever plays that part, such as top-k's fraction) and
    implements the two paths: ``mask`` on the reference path and ``decode`` on the kernel path.
    """

    #: Weight rows (of hidden width) a skipped neuron saves: its up row and down column, plus
    #: its gate row where the gate decides without computing gate(x).
    rows_per_neuron: int = 2

    def mask(self, x: torch.Tensor, act: torch.Tensor,
             up: torch.Tensor | None = None) -> torch.Tensor:
        """Active neurons, bool [..., I], from the MLP input x [..., H], act(gate(x)) [..., I]
        and up(x) [..., I] (the reference path passes it; a decode plan that has not computed
        it passes None)."""
        raise NotImplementedError

    def threshold(self) -> torch.Tensor:
        """The current threshold (float32 [] or [I])."""
        raise NotImplementedError

    def set_threshold(self, value: torch.Tensor) -> None:
        raise NotImplementedError

    def act_threshold(self) -> torch.Tensor | None:
        """The threshold on |act(gate(x))| if that is how this gate decides, else None (what
        fine-tuning takes as the zero tolerance of each neuron)."""
        return None

    def has_decode_plan(self, kernel_act: str | None) -> bool:
        """Whether ``decode`` can run for an MLP whose activation the kernels call
        ``kernel_act`` (None: an activation the kernels do not implement)."""
        return False

    def decode(self, mlp: "SparseGatedMLP", x: torch.Tensor) -> torch.Tensor:
        """The MLP's decode step through the kernels: x [B, H] -> y [B, H]; counts its site."""
        raise NotImplementedError

    def overhead_elements(self) -> int:
        return 0

    def start_sequences(self, prompt_mask: torch.Tensor | None = None) -> None:
        """New sequences begin: the next forward is their prompt. ``prompt_mask`` [B, P] (1 on
        real tokens, 0 on padding) says which prompt tokens are real. A no-op for gates that
        decide per token; gates that decide from the prompt (``sparseffn.methods.coreinfer``)
        start over."""


def start_sequences(model: nn.Module, prompt_mask: torch.Tensor | None = None) -> None:
    """Tell every neuron gate of ``model`` that new sequences begin (``NeuronGate.
    start_sequences``); ``generate`` calls it before each prompt. Harmless on any model."""
    for module in model.modules():
        if isinstance(module, NeuronGate):
            module.start_sequences(prompt_mask)


class SparseGatedMLP(SparseModule):
    """A gated MLP with sparsity at its sites (any subset).

    Sites:
        input sites ``gate_proj``/``up_proj``/``gate_up_proj``/``down_proj``: that projection's
            input channels are gated (TEAL, WINA);
        ``act``: ``neuron_gate`` picks each token's active neurons (CATS, CHESS, top-k,
            predictors); an inactive neuron skips its up row and down column.

    Decode plans (decided once, at patch time): with a neuron gate and no other site, the
    gate's own (``NeuronGate.decode``); with input sites only, ``input_sparse_gemv`` for every
    gated projection (gate and up, which read the same x, in one grouped launch) and dense
    ``F.linear`` for ungated ones.

    ``rotation`` (float32 [H // b, b, b], ``calibrate.rotation``): the gate/up input sites test
    z = x Q blockwise instead of x. On the reference path the product then takes x minus the
    rotated-back dropped part of z, with the original weights (so a zero threshold is exactly
    dense). Where the kernels' input-major layout holds, gate/up store W Q instead, which the
    kernels read skipping the rows of dropped z entries; their original weights wait on the CPU
    until the layout is restored (``unsparsify``, ``kernel_mode="never"``).
    """

    def __init__(self, base: nn.Module, spec: FamilySpec, thresholds: dict[str, torch.Tensor],
                 neuron_gate: NeuronGate | None = None,
                 rotation: torch.Tensor | None = None) -> None:
        super().__init__(base)
        self.spec = spec
        device = base.down_proj.weight.device
        hidden, inter = base.down_proj.weight.shape
        self.intermediate_size = inter
        self.neuron_gate = neuron_gate
        for site, value in thresholds.items():
            if site == ACT_SITE:
                raise ValueError("the 'act' site is gated by a NeuronGate, not a threshold")
            covered = getattr(base, site).weight.numel()
            self.add_site(site, value, covered, device)
        if neuron_gate is not None:
            self.add_site(ACT_SITE, None, neuron_gate.rows_per_neuron * inter * hidden, device)
        self.register_buffer("zero", torch.zeros((), device=device), persistent=False)
        if rotation is not None:
            nb, b = rotation.shape[0], rotation.shape[-1]
            if rotation.dim() != 3 or rotation.shape != (nb, b, b) or nb * b != hidden:
                raise ValueError(f"a rotation of shape {list(rotation.shape)} does not tile "
                                 f"the hidden size {hidden}; expected [{hidden} // b, b, b]")
            if any(site not in thresholds for site in spec.mlp_in):
                raise ValueError(f"a rotation needs the MLP input sites {spec.mlp_in} gated")
            rotation = own_copy(rotation, device)
        self.rotation: torch.Tensor | None
        self.register_buffer("rotation", rotation)
        #: Original gate/up weights (on the CPU) while their kernel layout holds W Q.
        self._originals: dict[str, torch.Tensor] = {}
        # Probed only where a neuron gate's plan needs it (evaluating the activation module
        # would also reach a fine-tuning probe that stands in for it).
        self.kernel_act = (kernel_activation(activation(spec, base))
                           if neuron_gate is not None else None)
        self.plan = self._kernel_plan()

    def _kernel_plan(self) -> str | None:
        """"gate" (the neuron gate's plan), "input" or None (no kernel path)."""
        linears = [getattr(self.base, name) for name in (*self.spec.mlp_in, "down_proj")]
        if not all(is_plain_linear(lin) for lin in linears):
            return None
        if self.neuron_gate is None:
            return "input"
        if self.sites != (ACT_SITE,) or any(lin.bias is not None for lin in linears):
            return None
        return "gate" if self.neuron_gate.has_decode_plan(self.kernel_act) else None

    def kernel_linears(self) -> list[nn.Module]:
        if self.plan == "gate":
            return [self.base.down_proj]
        if self.plan == "input":
            return [getattr(self.base, site) for site in self.sites]
        return []

    def decision_weights(self) -> list[torch.Tensor]:
        if self.plan == "gate":  # the neuron gate's plan replaces all three products
            return [*self.gate_up_weights(), self.base.down_proj.weight]
        return super().decision_weights()

    def batch_products(self) -> list[cuda_probe.Product]:
        # The "input" plan's launches (``_decode_inputs``); an ungated projection runs F.linear
        # on both paths and is left out.
        if self.plan != "input" or self.rotation is not None:
            return []
        base, gated = self.base, super().threshold

        def product(*sites: str) -> cuda_probe.Product:
            return ([getattr(base, site).weight for site in sites],
                    [self.site_sparsity.get(site, 0.0) for site in sites])
        if self.spec.fused_gate_up or gated("gate_proj") is None or gated("up_proj") is None:
            out = [product(site) for site in self.spec.mlp_in if gated(site) is not None]
        else:
            out = [product("gate_proj", "up_proj")]
        return out + ([product("down_proj")] if gated("down_proj") is not None else [])

    def threshold(self, site: str) -> torch.Tensor | None:
        if site == ACT_SITE and self.neuron_gate is not None:
            return self.neuron_gate.threshold()
        return super().threshold(site)

    def set_threshold(self, site: str, value: torch.Tensor) -> None:
        if site == ACT_SITE and self.neuron_gate is not None:
            self.neuron_gate.set_threshold(value)
        else:
            super().set_threshold(site, value)

    def overhead_elements(self) -> int:
        # A rotation's Q is read on every decode step, d x b elements.
        rotation = 0 if self.rotation is None else self.rotation.numel()
        return rotation + (0 if self.neuron_gate is None
                           else self.neuron_gate.overhead_elements())

    # --- rotation: W Q in the kernels' layout ------------------------------------------------

    def _rotated_linears(self) -> list[nn.Module]:
        return [getattr(self.base, site) for site in self.spec.mlp_in]

    def input_weight(self, site: str) -> torch.Tensor:
        """``site``'s weight [out, in] in the basis its threshold tests: W, or W Q (float32)
        for gate/up under a rotation whose weights are not rotated yet."""
        w = getattr(self.base, site).weight.detach()
        if self.rotation is None or site not in self.spec.mlp_in or self.weights_rotated:
            return w
        return rotate_weight(w, self.rotation)

    @property
    def weights_rotated(self) -> bool:
        """Whether gate/up hold W Q (the kernels' layout under a rotation)."""
        return bool(self._originals)

    def set_kernel_mode(self, mode: KernelMode | str, keep_layout: bool = False) -> None:
        super().set_kernel_mode(mode, keep_layout)
        if self.rotation is None:
            return
        linears = self._rotated_linears()
        if all(layout.is_input_major(lin.weight) for lin in linears):
            if not self._originals:
                self._rotate_weights(linears)
        else:
            self._restore_weights()

    def restore_layout(self) -> None:
        self._restore_weights()
        super().restore_layout()

    @torch.no_grad()
    def _rotate_weights(self, linears: list[nn.Module]) -> None:
        for site, lin in zip(self.spec.mlp_in, linears):
            w = lin.weight
            # Kept in nn.Linear's own layout, so restoring it restores the reference path's
            # bits (F.linear on an input-major weight sums in another order).
            self._originals[site] = w.data.to("cpu").contiguous()
            w.data = rotate_weight(w.data, self.rotation).to(w.dtype).t().contiguous().t()

    @torch.no_grad()
    def _restore_weights(self) -> None:
        for site, original in self._originals.items():
            w = getattr(self.base, site).weight
            w.data = original.to(w.device)
        self._originals = {}

    def gate_up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_gate [I, H], W_up [I, H]), views of a fused weight where the family fuses them."""
        if self.spec.fused_gate_up:
            return self.base.gate_up_proj.weight.chunk(2, dim=0)
        return self.base.gate_proj.weight, self.base.up_proj.weight

    def act_fn(self) -> nn.Module:
        return activation(self.spec, self.base)

    def site_width(self, site: str) -> int:
        hidden, inter = self.base.down_proj.weight.shape
        return inter if site in (ACT_SITE, "down_proj") else hidden

    def shares(self, site: str) -> bool:
        # A neuron gate shares when it decides by a threshold on |act(gate(x))| (CATS, CHESS):
        # its margins then say which neurons matter to the batch.
        if site == ACT_SITE:
            return self.neuron_gate is not None and self.neuron_gate.act_threshold() is not None
        return super().shares(site)

    def _gate_input(self, x: torch.Tensor, site: str, z: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """The input ``site``'s product takes: x with its dropped channels zeroed, or under a
        rotation (z = x Q, float32) x minus the dropped part of z rotated back, or z's kept
        part where the weights hold W Q."""
        if super().threshold(site) is None:
            return x
        v = x if z is None else z
        mask = self.site_mask(site, v.abs())
        self.count(site, mask.expand_as(v))
        if z is None or self.weights_rotated:
            return torch.where(mask, v, 0).to(x.dtype)
        # Exact zeros where nothing is dropped, so a zero threshold gives x itself.
        return x - unrotate(torch.where(mask, 0, z), self.rotation).to(x.dtype)

    def _decode_inputs(self, x2: torch.Tensor) -> torch.Tensor:
        """The "input" plan: x [B, H] -> y [B, H]."""
        base, t, cpu = self.base, super().threshold, self._cpu_path
        # Under a rotation gate/up hold W Q (the layout this path runs on) and take z = x Q.
        v_in = x2 if self.rotation is None else rotate(x2, self.rotation).to(x2.dtype)

        def counter(site: str) -> SiteCounter | None:  # an ungated projection has none
            return self.counter(site) if site in self.counters else None

        def linear(v: torch.Tensor, site: str) -> torch.Tensor:
            proj = getattr(base, site)
            mask = self.site_mask(site, v.abs()) if site in self.shared_keep else None
            return decode.linear(v, proj.weight, proj.bias, t(site), cpu, counter(site), mask)
        if self.spec.fused_gate_up:
            gate, up = linear(v_in, "gate_up_proj").chunk(2, -1)
        elif t("gate_proj") is not None and t("up_proj") is not None and not self.shared_keep:
            gp, up_ = base.gate_proj, base.up_proj
            gate, up = decode.grouped_linear(v_in, [gp.weight, up_.weight],
                                             [gp.bias, up_.bias],
                                             [t("gate_proj"), t("up_proj")], cpu,
                                             [counter("gate_proj"), counter("up_proj")])
        else:
            gate, up = linear(v_in, "gate_proj"), linear(v_in, "up_proj")
        return linear(self.act_fn()(gate) * up, "down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]."""
        if self._layout_ready and self.use_kernels(x, self.base.down_proj.weight):
            x2 = x.reshape(x.shape[0], x.shape[-1])
            y = self.neuron_gate.decode(self, x2) if self.plan == "gate" \
                else self._decode_inputs(x2)
            return y.reshape(x.shape[0], 1, y.shape[-1])
        observe = self.observe
        z = None if self.rotation is None else rotate(x, self.rotation)
        if observe is not None:
            observe("mlp_in", x if z is None else z)
        x_gate = self._gate_input(x, self.spec.mlp_in[0], z)
        x_up = x_gate if self.spec.fused_gate_up else self._gate_input(x, "up_proj", z)
        gate, up = gate_and_up(self.spec, self.base, x_gate, x_up)
        act = self.act_fn()(gate)
        if observe is not None:
            observe("act", act)
            observe("up", up)
        if self.neuron_gate is not None:
            mask = self.site_mask(ACT_SITE, act.abs()) if ACT_SITE in self.shared_keep \
                else self.neuron_gate.mask(x, act, up)
            self.count(ACT_SITE, mask.expand_as(act))
            h = torch.where(mask, act * up, 0)
        else:
            h = act * up
        if observe is not None:
            observe("down_in", h)
        return self.base.down_proj(self._gate_input(h, "down_proj"))

    def extra_repr(self) -> str:
        rotation = "" if self.rotation is None else f", rotation_block={self.rotation.shape[-1]}"
        return (f"sites={self.sites}, decode_plan={self.plan}, "
                f"kernel_mode={self.kernel_mode.value}{rotation}")
