"""Where the CPU decode path pays: measured once per weight shape and dtype on this machine.

Under ``kernel_mode="auto"`` a sparse module on the CPU decodes through the compiled CPU ops
(``triton_kernels.cpu``) only if, for the products it would run sparsely, the op reading *every*
row is no slower than the reference path's product on the same shape (mask the input, then
``F.linear``): then the path is faster at any sparsity it skips rows at. The check is
conservative (a shape where the op loses at sparsity 0 but wins at 0.5 stays on the reference
path) and cheap: a fraction of a second per shape, measured cold (the weights rotate over enough
copies to miss the last-level cache, as a model's weights do when it decodes), interleaved with
the reference product, best of several rounds; cached per shape for the process, so modules of
one shape (and the members of a q/k/v group, which decide together) always agree.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from triton_kernels import cpu as cpu_ops

log = logging.getLogger("sparseffn")

#: Bytes of weight copies a probe rotates over: more than a server CPU's last-level cache.
_COLD_BYTES = 96 << 20
_ROUNDS = 5

_TIMES: dict[tuple[tuple[int, int], torch.dtype], tuple[float, float]] = {}
_WARNED = False


def probe(shape: tuple[int, int], dtype: torch.dtype) -> tuple[float, float]:
    """(seconds per call of the CPU op over every row, of the reference path's masked
    ``F.linear``) for a weight [out, in] = ``shape`` of ``dtype`` and one token, on this
    machine's torch threads."""
    key = (tuple(shape), dtype)
    if key not in _TIMES:
        _TIMES[key] = _measure(*shape, dtype)
    return _TIMES[key]


def _measure(n: int, k: int, dtype: torch.dtype) -> tuple[float, float]:
    size = n * k * torch.finfo(dtype).bits // 8
    copies = max(2, min(256, -(-_COLD_BYTES // size)))
    g = torch.Generator().manual_seed(0)
    ws = torch.randn(copies, n, k, generator=g).to(dtype)
    w_ts = ws.transpose(1, 2).contiguous()
    x = torch.randn(1, k, generator=g).to(dtype)
    every_row = torch.tensor(-1.0)
    best_op = best_ref = float("inf")
    with torch.no_grad():
        for _ in range(_ROUNDS):
            start = time.perf_counter()
            for w_t in w_ts:
                cpu_ops.input_sparse_gemv_cpu(x, w_t, threshold=every_row)
            best_op = min(best_op, (time.perf_counter() - start) / copies)
            start = time.perf_counter()
            for w in ws:
                F.linear(torch.where(x.abs() > every_row.reshape(1), x, 0), w)
            best_ref = min(best_ref, (time.perf_counter() - start) / copies)
    return best_op, best_ref


def cpu_path_pays(weights: list[torch.Tensor]) -> bool:
    """Whether the CPU decode path is at least as fast as the reference path for these weights
    (the ones the path reads sparsely), summed over them; False where the CPU ops are
    unavailable (logged once, with the reason)."""
    global _WARNED
    if not cpu_ops.available():
        if not _WARNED:
            log.warning("sparseffn: no CPU decode path, decoding on the reference path: %s",
                        cpu_ops.unavailable_reason())
            _WARNED = True
        return False
    op = ref = 0.0
    for w in weights:
        t_op, t_ref = probe(tuple(w.shape), w.dtype)
        op, ref = op + t_op, ref + t_ref
    return op <= ref
