"""Triton kernel of the input-sparse GEMV (imported only where Triton is installed).

y[b, :] = sum over active k of x[b, k] * w_t[k, :], with w_t [K, N] row-major so that an inactive
input k is a contiguous row of w_t that is never loaded.

Grid: (N / cols, K / span). Each program owns ``span`` rows of K and ``cols`` columns. It first
decides which of its rows any sequence needs and writes their indices, compacted, to a small
scratch area (Triton has no register scatter); then its tile loop runs over active rows only, so
the number of iterations (not just the bytes) shrinks with sparsity. The next tile's row indices
are loaded before the current tile is multiplied, so a program waits for one memory round trip
per tile, as a dense loop does (testing activity per tile inside the loop made every tile two
round trips); the prefetching configs also load the next tile's weights then, so that two tiles
are in flight (the tuner picks them where they pay).

With several K ranges, each program adds its fp32 partial into a zeroed fp32 [B, N] accumulator
(``tl.atomic_add``, relaxed), and ``_finish_kernel`` then writes y from it in y's dtype and
zeroes it again, so the persistent buffer of ``triton_kernels.accumulator`` is ready for the next
call (one extra launch per call). Stream order alone separates the adds from the finish: no
program reads what another wrote, so there is no ticket, no last-program logic and no ordering
hazard. The fp32 order of the adds varies between runs, so y may differ in its last bit between
identical calls. The atomics are faster than a second kernel summing [K ranges, B, N] partials
in a fixed order, and the finishing launch is cheaper than letting the last program of each
column block convert and zero the sums (its fenced ticket and exchanges are serial L2 round
trips); docs/history/kernels-code-notes.md keeps the measurements.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .. import accumulator
from ..common import upcast_dot
from ..tuning import LaunchConfig
from .reference import MAX_GROUPS

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
def _rows_needed(x_ptr, thr_ptr, mask_ptr, offs_k, offs_b, b_ok, K, stride_xb, stride_xk,
                 stride_tb, stride_tk, stride_mb, stride_mk, MODE: tl.constexpr):
    """(int32 [R]: 1 where any sequence needs row offs_k [R] (rows >= K: 0), the number of
    active (sequence, row) entries among them)."""
    _, on = _activity(x_ptr, thr_ptr, mask_ptr, offs_k, offs_b,
                      (offs_k < K)[:, None] & b_ok[None, :], stride_xb, stride_xk, stride_tb,
                      stride_tk, stride_mb, stride_mk, MODE)
    on = on.to(tl.int32)
    return (tl.max(on, axis=1) > 0).to(tl.int32), tl.sum(tl.sum(on, axis=1), axis=0)


@triton.jit
def _load_rows(w_ptr, k_idx, stride_wk, offs_n, r_ok, n_ok):
    """Weight tile [R, BLOCK_N] of rows k_idx [R]; rows with r_ok False load nothing."""
    return tl.load(w_ptr + k_idx[:, None] * stride_wk + offs_n[None, :],
                   mask=r_ok[:, None] & n_ok[None, :], other=0.0)


@triton.jit
def _group_select(pid_n, NB1, NB2, a1, a2, a3, GROUPS: tl.constexpr):
    """a1, a2 or a3 for the group of column block pid_n (blocks [0, NB1), [NB1, NB2), rest)."""
    v = a1
    if GROUPS > 1:
        v = tl.where(pid_n >= NB1, a2, v)
    if GROUPS > 2:
        v = tl.where(pid_n >= NB2, a3, v)
    return v


@triton.jit
def _input_sparse_kernel(
    x_ptr, w_ptr, thr_ptr, mask_ptr, idx_ptr, out_ptr,
    B, K, N,
    stride_xb, stride_xk, stride_wk, stride_tb, stride_tk, stride_mb, stride_mk,
    stride_ob,
    w2_ptr, thr2_ptr, N2, stride_wk2, stride_tb2, stride_tk2,
    w3_ptr, thr3_ptr, N3, stride_wk3, stride_tb3, stride_tk3,
    NB1, NB2, cnt_ptr, cnt2_ptr, cnt3_ptr,
    MODE: tl.constexpr, COUNT: tl.constexpr, BLOCK_B: tl.constexpr, SPAN: tl.constexpr,
    CHUNK: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ATOMIC: tl.constexpr, GROUPS: tl.constexpr, PREFETCH: tl.constexpr, FMA: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    # Grouped launch: GROUPS weights sharing x, each with its own threshold; column blocks
    # [0, NB1) belong to the first, [NB1, NB2) to the second, the rest to the third, and their
    # outputs sit side by side in y. The group's operands are selected once, per program.
    first = _group_select(pid_n, NB1, NB2, pid_n * 0, NB1, NB2, GROUPS)
    col0 = _group_select(pid_n, NB1, NB2, pid_n * 0, N, N + N2, GROUPS)
    n_g = _group_select(pid_n, NB1, NB2, N, N2, N3, GROUPS)
    w_ptr = _group_select(pid_n, NB1, NB2, w_ptr, w2_ptr, w3_ptr, GROUPS)
    thr_ptr = _group_select(pid_n, NB1, NB2, thr_ptr, thr2_ptr, thr3_ptr, GROUPS)
    stride_wk = _group_select(pid_n, NB1, NB2, stride_wk, stride_wk2, stride_wk3, GROUPS)
    stride_tb = _group_select(pid_n, NB1, NB2, stride_tb, stride_tb2, stride_tb3, GROUPS)
    stride_tk = _group_select(pid_n, NB1, NB2, stride_tk, stride_tk2, stride_tk3, GROUPS)
    offs_n = (pid_n - first) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_g
    offs_b = tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    # 1. Compact this program's active rows (any sequence) into idx[base : base + count], in
    #    chunks of at most 128 rows so that the [chunk, BLOCK_B] activity stays in registers.
    base = (pid_s * tl.num_programs(0) + pid_n) * SPAN
    r = tl.arange(0, ROWS)
    count = 0
    entries = 0
    for c0 in range(0, SPAN, CHUNK):
        offs_k = pid_s * SPAN + c0 + tl.arange(0, CHUNK)
        row_on, n_on = _rows_needed(x_ptr, thr_ptr, mask_ptr, offs_k, offs_b, b_ok, K,
                                    stride_xb, stride_xk, stride_tb, stride_tk, stride_mb,
                                    stride_mk, MODE)
        tl.store(idx_ptr + base + count + tl.cumsum(row_on, axis=0) - 1, offs_k,
                 mask=row_on != 0)
        count += tl.sum(row_on, axis=0)
        entries += n_on
    if COUNT:
        # The site's measured-sparsity counts ([active, total] int64), added by the first
        # column block of each K range only: two atomics per K range, where counting with
        # torch ops costs a reduction kernel per call.
        if pid_n == first:
            cnt = _group_select(pid_n, NB1, NB2, cnt_ptr, cnt2_ptr, cnt3_ptr, GROUPS)
            rows = tl.minimum(K - pid_s * SPAN, SPAN)
            tl.atomic_add(cnt, entries.to(tl.int64), sem="relaxed")
            tl.atomic_add(cnt + 1, (rows * B).to(tl.int64), sem="relaxed")
    tl.debug_barrier()  # the stores above are read back by other threads of this program
    # .cg: read the indices from L2, where this program's stores went, never from a stale
    # L1 line.
    k_idx = tl.load(idx_ptr + base + r, mask=r < count, other=0, cache_modifier=".cg")
    # 2. Loop over active rows only, ROWS at a time.
    # Batch 1 reduces each tile over its rows at once: with BLOCK_N = 256 * num_warps every
    # thread owns whole columns of the tile, so the sum stays inside the thread and the
    # accumulator is 8 registers (a [ROWS, BLOCK_N] one cost 64 and halved the programs per SM).
    if BLOCK_B == 1:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    if PREFETCH:  # the first tile's weights, before the loop
        w_next = _load_rows(w_ptr, k_idx, stride_wk, offs_n, r < count, n_ok)
    for j in range(0, count, ROWS):
        r_ok = (j + r) < count
        if PREFETCH:
            w = w_next
        else:
            w = _load_rows(w_ptr, k_idx, stride_wk, offs_n, r_ok, n_ok)
        x_r, on_r = _activity(x_ptr, thr_ptr, mask_ptr, k_idx, offs_b,
                              r_ok[:, None] & b_ok[None, :], stride_xb, stride_xk, stride_tb,
                              stride_tk, stride_mb, stride_mk, MODE)
        k_idx = tl.load(idx_ptr + base + j + ROWS + r, mask=(j + ROWS + r) < count, other=0,
                        cache_modifier=".cg")
        if PREFETCH:  # the next tile's weights are in flight while this one is summed
            w_next = _load_rows(w_ptr, k_idx, stride_wk, offs_n, (j + ROWS + r) < count, n_ok)
        xa = tl.where(on_r, x_r, tl.zeros_like(x_r))
        if BLOCK_B == 1:
            acc += tl.sum(xa.to(tl.float32) * w.to(tl.float32), axis=0)
        elif FMA:  # [ROWS, BLOCK_B, BLOCK_N] products summed over rows inside each thread
            acc += tl.sum(xa.to(tl.float32)[:, :, None] * w.to(tl.float32)[:, None, :], axis=0)
        elif UPCAST_DOT:
            acc = tl.dot(tl.trans(xa).to(tl.float32), w.to(tl.float32), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(xa), w, acc, input_precision="ieee")
    if BLOCK_B == 1:
        res = acc[None, :]
    else:
        res = acc
    out_ptrs = out_ptr + offs_b[:, None] * stride_ob + col0 + offs_n[None, :]
    out_ok = b_ok[:, None] & n_ok[None, :]
    if ATOMIC:  # one of several K ranges: add into the zeroed fp32 accumulator
        tl.atomic_add(out_ptrs, res, mask=out_ok, sem="relaxed")
    else:
        tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _finish_kernel(acc_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    """out = acc (cast to out's dtype) and acc = 0, over ``numel`` contiguous elements."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    v = tl.load(acc_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(acc_ptr + offs, tl.zeros_like(v), mask=ok)


FINISH_BLOCK = 1024


def launch_input_sparse(x: torch.Tensor, w_t: torch.Tensor | Sequence[torch.Tensor], mode: int,
                        thr: torch.Tensor | Sequence[torch.Tensor] | None,
                        mask: torch.Tensor | None, out: torch.Tensor, cfg: LaunchConfig,
                        counts: Sequence[torch.Tensor] | None = None) -> None:
    """Write y for a chunk of at most MAX_BATCH_PER_LAUNCH sequences into ``out`` [B, N].

    x [B, K] any strides; w_t [K, N] unit stride along N; thr fp32 / mask bool, both [B, K]
    views (stride 0 allowed); out contiguous [B, N] of x's dtype.

    Grouped: ``w_t`` a sequence of up to MAX_GROUPS weights [K, N_g] sharing x, ``thr`` one
    threshold view per weight (or one shared ``mask``); out [B, sum N_g] holds their outputs
    side by side. One launch, so the fixed cost of a call is paid once for the group.

    ``counts``: one int64 [2] tensor per weight on x's device, [active, total] (sequence, input)
    entries, incremented in place (the sites' measured-sparsity counters).
    """
    w_ts = [w_t] if isinstance(w_t, torch.Tensor) else list(w_t)
    thrs = [thr] * len(w_ts) if thr is None or isinstance(thr, torch.Tensor) else list(thr)
    groups = len(w_ts)
    if not 1 <= groups <= MAX_GROUPS or len(thrs) != groups:
        raise ValueError(f"a launch takes 1 to {MAX_GROUPS} weights, each with its threshold")
    B, K = x.shape
    widths = [w.shape[1] for w in w_ts]
    N = sum(widths)
    block_b = cfg.block_b(B)
    # span 0 (or more than K) means one K range: y is stored directly, no atomics.
    span = min(cfg.span or K, max(cfg.rows, triton.next_power_of_2(K)))
    blocks = [triton.cdiv(n, cfg.cols) for n in widths]
    grid = (sum(blocks), triton.cdiv(K, span))
    atomic = grid[1] > 1
    if not atomic:
        target, acc = out, None
    else:
        acc = accumulator.persistent(B * N, x.device)
        # No persistent buffer (first seen during a graph capture): a temporary zeroed one;
        # _finish_kernel zeroes it again for nothing, at no extra launch.
        target = (acc if acc is not None
                  else torch.zeros(B * N, dtype=torch.float32, device=x.device)).view(B, N)
    idx = torch.empty(grid[0] * grid[1] * span, dtype=torch.int32, device=x.device)
    # Unused pointers (by MODE, by group count) are given x or the first group's operands, so
    # that no placeholder tensor is allocated per call.
    thr_ts = [t if t is not None else x for t in thrs]
    mask_t = mask.view(torch.uint8) if mask is not None else x
    pad = MAX_GROUPS - groups
    w_ts, thr_ts, widths = w_ts + [w_ts[0]] * pad, thr_ts + [thr_ts[0]] * pad, widths + [0] * pad
    cnts = list(counts) + [counts[0]] * pad if counts else [x] * MAX_GROUPS
    extra = []
    for g in (1, 2):
        extra += [w_ts[g], thr_ts[g], widths[g], w_ts[g].stride(0), thr_ts[g].stride(0),
                  thr_ts[g].stride(1)]
    try:
        _input_sparse_kernel[grid](
            x, w_ts[0], thr_ts[0], mask_t, idx, target,
            B, K, widths[0],
            x.stride(0), x.stride(1), w_ts[0].stride(0), thr_ts[0].stride(0),
            thr_ts[0].stride(1), mask_t.stride(0), mask_t.stride(1),
            target.stride(0),
            *extra, blocks[0], sum(blocks[:2]), *cnts,
            MODE=mode, COUNT=bool(counts), BLOCK_B=block_b, SPAN=span, CHUNK=min(span, 128),
            ROWS=cfg.rows, BLOCK_N=cfg.cols,
            UPCAST_DOT=upcast_dot(x.dtype), ATOMIC=atomic, GROUPS=groups,
            PREFETCH=cfg.prefetch, FMA=cfg.fma, num_warps=cfg.num_warps,
        )
    except BaseException:
        if acc is not None:  # partial sums may have landed: leave the buffer zeroed
            acc.zero_()
        raise
    if atomic:
        _finish_kernel[(triton.cdiv(B * N, FINISH_BLOCK),)](target, out, B * N,
                                                             BLOCK=FINISH_BLOCK)


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
        # The same tiles with the next tile's weights loaded while one is summed (without it a
        # program waits on one weight tile at a time).
        tiles += [t + (True,) for t in [(8, 1024, 4, 6), (8, 1024, 4, 12), (16, 1024, 4, 6),
                                        (8, 512, 2, 12)]]
    else:
        tiles = [(16, 256, 8, 3), (16, 256, 8, 6), (32, 128, 4, 3), (32, 128, 4, 6),
                 (16, 128, 4, 6)]
        if batch <= 8:
            # FMA tiles (each thread owns 8 columns, as at batch 1, for every sequence): on an
            # H100 at Llama-3-8B shapes they beat every tensor-core tile at batch 2 and 8, and
            # at batch 4 at high sparsity; prefetching tensor-core tiles never won and are gone.
            tiles += [(8, 1024, 4, 6, False, True), (16, 1024, 4, 6, False, True),
                      (2, 1024, 4, 6, True, True), (4, 1024, 4, 6, True, True)]
    out: list[LaunchConfig] = []
    for rows, cols, warps, per_sm, *flags in tiles:
        prefetch, fma = (flags + [False, False])[:2]
        cols = min(cols, max(16, triton.next_power_of_2(N)))
        n_blocks = triton.cdiv(N, cols)
        want = triton.cdiv(K * n_blocks, per_sm * n_sm)  # rows per program
        span = max(rows, min(1024, triton.next_power_of_2(want)))
        cfg = LaunchConfig(rows, cols, span, warps, prefetch, fma)
        if cfg not in out:
            out.append(cfg)
    return out
