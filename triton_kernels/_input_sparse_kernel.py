"""Triton kernel of the input-sparse GEMV (imported only where Triton is installed).

y[b, :] = sum over active k of x[b, k] * w_t[k, :], with w_t [K, N] row-major so that an inactive
input k is a contiguous row of w_t that is never loaded. Programs tile N (``cols`` contiguous
elements, 16-byte vector loads) and split K into ``split`` ranges for enough programs in flight;
with split > 1 each program writes an fp32 partial and a second small kernel sums them in a fixed
order (deterministic, and no zero-filled buffer or atomics needed).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LaunchConfig, scratch, upcast_dot

#: How the kernel decides that input k of sequence b is active.
MODE_THRESHOLD, MODE_MASK, MODE_NONZERO = 0, 1, 2


@triton.jit
def _input_sparse_kernel(
    x_ptr, w_ptr, thr_ptr, mask_ptr, out_ptr,
    B, K, N, k_per_split,
    stride_xb, stride_xk, stride_wk, stride_tb, stride_tk, stride_mb, stride_mk,
    stride_os, stride_ob,
    MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_b = tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # Batch 1 accumulates elementwise in a [BLOCK_K, BLOCK_N] tile and reduces once at the end
    # (no per-tile cross-warp reduction); batches > 1 use the tensor cores, M padded to 16.
    if BLOCK_B == 1:
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kb_ok = (offs_k < k_end)[:, None] & b_ok[None, :]
        # x is tiny and stays in L1/L2; it is loaded as [BLOCK_K, BLOCK_B].
        xv = tl.load(x_ptr + offs_k[:, None] * stride_xk + offs_b[None, :] * stride_xb,
                     mask=kb_ok, other=0.0)
        if MODE == 0:
            thr = tl.load(thr_ptr + offs_k[:, None] * stride_tk + offs_b[None, :] * stride_tb,
                          mask=kb_ok, other=0.0)
            on = tl.abs(xv.to(tl.float32)) > thr
        elif MODE == 1:
            on = tl.load(mask_ptr + offs_k[:, None] * stride_mk + offs_b[None, :] * stride_mb,
                         mask=kb_ok, other=0) != 0
        else:
            on = xv != 0
        on = on & kb_ok
        xa = tl.where(on, xv, tl.zeros_like(xv))
        row_on = tl.max(on.to(tl.int32), axis=1) > 0
        # A tile whose rows nobody needs costs neither bytes nor FMAs; inside a tile, masked rows
        # issue no memory transactions.
        if tl.max(row_on.to(tl.int32), axis=0) > 0:
            w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :],
                        mask=row_on[:, None] & n_ok[None, :], other=0.0)
            if BLOCK_B == 1:
                acc += xa.to(tl.float32) * w.to(tl.float32)
            elif UPCAST_DOT:
                acc = tl.dot(tl.trans(xa).to(tl.float32), w.to(tl.float32), acc,
                             input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(xa), w, acc, input_precision="ieee")
    if BLOCK_B == 1:
        res = tl.sum(acc, axis=0)[None, :]
    else:
        res = acc
    out_ptrs = out_ptr + pid_s * stride_os + offs_b[:, None] * stride_ob + offs_n[None, :]
    tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=b_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_splits_kernel(p_ptr, y_ptr, S, M, BLOCK: tl.constexpr):
    """y[m] = sum_s p[s, m] in fp32, in a fixed order; p is [S, M] contiguous."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(S):
        acc += tl.load(p_ptr + s * M + offs, mask=ok, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


def sum_splits(partial: torch.Tensor, out: torch.Tensor) -> None:
    """out[...] = partial.sum(0) for a contiguous fp32 partial [S, *out.shape]."""
    m = out.numel()
    block = 1024
    _sum_splits_kernel[(triton.cdiv(m, block),)](partial, out, partial.shape[0], m, BLOCK=block,
                                                 num_warps=4)


def launch_input_sparse(x: torch.Tensor, w_t: torch.Tensor, mode: int,
                        thr: torch.Tensor | None, mask: torch.Tensor | None,
                        out: torch.Tensor, cfg: LaunchConfig) -> None:
    """Write y for a chunk of at most MAX_BATCH_PER_LAUNCH sequences into ``out`` [B, N].

    x [B, K] any strides; w_t [K, N] unit stride along N; thr fp32 / mask bool, both [B, K]
    views (stride 0 allowed); out contiguous [B, N] of x's dtype.
    """
    B, K = x.shape
    N = w_t.shape[1]
    block_b = 1 if B == 1 else 16
    k_tiles = triton.cdiv(K, cfg.rows)
    split = max(1, min(cfg.split, k_tiles))
    k_per_split = triton.cdiv(k_tiles, split) * cfg.rows
    split = triton.cdiv(K, k_per_split)
    target = out if split == 1 else scratch((split, B, N), torch.float32, x.device)
    # Unused pointers (by MODE) are given x so that no placeholder tensor is allocated per call.
    thr_t = thr if thr is not None else x
    mask_t = mask.view(torch.uint8) if mask is not None else x
    grid = (triton.cdiv(N, cfg.cols), split)
    _input_sparse_kernel[grid](
        x, w_t, thr_t, mask_t, target,
        B, K, N, k_per_split,
        x.stride(0), x.stride(1), w_t.stride(0), thr_t.stride(0), thr_t.stride(1),
        mask_t.stride(0), mask_t.stride(1),
        0 if split == 1 else target.stride(0), target.stride(-2),
        MODE=mode, BLOCK_B=block_b, BLOCK_K=cfg.rows, BLOCK_N=cfg.cols,
        UPCAST_DOT=upcast_dot(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        sum_splits(target, out)


def candidates(batch: int, K: int, N: int, n_sm: int) -> list[LaunchConfig]:
    """Tuning candidates; the first is the untuned default. Splits aim at 2 or 4 programs per SM."""
    if batch == 1:
        tiles = [(32, 256, 4), (16, 512, 4), (64, 128, 4), (32, 512, 8)]
    else:
        tiles = [(32, 128, 4), (64, 128, 4), (32, 256, 8), (64, 64, 4)]
    out: list[LaunchConfig] = []
    for per_sm in (4, 2):
        for rows, cols, warps in tiles:
            n_blocks = triton.cdiv(N, cols)
            k_tiles = triton.cdiv(K, rows)
            split = max(1, min(triton.cdiv(per_sm * n_sm, n_blocks), k_tiles // 4 or 1))
            cfg = LaunchConfig(rows, cols, split, warps, 1 if batch == 1 else 2)
            if cfg not in out:
                out.append(cfg)
    return out
