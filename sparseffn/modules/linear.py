"""A projection whose small-magnitude input channels are skipped (TEAL, WINA), and the group
that computes q, k and v in one kernel launch."""
from __future__ import annotations

import torch
from torch import nn

from sparseffn import cuda_probe, decode
from sparseffn.dispatch import KernelMode, is_plain_linear
from sparseffn.modules.base import SparseModule


class SparseLinear(SparseModule):
    """``base`` (an nn.Linear) applied to its input with small-magnitude channels zeroed.

    One gated site, named after the attribute this wrapper replaces (e.g. ``q_proj``):
    channel i is active when |x_i| > threshold_i (threshold float32 [] or [in_features]).
    ``signal`` names what it reports to a calibration observer (None: nothing, for k and v,
    which read q's input).
    """

    def __init__(self, base: nn.Linear, threshold: torch.Tensor, site: str,
                 signal: str | None) -> None:
        super().__init__(base)
        self.site = site
        self.signal = signal
        self.add_site(site, threshold, base.weight.numel(), base.weight.device)
        self._kernel_ok = is_plain_linear(base)
        self.group: InputGroup | None = None  # set by InputGroup
        self.group_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]."""
        if self._layout_ready and self.use_kernels(x, self.base.weight):
            return self._decode(x)
        if self.observe is not None and self.signal is not None:
            self.observe(self.signal, x)
        mask = self.site_mask(self.site, x.abs())
        self.count(self.site, mask.expand_as(x))
        return self.base(torch.where(mask, x, 0))

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(x.shape[0], x.shape[-1])
        group = self.group
        if self.shared_keep:  # its own mask (the group's launch takes thresholds only)
            y = decode.linear(x2, self.base.weight, self.base.bias, None, self._cpu_path,
                              self.counter(self.site), mask=self.site_mask(self.site, x2.abs()))
        elif group is not None and group.usable:
            y = group.output(self, x, x2)
        else:
            y = decode.linear(x2, self.base.weight, self.base.bias, self.threshold(self.site),
                              self._cpu_path, self.counter(self.site))
        return y.reshape(x.shape[0], 1, y.shape[-1])

    def site_width(self, site: str) -> int:
        return self.base.in_features

    def kernel_linears(self) -> list[nn.Module]:
        return [self.base] if self._kernel_ok else []

    def decision_weights(self) -> list[torch.Tensor]:
        # The members of a group decide together: they run as one call.
        members = self.group.members if self.group is not None else [self]
        return [lin.weight for m in members for lin in m.kernel_linears()]

    def batch_products(self) -> list[cuda_probe.Product]:
        # A usable group runs as one launch, so its members decide together.
        ms = self.group.members if self.group is not None and self.group.usable else [self]
        return [([m.base.weight for m in ms], [m.site_sparsity.get(m.site, 0.0) for m in ms])]

    def set_kernel_mode(self, mode: KernelMode | str, keep_layout: bool = False) -> None:
        super().set_kernel_mode(mode, keep_layout)
        if self.group is not None:
            self.group.refresh()

    def extra_repr(self) -> str:
        return f"site={self.site}, threshold_shape={tuple(self.threshold(self.site).shape)}"


class InputGroup:
    """Sparse projections that read the same input (q, k and v), computed in one launch.

    The attention forward calls q_proj(x), k_proj(x) and v_proj(x) one after the other. On a
    decode step the first member to see a new x computes every member's output in one grouped
    kernel launch (one fixed launch cost instead of three) and keeps them here until the other
    members, called with the same tensor x, take theirs; the last one clears the slot, so no
    tensor outlives the step. A member called with another x (or out of order) computes its
    own output alone, so the result never depends on the call order.
    """

    def __init__(self, members: list[SparseLinear]) -> None:
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
        self.usable = (all(m._layout_ready for m in self.members)
                       and len({m._cpu_path for m in self.members}) == 1
                       and len({(w.shape[1], w.dtype, w.device) for w in ws}) == 1)

    def output(self, member: SparseLinear, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Member's [B, N] output for the module input x ([B, 1, K], the tensor whose identity
        says the members share it) viewed as x2 [B, K], from the shared launch (which counts
        every member's site)."""
        if self.x is not x or self.outs is None:
            if member.group_index != 0:  # not the first call on this x: compute alone
                return decode.linear(x2, member.base.weight, member.base.bias,
                                     member.threshold(member.site), member._cpu_path,
                                     member.counter(member.site))
            ms = self.members
            self.outs = decode.grouped_linear(x2, [m.base.weight for m in ms],
                                              [m.base.bias for m in ms],
                                              [m.threshold(m.site) for m in ms],
                                              member._cpu_path, [m.counter(m.site) for m in ms])
            self.x = x
        y = self.outs[member.group_index]
        if member.group_index == len(self.members) - 1:
            self.x, self.outs = None, None
        return y
