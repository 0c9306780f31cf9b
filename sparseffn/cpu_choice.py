"""Whether the CPU decode path beats dense for a shape: measured once per shape and thread count.

A CPU decode step is bound by reading weights from memory, as a GPU's is, and a real model's
weights do not stay in the CPU caches between steps. So each choice is timed on enough copies of
synthetic weights of the shape that every call reads memory (``COLD_BYTES`` of them), dense
(``F.linear`` on nn.Linear's layout) against the CPU decode path at ``AT_SPARSITY``. The answer
is cached for the process; ``sparseffn.dispatch.takes_kernel_path`` asks it under AUTO.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

import triton_kernels as tk

#: Weight bytes the copies of one timing span, beyond any CPU's last-level cache.
COLD_BYTES = 96 << 20
#: The sparsity each choice is timed at (where users run; the path gains more above it).
AT_SPARSITY = 0.5
ROUNDS = 3

_CHOICES: dict[tuple, bool] = {}


def _seconds(calls: list[Callable[[], object]]) -> float:
    """Best over ``ROUNDS`` of the mean time of one call, each call on its own copy."""
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for call in calls:
            call()
        best = min(best, (time.perf_counter() - start) / len(calls))
    return best


def _copies(shapes: list[tuple[int, int]]) -> int:
    per_copy = sum(n * k for n, k in shapes) * 4
    return max(2, min(64, COLD_BYTES // max(per_copy, 1)))


def _input_sparse(n: int, k: int, g: torch.Generator) -> tuple[list, list]:
    """Dense and CPU-path calls of one projection [N, K] on copies."""
    copies = _copies([(n, k)])
    x = torch.randn(1, k, generator=g)
    t = x.abs().flatten().quantile(AT_SPARSITY)
    ws = [torch.randn(n, k, generator=g) for _ in range(copies)]
    w_ts = [w.t().contiguous() for w in ws]
    return ([lambda w=w: F.linear(x, w) for w in ws],
            [lambda w=w: tk.input_sparse_gemv_cpu(x, w, threshold=t) for w in w_ts])


def _neurons(hidden: int, inter: int, skips_gate: bool, g: torch.Generator) -> tuple[list, list]:
    """Dense and CPU-path calls of a gated MLP [H, I] whose neuron gate reads the gate densely
    (threshold plans) or skips its rows too (masked plans)."""
    copies = _copies([(inter, hidden)] * 3)
    x = torch.randn(1, hidden, generator=g)
    mlps = []
    for _ in range(copies):  # gate, up [I, H]; down [H, I] and input-major (its .t() copy)
        gate, up = (torch.randn(inter, hidden, generator=g) for _ in range(2))
        down = torch.randn(hidden, inter, generator=g)
        mlps.append((gate, up, down.t().contiguous(), down))
    mask = torch.rand(1, inter, generator=g) >= AT_SPARSITY
    act = F.silu(x @ mlps[0][0].t())
    t = act.abs().flatten().quantile(AT_SPARSITY)

    def dense(gate, up, down):
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)

    def sparse(gate, up, down_t):
        if skips_gate:
            return tk.sparse_gated_mlp_cpu(x, gate, up, down_t, mask=mask)
        return tk.sparse_gated_mlp_cpu(x, gate, up, down_t, threshold=t)
    return ([lambda m=m: dense(m[0], m[1], m[3]) for m in mlps],
            [lambda m=m: sparse(m[0], m[1], m[2]) for m in mlps])


def pays(kind: str, shape: tuple[int, int]) -> bool:
    """Whether the CPU decode path is faster than dense, fp32, at this thread count.

    Args:
        kind: "input" (an input-sparse projection, ``shape`` = nn.Linear's [out, in]),
            "neurons" (a gated MLP whose gate reads the gate densely, ``shape`` = [H, I]) or
            "neurons_masked" (one that skips gate rows too).
    """
    key = (kind, tuple(shape), torch.get_num_threads())
    if key not in _CHOICES:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            if kind == "input":
                dense, sparse = _input_sparse(shape[0], shape[1], g)
            else:
                dense, sparse = _neurons(shape[0], shape[1], kind == "neurons_masked", g)
            _seconds(dense[:2] + sparse[:2])  # warm-up (allocations, thread pool)
            _CHOICES[key] = _seconds(sparse) < _seconds(dense)
    return _CHOICES[key]


def choices() -> dict[tuple, bool]:
    """Every choice made in this process: (kind, shape, threads) -> CPU path faster."""
    return dict(_CHOICES)
