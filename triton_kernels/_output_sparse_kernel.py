"""Triton kernels of the output-sparse GEMV and of the gate/up half of the sparse gated MLP.

Both read a row-major weight [N, K] (nn.Linear layout) in tiles of ``rows`` output rows by
``cols`` contiguous inputs; a row no sequence needs is never loaded, and a program whose rows are
all inactive skips its whole loop over K.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LaunchConfig, upcast_dot

ACT_SILU, ACT_GELU_TANH = 0, 1


@triton.jit
def _tile_fma(acc, w, xv, BLOCK_B: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if BLOCK_B == 1:
        acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
    elif UPCAST_DOT:
        acc = tl.dot(xv.to(tl.float32), tl.trans(w).to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(xv, tl.trans(w), acc, input_precision="ieee")
    return acc


@triton.jit
def _rows_dot(w_ptr, x_ptr, offs_r, r_ok, offs_b, b_ok, K, stride_w, stride_xb, stride_xk,
              BLOCK_B: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
              PREFETCH: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """[BLOCK_B, ROWS] fp32: W[offs_r] . x[b] over all K, for the rows where r_ok.

    Triton pipelines only loads that feed tl.dot, so a plain loop waits one memory round trip
    per tile. PREFETCH loads the next tile before multiplying the current one (two tiles in
    flight, twice the registers); without it, more programs per SM hide the latency instead.
    """
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_r[:, None] * stride_w + offs_k[None, :]
    if BLOCK_B == 1:
        acc = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
        x_ptrs = x_ptr + offs_k * stride_xk
        x_ok = tl.full([BLOCK_K], 1, tl.int1)
    else:
        acc = tl.zeros([BLOCK_B, ROWS], dtype=tl.float32)
        x_ptrs = x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :] * stride_xk
        x_ok = b_ok[:, None]
    if PREFETCH:
        k_ok = offs_k < K
        w = tl.load(w_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        xv = tl.load(x_ptrs, mask=x_ok & k_ok, other=0.0)
        for k0 in range(BLOCK_K, K + BLOCK_K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            w_next = tl.load(w_ptrs + k0, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            x_next = tl.load(x_ptrs + k0 * stride_xk, mask=x_ok & k_ok, other=0.0)
            acc = _tile_fma(acc, w, xv, BLOCK_B, UPCAST_DOT)
            w = w_next
            xv = x_next
    else:
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            w = tl.load(w_ptrs + k0, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            xv = tl.load(x_ptrs + k0 * stride_xk, mask=x_ok & k_ok, other=0.0)
            acc = _tile_fma(acc, w, xv, BLOCK_B, UPCAST_DOT)
    if BLOCK_B == 1:
        return tl.sum(acc, axis=1)[None, :]
    else:
        return acc


@triton.jit
def _output_sparse_kernel(
    x_ptr, w_ptr, m_ptr, y_ptr, B, N, K,
    stride_xb, stride_xk, stride_w, stride_mb, stride_mn, stride_yb,
    BLOCK_B: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """One program per ROWS output rows. Rows are few per program, so that a program whose rows
    nobody needs exits at once and the work of the others is spread over many programs.

    Measured alternatives (H100, 2026-11-23): 64 rows per program, compacted to the active ones
    and looped over, left too few programs (1.9x slower at sparsity 0 on 14336x4096); a
    persistent grid looping over row blocks removed the cost of launching thousands of empty
    programs at 0.95 sparsity (11.1 -> 8.3 us on 4096->14336) but its loop made the same tiles
    10% slower at 0.5, so it was dropped.
    """
    offs_n = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_b = tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    ok = b_ok[:, None] & (offs_n < N)[None, :]
    m = tl.load(m_ptr + offs_b[:, None] * stride_mb + offs_n[None, :] * stride_mn,
                mask=ok, other=0) != 0
    row_on = tl.max(m.to(tl.int32), axis=0) > 0
    res = tl.zeros([BLOCK_B, ROWS], dtype=tl.float32)
    if tl.max(row_on.to(tl.int32), axis=0) > 0:
        res = _rows_dot(w_ptr, x_ptr, offs_n, row_on, offs_b, b_ok, K, stride_w, stride_xb,
                        stride_xk, BLOCK_B, ROWS, BLOCK_K, PREFETCH, UPCAST_DOT)
    tl.store(y_ptr + offs_b[:, None] * stride_yb + offs_n[None, :],
             tl.where(m, res, 0.0).to(y_ptr.dtype.element_ty), mask=ok)


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
    PREFETCH: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """h[b, i] = act(Wg[i] . x[b]) * (Wu[i] . x[b]) where active, else 0; h in x's dtype.

    Threshold mode: every gate row is read, active = |act(gate)| > thr, and only active up rows
    are read. Mask mode: gate and up rows of inactive neurons are both skipped. A program whose
    neurons are all inactive skips the skippable loops altogether.

    gate, act(gate) and up are rounded to x's dtype as they are formed, as the dense module
    computes them (nn.Linear outputs and the activation in x's dtype): the threshold then sees
    the values the reference path sees. Without it, CHESS neurons within rounding of their
    threshold were decided differently and each decode-step MLP output differed from the
    reference path's by 1.9% (median, bf16, Llama-3-8B shape at 50%, H200).
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
            g = _rows_dot(wg_ptr, x_ptr, offs_i, row_on, offs_b, b_ok, H, stride_wg, stride_xb,
                          stride_xh, BLOCK_B, BLOCK_I, BLOCK_H, PREFETCH, UPCAST_DOT)
            u = _rows_dot(wu_ptr, x_ptr, offs_i, row_on, offs_b, b_ok, H, stride_wu, stride_xb,
                          stride_xh, BLOCK_B, BLOCK_I, BLOCK_H, PREFETCH, UPCAST_DOT)
        g = _rounded(_activation(_rounded(g, DT), ACT), DT)
        u = _rounded(u, DT)
    else:
        g = _rows_dot(wg_ptr, x_ptr, offs_i, i_ok, offs_b, b_ok, H, stride_wg, stride_xb,
                      stride_xh, BLOCK_B, BLOCK_I, BLOCK_H, PREFETCH, UPCAST_DOT)
        g = _rounded(_activation(_rounded(g, DT), ACT), DT)
        thr = tl.load(thr_ptr + offs_b[:, None] * stride_tb + offs_i[None, :] * stride_ti,
                      mask=bi_ok, other=0.0)
        on = (tl.abs(g) > thr) & bi_ok
        row_on = tl.max(on.to(tl.int32), axis=0) > 0
        u = tl.zeros([BLOCK_B, BLOCK_I], dtype=tl.float32)
        if tl.max(row_on.to(tl.int32), axis=0) > 0:
            u = _rounded(_rows_dot(wu_ptr, x_ptr, offs_i, row_on, offs_b, b_ok, H, stride_wu,
                                   stride_xb, stride_xh, BLOCK_B, BLOCK_I, BLOCK_H, PREFETCH,
                                   UPCAST_DOT), DT)
    h = tl.where(on, g * u, 0.0)
    tl.store(h_ptr + offs_b[:, None] * stride_hb + offs_i[None, :],
             h.to(h_ptr.dtype.element_ty), mask=bi_ok)


def _block_b(batch: int) -> int:
    return 1 if batch == 1 else 16


def launch_output_sparse(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, out: torch.Tensor,
                         cfg: LaunchConfig) -> None:
    """out [B, N] (contiguous) = masked W x for <= MAX_BATCH_PER_LAUNCH sequences.

    x [B, K] any strides, w [N, K] unit stride along K, mask bool [B, N] view.
    """
    B, K = x.shape
    N = w.shape[0]
    m = mask.view(torch.uint8)
    _output_sparse_kernel[(triton.cdiv(N, cfg.rows),)](
        x, w, m, out, B, N, K, x.stride(0), x.stride(1), w.stride(0), m.stride(0),
        m.stride(1), out.stride(0), BLOCK_B=_block_b(B), ROWS=cfg.rows, BLOCK_K=cfg.cols,
        PREFETCH=cfg.prefetch, UPCAST_DOT=upcast_dot(x.dtype), num_warps=cfg.num_warps,
    )


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
        USE_MASK=mask is not None, ACT=act, BLOCK_B=_block_b(B), BLOCK_I=cfg.rows,
        BLOCK_H=cfg.cols, PREFETCH=cfg.prefetch, UPCAST_DOT=upcast_dot(x.dtype),
        num_warps=cfg.num_warps,
    )


def candidates(batch: int, rows: int, K: int) -> list[LaunchConfig]:
    """Tuning candidates for both kernels here; the first is the untuned default."""
    if batch == 1:
        tiles = [(4, 1024, 4, False), (2, 2048, 4, False), (1, 2048, 4, False),
                 (4, 1024, 4, True), (2, 2048, 4, True), (8, 512, 4, False)]
    else:  # tl.dot needs >= 16 rows
        tiles = [(16, 256, 4, False), (16, 256, 4, True), (16, 512, 8, False),
                 (32, 256, 8, False)]
    out: list[LaunchConfig] = []
    for r, c, w, pre in tiles:
        r = min(r, max(16 if batch > 1 else 1, triton.next_power_of_2(rows)))
        cfg = LaunchConfig(r, min(c, max(16, triton.next_power_of_2(K))), 0, w, pre)
        if cfg not in out:
            out.append(cfg)
    return out
