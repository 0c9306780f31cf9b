"""Triton kernel of the gate/up half of the sparse gated MLP (imported only where Triton is
installed); the down half is the input-sparse GEMV's kernel.

It reads the gate and up weights [I, H] (nn.Linear layout) in tiles of ``rows`` neurons by
``cols`` contiguous inputs, as the output-sparse kernel reads its weight, with the same
``rows_dot`` and the same tuning candidates.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import upcast_dot
from ..output_sparse.kernel import rows_dot
from ..output_sparse.kernel import candidates  # noqa: F401  (the gate/up tiles are the same)
from ..tuning import LaunchConfig

ACT_SILU, ACT_GELU_TANH = 0, 1


@triton.jit
def _activation(g, ACT: tl.constexpr):
    if ACT == 0:
        return g * tl.sigmoid(g)
    else:
        # gelu_tanh(g) = g (1 + tanh(z)) / 2 = g sigmoid(2 z), z = sqrt(2/pi) (g + 0.044715 g^3)
        return g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))


@triton.jit
def _rounded(v, DT: tl.constexpr):
    """fp32 v rounded to DT (the activations' dtype) and back."""
    return v.to(DT).to(tl.float32)


@triton.jit
def _gate_up_kernel(
    x_ptr, wg_ptr, wu_ptr, thr_ptr, m_ptr, h_ptr, B, I, H,
    stride_xb, stride_xh, stride_wg, stride_wu, stride_tb, stride_ti, stride_mb, stride_mi,
    stride_hb,
    USE_MASK: tl.constexpr, ACT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
    PREFETCH: tl.constexpr, UPCAST_DOT: tl.constexpr, FMA: tl.constexpr,
):
    """h[b, i] = act(Wg[i] . x[b]) * (Wu[i] . x[b]) where active, else 0; h in x's dtype.

    Threshold mode: every gate row is read, active = |act(gate)| > thr, and only active up rows
    are read. Mask mode: gate and up rows of inactive neurons are both skipped. A program whose
    neurons are all inactive skips the skippable loops altogether.

    gate, act(gate) and up are rounded to x's dtype as they are formed, as the dense module
    computes them (nn.Linear outputs and the activation in x's dtype): the threshold then sees
    the values the reference path sees, and neurons within rounding of their threshold are
    decided as there.
    """
    DT = h_ptr.dtype.element_ty
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = offs_i < I
    offs_b = tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    bi_ok = b_ok[:, None] & i_ok[None, :]
    if USE_MASK:
        on = tl.load(m_ptr + offs_b[:, None] * stride_mb + offs_i[None, :] * stride_mi,
                     mask=bi_ok, other=0) != 0
        row_on = tl.max(on.to(tl.int32), axis=0) > 0
        g = tl.zeros([BLOCK_B, BLOCK_I], dtype=tl.float32)
        u = tl.zeros([BLOCK_B, BLOCK_I], dtype=tl.float32)
        if tl.max(row_on.to(tl.int32), axis=0) > 0:
            g = rows_dot(wg_ptr, x_ptr, offs_i, row_on, offs_b, b_ok, H, stride_wg, stride_xb,
                         stride_xh, BLOCK_B, BLOCK_I, BLOCK_H, PREFETCH, UPCAST_DOT, FMA)
            u = rows_dot(wu_ptr, x_ptr, offs_i, row_on, offs_b, b_ok, H, stride_wu, stride_xb,
                         stride_xh, BLOCK_B, BLOCK_I, BLOCK_H, PREFETCH, UPCAST_DOT, FMA)
        g = _rounded(_activation(_rounded(g, DT), ACT), DT)
        u = _rounded(u, DT)
    else:
        g = rows_dot(wg_ptr, x_ptr, offs_i, i_ok, offs_b, b_ok, H, stride_wg, stride_xb,
                     stride_xh, BLOCK_B, BLOCK_I, BLOCK_H, PREFETCH, UPCAST_DOT, FMA)
        g = _rounded(_activation(_rounded(g, DT), ACT), DT)
        thr = tl.load(thr_ptr + offs_b[:, None] * stride_tb + offs_i[None, :] * stride_ti,
                      mask=bi_ok, other=0.0)
        on = (tl.abs(g) > thr) & bi_ok
        row_on = tl.max(on.to(tl.int32), axis=0) > 0
        u = tl.zeros([BLOCK_B, BLOCK_I], dtype=tl.float32)
        if tl.max(row_on.to(tl.int32), axis=0) > 0:
            u = _rounded(rows_dot(wu_ptr, x_ptr, offs_i, row_on, offs_b, b_ok, H, stride_wu,
                                  stride_xb, stride_xh, BLOCK_B, BLOCK_I, BLOCK_H, PREFETCH,
                                  UPCAST_DOT, FMA), DT)
    h = tl.where(on, g * u, 0.0)
    tl.store(h_ptr + offs_b[:, None] * stride_hb + offs_i[None, :],
             h.to(h_ptr.dtype.element_ty), mask=bi_ok)


def launch_gate_up(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   thr: torch.Tensor | None, mask: torch.Tensor | None, act: int,
                   h: torch.Tensor, cfg: LaunchConfig) -> None:
    """h [B, I] (contiguous, x's dtype) for <= MAX_BATCH_PER_LAUNCH sequences.

    Exactly one of thr (fp32 [B, I] view) and mask (bool [B, I] view) is given.
    """
    B, H = x.shape
    I = w_gate.shape[0]
    # Unused pointers (by USE_MASK) are given x so that nothing is allocated per call.
    t = thr if thr is not None else x
    m = mask.view(torch.uint8) if mask is not None else x
    _gate_up_kernel[(triton.cdiv(I, cfg.rows),)](
        x, w_gate, w_up, t, m, h, B, I, H, x.stride(0), x.stride(1), w_gate.stride(0),
        w_up.stride(0), t.stride(0), t.stride(1), m.stride(0), m.stride(1), h.stride(0),
        USE_MASK=mask is not None, ACT=act, BLOCK_B=cfg.block_b(B), BLOCK_I=cfg.rows,
        BLOCK_H=cfg.cols, PREFETCH=cfg.prefetch, UPCAST_DOT=upcast_dot(x.dtype), FMA=cfg.fma,
        num_warps=cfg.num_warps,
    )
