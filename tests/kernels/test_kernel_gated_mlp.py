"""sparse_gated_mlp's Triton kernels against a float64 reference of the same math.

Bounds (on top of triton_kernels.testing's): the kernel's h = round(g * u) comes from fp32 gate/up
sums rounded to the dtype (gate, act(gate) and up, as the dense module rounds them), so
|h - h_ref| <= its rounding + |g| * err(u) + |u| * err(g), with err(u) = ACC * sum|up terms| +
ulp * |u| and err(g) = 1.2 * (ACC * sum|gate terms| + ulp * |gate|) + ulp * |g| (1.2 > the
largest slope of SiLU and tanh-GELU); that error reaches y through |w_down|. A neuron whose |g|
lies within err(g) of its threshold may be decided either way by the kernel; its whole |g * u|
is added to the bound of h. Such neurons are rare and near-threshold, so the bound stays tight;
it replaced thresholds placed in gaps between gate values, which found no wide enough gap among
the densely packed small |SiLU| values at H = 4096, I = 14336, B = 8.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from triton_kernels import LaunchConfig
from triton_kernels.gated_mlp.op import triton_impl
from triton_kernels.testing import (ACC, DTYPE_IDS, DTYPES, assert_within, devices, nan_like,
                                    out_ulps, rows_with_tokens, weight)

# (criterion, activation, (H, I), forced gate/up config, forced down config) on the CPU.
CPU_CASES = [
    ("scalar", "silu", (63, 431), LaunchConfig(16, 64, prefetch=True), LaunchConfig(16, 64, 128)),
    ("channel", "gelu_tanh", (431, 63), LaunchConfig(16, 128), LaunchConfig(16, 128, 64)),
    ("token", "silu", (97, 1023), LaunchConfig(32, 64), LaunchConfig(32, 128, 256)),
    ("mask", "gelu_tanh", (33, 4097), LaunchConfig(128, 32, prefetch=True),
     LaunchConfig(16, 64, 1024)),
    # batch > 1 by FMAs in both passes
    ("token", "gelu_tanh", (97, 431), LaunchConfig(2, 64, prefetch=True, fma=True),
     LaunchConfig(8, 64, 128, fma=True)),
]
CUDA_CASES = [
    ("scalar", "silu", (4096, 14336), None, None),
    ("channel", "gelu_tanh", (3584, 18944), None, None),
    ("token", "silu", (1023, 4097), None, None),
    ("mask", "silu", (4096, 14336), None, None),
    ("token", "gelu_tanh", (2048, 8192), None, None),
]


def _act(g: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")


def make_criterion(g: torch.Tensor, kind: str, sparsity: float):
    """(threshold, mask) giving about ``sparsity`` for float64 gate activations g [B, I]."""
    B, I = g.shape
    a = g.abs().float()
    if kind == "mask":
        return None, rows_with_tokens(B, I, sparsity, g.device.type)
    if sparsity == 0.0:
        return torch.full((), -1.0, device=g.device), None  # every |g| > -1: all active
    if kind == "scalar":
        return torch.quantile(a.flatten(), sparsity), None
    if kind == "token":
        return torch.quantile(a, sparsity, dim=1, keepdim=True), None
    scale = torch.empty(I, device=g.device).uniform_(0.5, 1.5)
    return torch.quantile(a.flatten(), sparsity) * scale, None


def _exact_and_errors(xd: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, act: str,
                      dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Exact g = act(gate) and u [B, I] (float64), and bounds on the op's errors in them: fp32
    summation, and the rounding of gate, act(gate) and up to the dtype."""
    pre, u = xd @ wg.t(), xd @ wu.t()
    g = _act(pre, act)
    ulps = out_ulps(dtype)
    gate_err = 1.2 * (ACC * (xd.abs() @ wg.abs().t()) + ulps * pre.abs()) + ulps * g.abs()
    up_err = ACC * (xd.abs() @ wu.abs().t()) + ulps * u.abs()
    return g, u, gate_err, up_err


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", range(len(CPU_CASES)),
                         ids=[f"{c[0]}-{c[1]}" for c in CPU_CASES])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_reference(device, case, sparsity, batch, dtype):
    kind, act, (H, I), cfg, down_cfg = (CPU_CASES if device == "cpu" else CUDA_CASES)[case]
    x = torch.randn(batch, H, device=device).to(dtype)
    w_gate, w_up = weight(I, H, dtype, device), weight(I, H, dtype, device)
    w_down_t = weight(H, I, dtype, device).t().contiguous()
    xd, wg, wu, wd = (t.double() for t in (x, w_gate, w_up, w_down_t))
    g, u, gate_err, up_err = _exact_and_errors(xd, wg, wu, act, dtype)
    thr, mask = make_criterion(g, kind, sparsity)
    active = g.abs() > thr.double() if thr is not None else mask
    either_way = ((g.abs() - thr.double()).abs() <= gate_err if thr is not None
                  else torch.zeros_like(active))
    y = triton_impl(x, w_gate, w_up, w_down_t, thr, mask, act, config=cfg,
                     down_config=down_cfg, out=nan_like((batch, H), dtype, device))
    h_ref = torch.where(active, g * u, 0.0).to(dtype).double()
    h_err = torch.where(active, out_ulps(dtype) * h_ref.abs() + g.abs() * up_err
                        + u.abs() * gate_err + 2.0**-24, 0.0)
    h_err = h_err + torch.where(either_way, (1 + out_ulps(dtype)) * (g * u).abs(), 0.0)
    ref = h_ref @ wd
    bound = (out_ulps(dtype) * ref.abs() + h_err @ wd.abs() + ACC * (h_ref.abs() @ wd.abs())
             + 2.0**-24)
    assert_within(y, ref, bound, f"{kind} {act} H={H} I={I}")


@pytest.mark.parametrize("device", devices())
def test_large_batch_and_broadcast_threshold(device):
    """B = 17 (two launches of each kernel) with a per-channel [I] threshold."""
    dtype, B, H, I = torch.float16, 17, 63, 97
    x = torch.randn(B, H, device=device).to(dtype)
    w_gate, w_up = weight(I, H, dtype, device), weight(I, H, dtype, device)
    w_down_t = weight(H, I, dtype, device).t().contiguous()
    xd, wg, wu, wd = (t.double() for t in (x, w_gate, w_up, w_down_t))
    g, u, gate_err, _ = _exact_and_errors(xd, wg, wu, "silu", dtype)
    thr, _ = make_criterion(g, "channel", 0.5)
    y = triton_impl(x, w_gate, w_up, w_down_t, thr, out=nan_like((B, H), dtype, device))
    h_ref = torch.where(g.abs() > thr.double(), g * u, 0.0).to(dtype).double()
    ref = h_ref @ wd
    # h may differ by a few ulps of fp16 where g, u and g*u round differently, and a neuron
    # within the gate's error of its threshold may go either way (see module docstring).
    either_way = (g.abs() - thr.double()).abs() <= gate_err
    h_err = 4 * out_ulps(dtype) * h_ref.abs() + torch.where(either_way, 2 * (g * u).abs(), 0.0)
    bound = out_ulps(dtype) * ref.abs() + h_err @ wd.abs() + 2.0**-24
    assert_within(y, ref, bound, "B=17")
