"""Every tuning candidate is correct (CUDA only: the CPU never tunes, and the other kernel tests
run the CPU's default configs). The tuner may pick any of them on some GPU, so each must pass."""
from __future__ import annotations

import pytest
import torch

from triton_kernels.gated_mlp import kernel as gmk, op as gated_mlp
from triton_kernels.input_sparse import kernel as isk, op as input_sparse
from triton_kernels.output_sparse import kernel as osk, op as output_sparse
from triton_kernels.testing import assert_within, gemv_bound, nan_like, out_ulps, weight

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
K, N = 4097, 1535  # odd sizes: partial tiles on both dims
SM = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 1


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_input_sparse_candidates(batch, dtype):
    x = torch.randn(batch, K, device="cuda").to(dtype)
    w_t = weight(K, N, dtype, "cuda")
    thr = torch.quantile(x.float().abs(), 0.7, dim=1, keepdim=True)
    xa = torch.where(x.float().abs() > thr, x.double(), 0.0)
    ref = xa @ w_t.double()
    bound = gemv_bound(ref, xa.abs() @ w_t.double().abs(), dtype)
    for cfg in isk.candidates(batch, K, N, SM):
        y = input_sparse.triton_impl(x, w_t, thr, config=cfg,
                                     out=nan_like((batch, N), dtype, "cuda"))
        assert_within(y, ref, bound, str(cfg))


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_output_sparse_candidates(batch, dtype):
    x = torch.randn(batch, K, device="cuda").to(dtype)
    w = weight(N, K, dtype, "cuda")
    mask = torch.rand(batch, N, device="cuda") < 0.3
    ref = torch.where(mask, x.double() @ w.double().t(), 0.0)
    bound = gemv_bound(ref, x.double().abs() @ w.double().abs().t(), dtype)
    for cfg in osk.candidates(batch, N, K):
        y = output_sparse.triton_impl(x, w, mask, config=cfg,
                                      out=nan_like((batch, N), dtype, "cuda"))
        assert_within(y, ref, bound, str(cfg))


@pytest.mark.parametrize("batch", [1, 5])
def test_gate_up_candidates(batch):
    """Mask mode (no threshold flips possible); the down pass keeps its default config."""
    dtype, H, I = torch.bfloat16, N, K
    x = torch.randn(batch, H, device="cuda").to(dtype)
    wg, wu = weight(I, H, dtype, "cuda"), weight(I, H, dtype, "cuda")
    wd_t = weight(H, I, dtype, "cuda").t().contiguous()
    mask = torch.rand(batch, I, device="cuda") < 0.4
    xd = x.double()
    g, u = torch.nn.functional.silu(xd @ wg.double().t()), xd @ wu.double().t()
    h = torch.where(mask, g * u, 0.0).to(dtype).double()
    ref = h @ wd_t.double()
    # h may be one bf16 ulp off where g*u rounds differently; that error goes through |w_down|.
    bound = out_ulps(dtype) * (ref.abs() + 2 * (h.abs() @ wd_t.double().abs())) + 2.0**-24
    for cfg in gmk.candidates(batch, I, H):
        y = gated_mlp.triton_impl(x, wg, wu, wd_t, mask=mask, config=cfg,
                                  out=nan_like((batch, H), dtype, "cuda"))
        assert_within(y, ref, bound, str(cfg))
