"""Helpers shared by the kernel tests and benchmarks: devices, shapes, inputs and error bounds.

Error bounds are derived, not fitted. Every op accumulates in fp32 and rounds its output once, so
against a float64 reference of the same math an output element may be off by
  * its rounding: one unit in the last place of the output dtype (``ULP`` relative), 1.5 for bf16
    under the interpreter, which rounds fp32 -> bf16 by truncation (measured: 511 of 1000 stores
    differ from round-to-nearest), plus
  * fp32 accumulation error, bounded by ``ACC`` = 2**-16 (256 fp32 epsilons; random-order error
    grows like sqrt(K) epsilons, sqrt(14336) < 120) times the sum of |terms| of that output.
"""
from __future__ import annotations

import torch

from .common import INTERPRET, kernels_available

ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
ACC = 2.0**-16
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def out_ulps(dtype: torch.dtype) -> float:
    return ULP[dtype] * (1.5 if INTERPRET and dtype == torch.bfloat16 else 1.0)


def devices() -> list:
    """pytest params: cpu (interpreter) where available; cuda, marked ``gpu``, where a GPU
    exists (pytest is imported here, so that the library does not need it)."""
    import pytest

    out = []
    if kernels_available("cpu"):
        out.append(pytest.param("cpu", id="interp"))
    if torch.cuda.is_available():
        out.append(pytest.param("cuda", id="cuda", marks=pytest.mark.gpu))
    if not out:
        out.append(pytest.param("cpu", id="no-kernels", marks=pytest.mark.skip(
            reason="no GPU and TRITON_INTERPRET unset: kernels cannot run")))
    return out


def assert_within(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Elementwise |y - ref| <= bound (ref and bound float64); no NaN anywhere in y."""
    assert y.shape == ref.shape, f"{what}: shape {tuple(y.shape)} != {tuple(ref.shape)}"
    yd = y.double()
    assert not torch.isnan(yd).any(), f"{what}: NaN in output (element not written?)"
    err = (yd - ref).abs()
    ratio = err / bound.clamp_min(1e-300)
    worst = ratio.max().item()
    assert worst <= 1.0, (f"{what}: {(ratio > 1).sum().item()} of {ratio.numel()} elements "
                          f"outside the bound, worst err/bound {worst:.3g}")


def gemv_bound(ref: torch.Tensor, abs_terms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bound for one fp32-accumulated, once-rounded product (see module docstring)."""
    return out_ulps(dtype) * ref.abs() + ACC * abs_terms + 2.0**-24


def nan_like(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def weight(rows: int, cols: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Random weight with the 1/sqrt(fan-in) scale of a trained linear layer."""
    return (torch.randn(rows, cols, device=device) / cols**0.5).to(dtype)


def rows_with_tokens(batch: int, rows: int, union_sparsity: float, device: str) -> torch.Tensor:
    """Bool [batch, rows]: a union pattern with the given sparsity, each sequence using about
    70% of the union, so that both skipped rows and per-sequence zeros are exercised."""
    n_on = max(1, round((1.0 - union_sparsity) * rows))
    union = torch.zeros(rows, dtype=torch.bool, device=device)
    union[torch.randperm(rows, device=device)[:n_on]] = True
    per_seq = torch.rand(batch, rows, device=device) < 0.7
    per_seq[0] = True  # the union is exactly ``union``
    return union & per_seq
