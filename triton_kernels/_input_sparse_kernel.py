"""Triton kernel of the input-sparse GEMV (imported only where Triton is installed).

y[b, :] = sum over active k of x[b, k] * w_t[k, :], with w_t [K, N] row-major so that an inactive
input k is a contiguous row of w_t that is never loaded.

Grid: (N / cols, K / span). Each program owns ``span`` rows of K and ``cols`` columns. It first
decides which of its rows any sequence needs and writes their indices, compacted, to a small
scratch area (Triton has no register scatter); then its tile loop runs over active rows only, so
the number of iterations (not just the bytes) shrinks with sparsity. The next tile's row indices
are loaded before the current tile is multiplied, so a program waits for one memory round trip
per tile, as a dense loop does. The first measured version tested activity per tile inside the
loop: its x load -> mask -> weight load chain made every tile two round trips, and at 0.9
sparsity it still took 51% of its own dense time (29.9 vs 58.6 us, fp16 4096 -> 14336, H100,
2026-11-23).
With several K ranges, each program adds its fp32 partial into a zero-filled fp32 [B, N]
accumulator that this launch allocated (``tl.atomic_add``, relaxed), and ``copy_`` casts it to y
afterwards (fp32 outputs are zeroed and take the atomics directly). Stream order alone separates
the fill, the adds and the cast: no program reads what another wrote, so there is no ticket, no
last-program logic and no ordering hazard (a ticketed one-kernel version was intermittently wrong
at batch 3-4, docs/kernels.md). The fp32 order of the adds varies between runs, so y may differ in
its last bit between identical calls. Against a second kernel summing [K ranges, B, N] partials in
a fixed order it was 3-12% faster at sparsity 0 and 5-21% at 0.5 (H100, 2026-11-23).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LaunchConfig, upcast_dot

#: How the kernel decides that input k of sequence b is active.
MODE_THRESHOLD, MODE_MASK, MODE_NONZERO = 0, 1, 2


@triton.jit
def _activity(x_ptr, thr_ptr, mask_ptr, offs_k, offs_b, ok, stride_xb, stride_xk, stride_tb,
              stride_tk, stride_mb, stride_mk, MODE: tl.constexpr):
    """(x, active) for rows offs_k [R] and sequences offs_b, both [R, BLOCK_B]."""
    xv = tl.load(x_ptr + offs_k[:, None] * stride_xk + offs_b[None, :] * stride_xb,
                 mask=ok, other=0.0)
    if MODE == 0:
        thr = tl.load(thr_ptr + offs_k[:, None] * stride_tk + offs_b[None, :] * stride_tb,
                      mask=ok, other=0.0)
        on = tl.abs(xv.to(tl.float32)) > thr
    elif MODE == 1:
        on = tl.load(mask_ptr + offs_k[:, None] * stride_mk + offs_b[None, :] * stride_mb,
                     mask=ok, other=0) != 0
    else:
        on = xv != 0
    return xv, on & ok


@triton.jit
def _input_sparse_kernel(
    x_ptr, w_ptr, thr_ptr, mask_ptr, idx_ptr, out_ptr,
    B, K, N,
    stride_xb, stride_xk, stride_wk, stride_tb, stride_tk, stride_mb, stride_mk,
    stride_ob,
    MODE: tl.constexpr, BLOCK_B: tl.constexpr, SPAN: tl.constexpr, CHUNK: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_b = tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    # 1. Compact this program's active rows (any sequence) into idx[base : base + count], in
    #    chunks of at most 128 rows so that the [chunk, BLOCK_B] activity stays in registers.
    base = (pid_s * tl.num_programs(0) + pid_n) * SPAN
    count = 0
    for c0 in range(0, SPAN, CHUNK):
        offs_k = pid_s * SPAN + c0 + tl.arange(0, CHUNK)
        _, on = _activity(x_ptr, thr_ptr, mask_ptr, offs_k, offs_b,
                          (offs_k < K)[:, None] & b_ok[None, :], stride_xb, stride_xk,
                          stride_tb, stride_tk, stride_mb, stride_mk, MODE)
        row_on = (tl.max(on.to(tl.int32), axis=1) > 0).to(tl.int32)
        tl.store(idx_ptr + base + count + tl.cumsum(row_on, axis=0) - 1, offs_k,
                 mask=row_on != 0)
        count += tl.sum(row_on, axis=0)
    tl.debug_barrier()  # the stores above are read back by other threads of this program
    # 2. Loop over active rows only, ROWS at a time.
    # Batch 1 reduces each tile over its rows at once: with BLOCK_N = 256 * num_warps every
    # thread owns whole columns of the tile, so the sum stays inside the thread and the
    # accumulator is 8 registers (a [ROWS, BLOCK_N] one cost 64 and halved the programs per SM).
    if BLOCK_B == 1:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    r = tl.arange(0, ROWS)
    # .cg: read the indices from L2, where this program's stores went, never from a stale L1 line.
    k_idx = tl.load(idx_ptr + base + r, mask=r < count, other=0, cache_modifier=".cg")
    for j in range(0, count, ROWS):
        r_ok = (j + r) < count
        w = tl.load(w_ptr + k_idx[:, None] * stride_wk + offs_n[None, :],
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        x_r, on_r = _activity(x_ptr, thr_ptr, mask_ptr, k_idx, offs_b,
                              r_ok[:, None] & b_ok[None, :], stride_xb, stride_xk, stride_tb,
                              stride_tk, stride_mb, stride_mk, MODE)
        k_idx = tl.load(idx_ptr + base + j + ROWS + r, mask=(j + ROWS + r) < count, other=0,
                        cache_modifier=".cg")
        xa = tl.where(on_r, x_r, tl.zeros_like(x_r))
        if BLOCK_B == 1:
            acc += tl.sum(xa.to(tl.float32) * w.to(tl.float32), axis=0)
        elif UPCAST_DOT:
            acc = tl.dot(tl.trans(xa).to(tl.float32), w.to(tl.float32), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(xa), w, acc, input_precision="ieee")
    if BLOCK_B == 1:
        res = acc[None, :]
    else:
        res = acc
    out_ptrs = out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :]
    out_ok = b_ok[:, None] & n_ok[None, :]
    if ATOMIC:  # one of several K ranges: add into the zeroed fp32 accumulator
        tl.atomic_add(out_ptrs, res, mask=out_ok, sem="relaxed")
    else:
        tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=out_ok)


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
    # span 0 (or more than K) means one K range: y is stored directly, no atomics.
    span = min(cfg.span or K, max(cfg.rows, triton.next_power_of_2(K)))
    grid = (triton.cdiv(N, cfg.cols), triton.cdiv(K, span))
    splits = grid[1]
    atomic = splits > 1
    if not atomic:
        target = out
    elif out.dtype == torch.float32:
        target = out.zero_()
    else:
        target = torch.zeros((B, N), dtype=torch.float32, device=x.device)
    idx = torch.empty(grid[0] * grid[1] * span, dtype=torch.int32, device=x.device)
    # Unused pointers (by MODE) are given x so that no placeholder tensor is allocated per call.
    thr_t = thr if thr is not None else x
    mask_t = mask.view(torch.uint8) if mask is not None else x
    _input_sparse_kernel[grid](
        x, w_t, thr_t, mask_t, idx, target,
        B, K, N,
        x.stride(0), x.stride(1), w_t.stride(0), thr_t.stride(0), thr_t.stride(1),
        mask_t.stride(0), mask_t.stride(1),
        target.stride(0),
        MODE=mode, BLOCK_B=block_b, SPAN=span, CHUNK=min(span, 128), ROWS=cfg.rows,
        BLOCK_N=cfg.cols,
        UPCAST_DOT=upcast_dot(x.dtype), ATOMIC=atomic, num_warps=cfg.num_warps,
    )
    if target is not out:
        out.copy_(target)


def candidates(batch: int, K: int, N: int, n_sm: int) -> list[LaunchConfig]:
    """Tuning candidates; the first is the untuned default.

    (rows, cols, warps, programs per SM): batch-1 tiles are 256 * num_warps columns wide (see
    the kernel), tl.dot needs >= 16 rows. The programs per SM set the span; several are tried
    because the best one depends on how many programs fit an SM at once (registers) and on
    the last, partial wave of programs.
    """
    if batch == 1:
        tiles = [(16, 1024, 4, 6), (16, 1024, 4, 3), (16, 1024, 4, 12), (8, 1024, 4, 6),
                 (8, 1024, 4, 12), (16, 512, 2, 6), (16, 512, 2, 12), (16, 2048, 8, 3)]
    else:
        tiles = [(16, 256, 8, 3), (16, 256, 8, 6), (32, 128, 4, 3), (32, 128, 4, 6),
                 (16, 128, 4, 6)]
    out: list[LaunchConfig] = []
    for rows, cols, warps, per_sm in tiles:
        cols = min(cols, max(16, triton.next_power_of_2(N)))
        n_blocks = triton.cdiv(N, cols)
        want = triton.cdiv(K * n_blocks, per_sm * n_sm)  # rows per program
        span = max(rows, min(1024, triton.next_power_of_2(want)))
        cfg = LaunchConfig(rows, cols, span, warps)
        if cfg not in out:
            out.append(cfg)
    return out
