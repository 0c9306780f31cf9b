"""Sparse drop-in modules that wrap a model's own projections and MLP.

Each keeps the original module as ``base`` (undo is putting ``base`` back) and holds its
thresholds as buffers, so a forward pass never leaves the device to decide what is active. This
is the reference path: masked dense torch ops, any batch and sequence length, any dtype and
device. Threshold tests are strict: an input (or neuron) is active when its magnitude is
``> threshold``, so a zero threshold keeps everything but exact zeros.

On a decode step (one new token per sequence) the wrappers call the Triton kernels instead
(``sparseffn.decode``): same thresholds, same test, weights of inactive neurons never read. The
reference path is the definition; the kernel path is checked against it.

Every gated site counts active and total entries (int64 buffers, updated on the device) for
measured-sparsity reports; ``track = False`` turns counting off. During calibration an
``observe(site, value)`` callback sees each gated quantity before its mask, so thresholds are
fitted on exactly what they are compared with at run time (upstream sparsity included).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparseffn import decode, layout
from sparseffn.families import FamilySpec, activation, gate_and_up


class SiteCounter(nn.Module):
    """Active/total counts of one gated site, plus the weight elements it covers."""

    def __init__(self, covered_elements: int, device: torch.device) -> None:
        super().__init__()
        self.covered_elements = covered_elements
        for name in ("active", "total"):
            self.register_buffer(name, torch.zeros((), dtype=torch.int64, device=device),
                                 persistent=False)

    def count(self, mask: torch.Tensor) -> None:
        self.active += mask.sum()
        self.total += mask.numel()

    def reset(self) -> None:
        self.active.zero_()
        self.total.zero_()


def above(magnitude: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``magnitude > threshold`` compared in fp32, as the kernels compare.

    A 0-dim threshold would be rounded to a bf16/fp16 ``magnitude``'s dtype first (0-dim
    tensors do not take part in type promotion); as a [1] tensor it promotes the comparison.
    """
    return magnitude > (threshold if threshold.dim() else threshold.reshape(1))


def _mask_input(x: torch.Tensor, threshold: torch.Tensor, counter: SiteCounter,
                track: bool) -> torch.Tensor:
    mask = above(x.abs(), threshold)
    if track:
        counter.count(mask)
    return torch.where(mask, x, 0)


def own_copy(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float32 copy on ``device`` that shares no memory with ``value`` (thresholds are
    updated in place, which must never reach the Calibration they came from)."""
    return value.detach().to(device=device, dtype=torch.float32, copy=True)


def _set_buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set a threshold buffer, in place when the shape allows: a compiled model (and its CUDA
    graphs) keeps reading the same tensor, so a new sparsity level needs no recompilation."""
    old = getattr(module, name)
    value = own_copy(value, old.device)
    if value.shape == old.shape:
        with torch.no_grad():
            old.copy_(value)
    else:
        setattr(module, name, value)


class _KernelPath:
    """Kernel-path switch shared by the wrappers (see ``sparseffn.decode``)."""

    kernel_mode: str = "auto"
    _layout_ready: bool = False

    def _kernel_linears(self) -> list[nn.Module]:
        """Projections the kernels read input-major (empty: no kernel plan)."""
        raise NotImplementedError

    def set_kernel_mode(self, mode: str, keep_layout: bool = False) -> None:
        """Choose the policy ("auto", "always", "never") and lay the weights out for it.

        The weights are re-laid out only where the kernels can run ("always", or CUDA weights
        under "auto"); elsewhere they get their original layout back, so the reference path
        stays bit-equal to the unpatched model, unless ``keep_layout``: then the reference path
        runs on the kernels' layout, which makes its prefill bit-equal to the kernel path's (for
        checks that compare the two). A model moved to the GPU after patching needs this call
        again.
        """
        self.kernel_mode = mode
        kernels_on("cuda"), kernels_on("cpu")  # import the ops and cache availability now
        linears = self._kernel_linears()
        use = mode == "always" or (mode == "auto" and any(
            lin.weight.device.type == "cuda" for lin in linears))
        for lin in linears:
            if use:
                layout.make_input_major(lin)
            elif not keep_layout:
                layout.restore(lin)
        self._layout_ready = use and all(layout.is_input_major(lin.weight) for lin in linears)
        group = getattr(self, "group", None)
        if group is not None:
            group.refresh()

    def restore_layout(self) -> None:
        for lin in self._kernel_linears():
            layout.restore(lin)

    def _kernels_usable(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether this call may take the kernel path (every test is static under compile)."""
        if not self._layout_ready or self.observe is not None:
            return False
        always = self.kernel_mode == "always"
        if x.device.type == "cuda":
            ok = _AVAILABLE.get("cuda", False)
        else:
            ok = always and _AVAILABLE.get("cpu", False)
        max_batch = decode.MAX_DECODE_BATCH if always else decode.AUTO_MAX_BATCH
        return (ok and decode.is_decode_step(x, max_batch) and x.dtype == weight.dtype
                and x.device == weight.device
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


_AVAILABLE: dict[str, bool] = {}


def kernels_on(device_type: str) -> bool:
    """Whether the Triton ops run on ``device_type`` tensors here (cached; filled at patch time,
    so a compiled forward reads a constant)."""
    if device_type not in _AVAILABLE:
        try:
            from triton_kernels import kernels_available
            _AVAILABLE[device_type] = kernels_available(device_type)
        except ImportError:
            _AVAILABLE[device_type] = False
    return _AVAILABLE[device_type]


class InputGroup:
    """Sparse projections that read the same input (q, k and v), computed in one launch.

    The attention forward calls q_proj(x), k_proj(x) and v_proj(x) one after the other. On a
    decode step the first member to see a new x computes every member's output in one grouped
    kernel launch (one fixed launch cost instead of three) and keeps them here until the other
    members, called with the same tensor x, take theirs; the last one clears the slot, so no
    tensor outlives the step. A member called with another x (or out of order) computes its
    own output alone, so the result never depends on the call order.
    """

    def __init__(self, members: list["SparseLinear"]) -> None:
        self.members = members
        self.x: torch.Tensor | None = None
        self.outs: list[torch.Tensor] | None = None
        for i, m in enumerate(members):
            m.group, m.group_index = self, i
        self.refresh()

    def refresh(self) -> None:
        """Recompute ``usable`` (every member on the kernel path with the same input width,
        dtype and device); called whenever a member's kernel mode or layout changes, so a
        decode step only reads the flag."""
        ws = [m.base.weight for m in self.members]
        self.usable = (all(m._kernel_ok and m._layout_ready for m in self.members)
                       and len({(w.shape[1], w.dtype, w.device) for w in ws}) == 1)

    def output(self, member: "SparseLinear", x: torch.Tensor,
               x2: torch.Tensor) -> torch.Tensor:
        """Member's [B, N] output for the module input x ([B, 1, K], the tensor whose identity
        says the members share it) viewed as x2 [B, K], from the shared launch."""
        if self.x is not x or self.outs is None:
            if member.group_index != 0:  # not the first call on this x: compute alone
                return decode.linear(x2, member.base.weight, member.base.bias,
                                     member.threshold)
            ms = self.members
            self.outs = decode.grouped_linear(x2, [m.base.weight for m in ms],
                                              [m.base.bias for m in ms],
                                              [m.threshold for m in ms])
            self.x = x
        y = self.outs[member.group_index]
        if member.group_index == len(self.members) - 1:
            self.x, self.outs = None, None
        return y


class SparseLinear(_KernelPath, nn.Module):
    """``base`` (an nn.Linear) applied to its input with small-magnitude channels zeroed.

    Buffers:
        threshold: float32 [] or [in_features]; channel i is active when |x_i| > threshold_i.
    """

    def __init__(self, base: nn.Linear, threshold: torch.Tensor, site: str) -> None:
        super().__init__()
        self.base = base
        self.track = True
        self.observe: Callable[[str, torch.Tensor], None] | None = None
        self.site = site  # the attribute name this wrapper replaces, e.g. "q_proj"
        self.register_buffer("threshold", own_copy(threshold, base.weight.device))
        self.counter = SiteCounter(base.weight.numel(), base.weight.device)
        self._kernel_ok = decode.is_plain_linear(base)
        self.group: InputGroup | None = None  # set by InputGroup
        self.group_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]."""
        if self._kernel_ok and self._kernels_usable(x, self.base.weight):
            return self._decode(x)
        if self.observe is not None:
            self.observe(self.site, x)
        return self.base(_mask_input(x, self.threshold, self.counter, self.track))

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(x.shape[0], x.shape[-1])
        if self.track:
            self.counter.count(above(x2.abs(), self.threshold))
        group = self.group
        if group is not None and group.usable:
            y = group.output(self, x, x2)
        else:
            y = decode.linear(x2, self.base.weight, self.base.bias, self.threshold)
        return y.reshape(x.shape[0], 1, y.shape[-1])

    def _kernel_linears(self) -> list[nn.Module]:
        return [self.base] if self._kernel_ok else []

    def set_threshold(self, threshold: torch.Tensor) -> None:
        _set_buffer(self, "threshold", threshold)

    def extra_repr(self) -> str:
        return f"site={self.site}, threshold_shape={tuple(self.threshold.shape)}"


class SparseGatedMLP(_KernelPath, nn.Module):
    """A gated MLP, down(act(gate(x)) * up(x)), with sparsity at its sites.

    Sites (any subset):
        input sites ``gate_proj``/``up_proj``/``gate_up_proj``/``down_proj``: that projection's
            input channels are gated (TEAL, WINA);
        ``act``: neuron i is active when |act(gate(x))_i| > threshold_i (CATS, CHESS), or is
            among the ``topk`` largest of its token; an inactive neuron skips its up row and
            down column.
        ``predictor`` (A [r, H], B [I, r]): with an ``act`` threshold, neuron i is active when
            its score B (A x) is above it instead of |act(gate(x))|, so the gate rows of
            inactive neurons are skipped too (Deja Vu; trained by ``calibrate.predictor``).
    """

    def __init__(self, base: nn.Module, spec: FamilySpec, thresholds: dict[str, torch.Tensor],
                 topk_sparsity: float | None = None,
                 predictor: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.base = base
        self.spec = spec
        self.track = True
        self.observe: Callable[[str, torch.Tensor], None] | None = None
        self.topk_sparsity = topk_sparsity
        device = base.down_proj.weight.device
        inter, hidden = base.down_proj.weight.shape[1], base.down_proj.weight.shape[0]
        self.intermediate_size = inter
        self.sites = tuple(thresholds) + (("act",) if topk_sparsity is not None else ())
        self.has_predictor = predictor is not None
        if predictor is not None:
            if "act" not in thresholds:
                raise ValueError("a predictor needs an 'act' threshold on its scores")
            a, b = predictor
            if a.shape[1] != hidden or b.shape[0] != inter or a.shape[0] != b.shape[1]:
                raise ValueError(f"predictor shapes {list(a.shape)}, {list(b.shape)} do not fit "
                                 f"an MLP of hidden {hidden} and intermediate {inter}")
            dtype = base.down_proj.weight.dtype
            self.register_buffer("pred_a", a.detach().to(device=device, dtype=dtype, copy=True))
            self.register_buffer("pred_b", b.detach().to(device=device, dtype=dtype, copy=True))
        self.counters = nn.ModuleDict()
        for site in self.sites:
            if site == "act":
                # up row + down column per neuron, and its gate row under a predictor
                covered = (3 if predictor is not None else 2) * inter * hidden
            elif site == "down_proj":
                covered = base.down_proj.weight.numel()
            else:
                covered = getattr(base, site).weight.numel()
            self.counters[site] = SiteCounter(covered, device)
        for site, value in thresholds.items():
            self.register_buffer(f"threshold_{site}", own_copy(value, device))
        self.register_buffer("zero", torch.zeros((), device=device), persistent=False)
        self.plan, self.kernel_act = self._kernel_plan()

    def _kernel_plan(self) -> tuple[str | None, str | None]:
        """(plan, kernel activation name) for decode steps; see ``sparseffn.decode``."""
        base, spec = self.base, self.spec
        linears = [getattr(base, name) for name in (*spec.mlp_in, "down_proj")]
        if not all(decode.is_plain_linear(lin) for lin in linears):
            return None, None
        if "act" not in self.sites:
            return "input", None
        if self.sites != ("act",) or any(lin.bias is not None for lin in linears):
            return None, None
        act = decode.kernel_activation(activation(spec, base))
        if self.has_predictor:
            return ("predict", act) if act is not None else (None, None)
        if self.topk_sparsity is not None:
            return "topk", None
        return ("act", act) if act is not None else (None, None)

    def _kernel_linears(self) -> list[nn.Module]:
        if self.plan in ("act", "topk", "predict"):
            return [self.base.down_proj]
        if self.plan == "input":
            return [getattr(self.base, site) for site in self.sites]
        return []

    def threshold(self, site: str) -> torch.Tensor | None:
        return getattr(self, f"threshold_{site}", None)

    def set_threshold(self, site: str, value: torch.Tensor) -> None:
        _set_buffer(self, f"threshold_{site}", value)

    def _gate_input(self, x: torch.Tensor, site: str) -> torch.Tensor:
        t = self.threshold(site)
        return x if t is None else _mask_input(x, t, self.counters[site], self.track)

    def topk(self) -> int:
        """Neurons kept per token under top-k."""
        return self.intermediate_size - round(self.topk_sparsity * self.intermediate_size)

    def predictor_scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> neuron scores [..., I] of the predictor (higher: more likely needed)."""
        return F.linear(F.linear(x, self.pred_a), self.pred_b)

    def _topk_mask(self, magnitude: torch.Tensor) -> torch.Tensor:
        keep = magnitude.topk(self.topk(), dim=-1).indices
        return torch.zeros_like(magnitude, dtype=torch.bool).scatter_(-1, keep, True)

    def _gate_up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.fused_gate_up:
            return self.base.gate_up_proj.weight.chunk(2, dim=0)
        return self.base.gate_proj.weight, self.base.up_proj.weight

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """One decode step through the kernels: x [B, 1, H] -> [B, 1, H]."""
        x2 = x.reshape(x.shape[0], x.shape[-1])
        base, down = self.base, self.base.down_proj
        if self.plan == "predict":
            w_gate, w_up = self._gate_up_weights()
            mask = above(self.predictor_scores(x2), self.threshold("act"))
            if self.track:
                self.counters["act"].count(mask)
            y = decode.gated_masked(x2, w_gate, w_up, down.weight, mask, self.kernel_act)
        elif self.plan == "act":
            w_gate, w_up = self._gate_up_weights()
            h = decode.gated_act(x2, w_gate, w_up, self.threshold("act"), self.kernel_act)
            if self.track:
                self.counters["act"].count(h != 0)  # an active neuron with h == 0 adds nothing
            y = decode.down_nonzero(h, down.weight, self.zero)
        elif self.plan == "topk":
            w_gate, w_up = self._gate_up_weights()
            act = activation(self.spec, base)(F.linear(x2, w_gate))
            mask = self._topk_mask(act.abs())
            if self.track:
                self.counters["act"].count(mask)
            h = torch.where(mask, act * decode.up_masked(x2, w_up, mask), 0)
            y = decode.down_masked(h, down.weight, mask)
        else:
            t = self.threshold
            if self.track:
                for site in self.sites:
                    if site != "down_proj":
                        self.counters[site].count(above(x2.abs(), t(site)))
            if self.spec.fused_gate_up:
                gu = base.gate_up_proj
                gate, up = decode.linear(x2, gu.weight, gu.bias, t("gate_up_proj")).chunk(2, -1)
            elif t("gate_proj") is not None and t("up_proj") is not None:
                gp, up_ = base.gate_proj, base.up_proj
                gate, up = decode.grouped_linear(x2, [gp.weight, up_.weight],
                                                 [gp.bias, up_.bias],
                                                 [t("gate_proj"), t("up_proj")])
            else:
                gate = decode.linear(x2, base.gate_proj.weight, base.gate_proj.bias,
                                     t("gate_proj"))
                up = decode.linear(x2, base.up_proj.weight, base.up_proj.bias, t("up_proj"))
            h = activation(self.spec, base)(gate) * up
            if self.track and t("down_proj") is not None:
                self.counters["down_proj"].count(above(h.abs(), t("down_proj")))
            y = decode.linear(h, down.weight, down.bias, t("down_proj"))
        return y.reshape(x.shape[0], 1, y.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]."""
        if self.plan is not None and self._kernels_usable(x, self.base.down_proj.weight):
            return self._decode(x)
        observe = self.observe
        if observe is not None:
            observe("mlp_in", x)
        x_gate = self._gate_input(x, self.spec.mlp_in[0])
        x_up = x_gate if self.spec.fused_gate_up else self._gate_input(x, "up_proj")
        gate, up = gate_and_up(self.spec, self.base, x_gate, x_up)
        act = activation(self.spec, self.base)(gate)
        if observe is not None:
            observe("act", act)
            observe("up", up)
        t_act = self.threshold("act")
        if t_act is not None or self.topk_sparsity is not None:
            if self.has_predictor:
                mask = above(self.predictor_scores(x), t_act)
            elif t_act is not None:
                mask = above(act.abs(), t_act)
            else:
                mask = self._topk_mask(act.abs())
            if self.track:
                self.counters["act"].count(mask)
            h = torch.where(mask, act * up, 0)
        else:
            h = act * up
        if observe is not None:
            observe("down_in", h)
        return self.base.down_proj(self._gate_input(h, "down_proj"))

    def extra_repr(self) -> str:
        return (f"sites={self.sites}, topk_sparsity={self.topk_sparsity}, "
                f"predictor={tuple(self.pred_a.shape) if self.has_predictor else None}, "
                f"decode_plan={self.plan}, kernel_mode={self.kernel_mode}")
