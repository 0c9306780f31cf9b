"""output_sparse_gemv's Triton kernel against its float64 reference: masked-off outputs must be
exactly zero, the others within the bound of triton_kernels.testing. CPU cases run under the
interpreter at small odd shapes with forced configs; CUDA cases run the tuned configs at real
shapes."""
from __future__ import annotations

import pytest
import torch

from triton_kernels import LaunchConfig
from triton_kernels.output_sparse.op import triton_impl
from triton_kernels.testing import (DTYPE_IDS, DTYPES, assert_within, devices, gemv_bound,
                                    nan_like, rows_with_tokens, weight)

# ((N, K), forced config on the CPU, x layout); CUDA uses real shapes and tuned configs.
CPU_CASES = [
    ((431, 63), LaunchConfig(16, 64), "contiguous"),
    ((63, 431), LaunchConfig(16, 128, prefetch=True), "strided"),
    ((97, 1023), LaunchConfig(32, 256), "transposed"),
    ((33, 4097), LaunchConfig(16, 512, prefetch=True), "contiguous"),
    ((97, 431), LaunchConfig(2, 128, fma=True), "strided"),  # batch > 1 by FMAs, 2 rows
]
CUDA_CASES = [
    ((14336, 4096), None, "contiguous"),
    ((4096, 14336), None, "strided"),
    ((1023, 4097), None, "transposed"),
    ((18944, 3584), None, "contiguous"),
    ((4096, 4096), None, "strided"),
]


def make_x(batch: int, K: int, dtype: torch.dtype, device: str, layout: str) -> torch.Tensor:
    if layout == "transposed":
        return torch.randn(K, batch, device=device).to(dtype).t()
    if layout == "strided":
        return torch.randn(batch, 2 * K, device=device).to(dtype)[:, ::2]
    return torch.randn(batch, K, device=device).to(dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", range(len(CPU_CASES)),
                         ids=["431x63", "63x431", "97x1023", "33x4097", "97x431"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_reference(device, case, sparsity, batch, dtype):
    (N, K), cfg, layout = (CPU_CASES if device == "cpu" else CUDA_CASES)[case]
    x = make_x(batch, K, dtype, device, layout)
    w = weight(N, K, dtype, device)
    mask = rows_with_tokens(batch, N, sparsity, device)
    y = triton_impl(x, w, mask, config=cfg, out=nan_like((batch, N), dtype, device))
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask])), "masked-off outputs must be 0"
    full = x.double() @ w.double().t()
    ref = torch.where(mask, full, 0.0)
    terms = torch.where(mask, x.double().abs() @ w.double().abs().t(), 0.0)
    assert_within(y, ref, gemv_bound(ref, terms, dtype), f"N={N} K={K} {layout}")


@pytest.mark.parametrize("device", devices())
def test_broadcast_mask_and_large_batch(device):
    """A [N] mask shared by all sequences, B = 17 (two launches)."""
    dtype, B, N, K = torch.bfloat16, 17, 63, 97
    x = torch.randn(B, K, device=device).to(dtype)
    w = weight(N, K, dtype, device)
    mask = torch.rand(N, device=device) < 0.3
    y = triton_impl(x, w, mask, out=nan_like((B, N), dtype, device))
    ref = torch.where(mask, x.double() @ w.double().t(), 0.0)
    terms = x.double().abs() @ w.double().abs().t()
    assert_within(y, ref, gemv_bound(ref, terms, dtype), "B=17")
    assert torch.equal(y[:, ~mask], torch.zeros_like(y[:, ~mask]))
