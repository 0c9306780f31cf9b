"""Weight layouts for the decode kernels, converted in place without a second copy.

The input-sparse kernel skips an inactive input channel k by never loading row k of the
transposed weight ``W.t()`` [in, out], so that row must be contiguous. Instead of keeping a
transposed copy beside ``nn.Linear.weight`` [out, in] (which would double the memory of every
gated projection), the parameter's own storage is rewritten in "input-major" order: the
parameter keeps its shape [out, in] and its identity, only its strides become (1, out).
``F.linear`` (prefill, training, the CPU) reads it through a transposed GEMM, and
``weight.t()`` is the contiguous [in, out] matrix the kernel wants. The conversion holds one
extra matrix while it copies, then frees the old storage; ``restore`` undoes it.
"""
from __future__ import annotations

import torch
from torch import nn


def is_input_major(weight: torch.Tensor) -> bool:
    """True when ``weight`` [out, in] is stored so that ``weight.t()`` is contiguous."""
    return weight.dim() == 2 and weight.t().is_contiguous()


def is_output_major(weight: torch.Tensor) -> bool:
    """True when ``weight`` [out, in] has unit stride along ``in`` (nn.Linear's own layout)."""
    return weight.dim() == 2 and (weight.shape[1] == 1 or weight.stride(1) == 1)


def make_input_major(linear: nn.Module) -> bool:
    """Rewrite ``linear.weight`` in input-major order in place; True if anything changed.

    Parameters on the meta device (not yet materialised) are left alone.
    """
    w = linear.weight
    if w.device.type == "meta" or is_input_major(w):
        return False
    with torch.no_grad():
        w.data = w.data.t().contiguous().t()
    return True


def restore(linear: nn.Module) -> None:
    """Give ``linear.weight`` its ordinary contiguous [out, in] storage back."""
    w = linear.weight
    if w.device.type != "meta" and not w.is_contiguous():
        with torch.no_grad():
            w.data = w.data.contiguous()
