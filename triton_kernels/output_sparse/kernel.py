"""Triton kernel of the output-sparse GEMV (imported only where Triton is installed).

It reads a row-major weight [N, K] (nn.Linear layout) in tiles of ``rows`` output rows by
``cols`` contiguous inputs; a row no sequence needs is never loaded, and a program whose rows are
all inactive skips its whole loop over K. ``rows_dot`` and the tuning candidates serve the
gate/up kernel of ``triton_kernels.gated_mlp`` too, which reads its weights the same way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import upcast_dot
from ..tuning import LaunchConfig


@triton.jit
def tile_fma(acc, w, xv, BLOCK_B: tl.constexpr, UPCAST_DOT: tl.constexpr, FMA: tl.constexpr):
    if BLOCK_B == 1:
        acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
    elif FMA:  # acc [BLOCK_B, ROWS, BLOCK_K]: products summed over K only after the loop
        acc += xv.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    elif UPCAST_DOT:
        acc = tl.dot(xv.to(tl.float32), tl.trans(w).to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(xv, tl.trans(w), acc, input_precision="ieee")
    return acc


@triton.jit
def rows_dot(w_ptr, x_ptr, offs_r, r_ok, offs_b, b_ok, K, stride_w, stride_xb, stride_xk,
             BLOCK_B: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
             PREFETCH: tl.constexpr, UPCAST_DOT: tl.constexpr, FMA: tl.constexpr):
    """[BLOCK_B, ROWS] fp32: W[offs_r] . x[b] over all K, for the rows where r_ok.

    Batch 1, and batch > 1 with FMA, multiply elementwise and sum over K once after the loop
    (any ROWS, so a block of few rows is skipped whole); otherwise tl.dot over >= 16 rows.

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
    elif FMA:
        acc = tl.zeros([BLOCK_B, ROWS, BLOCK_K], dtype=tl.float32)
        x_ptrs = x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :] * stride_xk
        x_ok = b_ok[:, None]
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
            acc = tile_fma(acc, w, xv, BLOCK_B, UPCAST_DOT, FMA)
            w = w_next
            xv = x_next
    else:
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            w = tl.load(w_ptrs + k0, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            xv = tl.load(x_ptrs + k0 * stride_xk, mask=x_ok & k_ok, other=0.0)
            acc = tile_fma(acc, w, xv, BLOCK_B, UPCAST_DOT, FMA)
    if BLOCK_B == 1:
        return tl.sum(acc, axis=1)[None, :]
    elif FMA:
        return tl.sum(acc, axis=2)
    else:
        return acc


@triton.jit
def _output_sparse_kernel(
    x_ptr, w_ptr, m_ptr, y_ptr, B, N, K,
    stride_xb, stride_xk, stride_w, stride_mb, stride_mn, stride_yb,
    BLOCK_B: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
    UPCAST_DOT: tl.constexpr, FMA: tl.constexpr,
):
    """One program per ROWS output rows. Rows are few per program, so that a program whose rows
    nobody needs exits at once and the work of the others is spread over many programs (more rows
    per program, compacted to the active ones, left too few programs; a persistent grid over row
    blocks slowed the loop more than it saved in launching empty programs).
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
        res = rows_dot(w_ptr, x_ptr, offs_n, row_on, offs_b, b_ok, K, stride_w, stride_xb,
                       stride_xk, BLOCK_B, ROWS, BLOCK_K, PREFETCH, UPCAST_DOT, FMA)
    tl.store(y_ptr + offs_b[:, None] * stride_yb + offs_n[None, :],
             tl.where(m, res, 0.0).to(y_ptr.dtype.element_ty), mask=ok)


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
        m.stride(1), out.stride(0), BLOCK_B=cfg.block_b(B), ROWS=cfg.rows, BLOCK_K=cfg.cols,
        PREFETCH=cfg.prefetch, UPCAST_DOT=upcast_dot(x.dtype), FMA=cfg.fma,
        num_warps=cfg.num_warps,
    )


def candidates(batch: int, rows: int, K: int) -> list[LaunchConfig]:
    """Tuning candidates of this kernel and of the gate/up kernel; the first is the untuned
    default. ``rows``: the rows of the weight (outputs, or neurons), ``K`` its row length."""
    if batch == 1:
        tiles = [(4, 1024, 4, False), (2, 2048, 4, False), (1, 2048, 4, False),
                 (4, 1024, 4, True), (2, 2048, 4, True), (8, 512, 4, False)]
    else:  # tl.dot needs >= 16 rows
        tiles = [(16, 256, 4, False), (16, 256, 4, True), (16, 512, 8, False),
                 (32, 256, 8, False)]
        if batch <= 4:
            # FMA tiles of few rows, so that a block nobody needs is skipped whole: on an H100
            # at Llama-3-8B shapes they win at batch 2 and sometimes at 4, and lose 2x at 8.
            tiles += [t + (True,) for t in [(2, 1024, 4, False), (1, 2048, 4, False),
                                            (4, 512, 4, False)]]
    out: list[LaunchConfig] = []
    for r, c, w, pre, *fma in tiles:
        fma = bool(fma)
        r = min(r, max(16 if batch > 1 and not fma else 1, triton.next_power_of_2(rows)))
        cfg = LaunchConfig(r, min(c, max(16, triton.next_power_of_2(K))), 0, w, pre, fma)
        if cfg not in out:
            out.append(cfg)
    return out
