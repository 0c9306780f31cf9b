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

Batches are decided the same way (``batch_limit``): at batch B the op reads the union of the
sequences' active rows, which with per-token sets is most rows, so batches up to B take the path
only where the op reading every row for B sequences is no slower than ``F.linear`` on B tokens.
The probe stops at batch 4: on a 2-core EPYC with SmolLM2, batch 4 decoded 1.29-1.38x faster
than dense through the ops, while at batch 16 the products still won by 1.1-1.4x in the probe
but whole decode steps tied dense (0.94-1.09x, docs/e2e.md), so larger batches decode densely.
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

#: Batch sizes the probe measures beyond 1, in increasing order (``batch_limit``).
PROBE_BATCHES = (4,)

_TIMES: dict[tuple[tuple[int, int], torch.dtype, int], tuple[float, float]] = {}
_WARNED = False


def probe(shape: tuple[int, int], dtype: torch.dtype, batch: int = 1) -> tuple[float, float]:
    """(seconds per call of the CPU op over every row, of the reference path's masked
    ``F.linear``) for a weight [out, in] = ``shape`` of ``dtype`` and ``batch`` tokens, on this
    machine's torch threads."""
    key = (tuple(shape), dtype, batch)
    if key not in _TIMES:
        _TIMES[key] = _measure(*shape, dtype, batch)
    return _TIMES[key]


def _measure(n: int, k: int, dtype: torch.dtype, batch: int = 1) -> tuple[float, float]:
    size = n * k * torch.finfo(dtype).bits // 8
    copies = max(2, min(256, -(-_COLD_BYTES // size)))
    g = torch.Generator().manual_seed(0)
    ws = torch.randn(copies, n, k, generator=g).to(dtype)
    w_ts = ws.transpose(1, 2).contiguous()
    x = torch.randn(batch, k, generator=g).to(dtype)
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


def cpu_path_pays(weights: list[torch.Tensor], batch: int = 1) -> bool:
    """Whether the CPU decode path is at least as fast as the reference path for these weights
    (the ones the path reads sparsely) at ``batch`` tokens, summed over them; False where the
    CPU ops are unavailable (logged once, with the reason)."""
    global _WARNED
    if not cpu_ops.available():
        if not _WARNED:
            log.warning("sparseffn: no CPU decode path, decoding on the reference path: %s",
                        cpu_ops.unavailable_reason())
            _WARNED = True
        return False
    op = ref = 0.0
    for w in weights:
        t_op, t_ref = probe(tuple(w.shape), w.dtype, batch)
        op, ref = op + t_op, ref + t_ref
    return op <= ref


def batch_limit(weights: list[torch.Tensor]) -> int:
    """The largest decode batch at which the CPU path pays for these weights: the last of
    ``PROBE_BATCHES`` before the first where it does not (1 if it pays at none of them; call it
    only where ``cpu_path_pays(weights)``)."""
    limit = 1
    for batch in PROBE_BATCHES:
        if not cpu_path_pays(weights, batch):
            break
        limit = batch
    return limit
