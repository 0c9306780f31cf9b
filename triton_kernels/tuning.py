"""Launch configs and the tuner that picks one per (op, batch, shape, dtype, device).

The tuner replaces ``triton.autotune`` on purpose. ``triton.autotune`` times its configs on
whatever inputs the first call brings, so a first call at 95% sparsity picks a config that is fast
when almost nothing is loaded and slow when everything is (TEAL's kernel drops to 0.97x at 60% that
way). Ours times every candidate on synthetic inputs at sparsities 0, 0.5 and 0.9 of the real
weights and keeps the candidate whose worst ratio to the per-sparsity best is smallest. The cache
key is (op, batch, shape, dtype, device): a new sparsity value never re-tunes. SPARSEFFN_TUNE=0
turns tuning off (every launch then uses the first, untuned candidate).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .common import INTERPRET

#: Sparsities every tuning candidate is timed at (union sparsity of the rows loaded).
TUNE_SPARSITIES = (0.0, 0.5, 0.9)

#: Timing rounds per candidate and sparsity (the fastest counts): with one round, near-equal
#: candidates swapped places between processes.
TUNE_ROUNDS = 3


@dataclass(frozen=True)
class LaunchConfig:
    """Tile shape of one launch.

    ``rows``: weight rows per tile (rows of the dim that is skipped); ``cols``: contiguous
    elements per row per tile; ``span``: input-sparse only, the rows of K one program owns and
    compacts to its active ones (several K ranges add their fp32 partials atomically);
    ``prefetch``: load the next tile before multiplying the current one (two tiles in flight
    per program, at twice the registers); ``fma``: batch > 1 summed with fp32 FMAs in registers,
    the batch padded to a power of two, instead of tensor-core dots over a batch padded to 16.
    """

    rows: int
    cols: int
    span: int = 0
    num_warps: int = 4
    prefetch: bool = False
    fma: bool = False

    def block_b(self, batch: int) -> int:
        """Sequences per program: batch 1 and FMA configs multiply elementwise (the batch padded
        to a power of two), other configs use tl.dot over a batch padded to 16."""
        return 1 if batch == 1 else 1 << (batch - 1).bit_length() if self.fma else 16


_TUNED: dict[tuple, LaunchConfig] = {}
_TUNE_LOG: list[dict] = []


def tuning_enabled(device: torch.device) -> bool:
    """Tune on CUDA unless SPARSEFFN_TUNE=0 or a CUDA graph is being captured (timing would
    synchronize inside the capture); the first candidate is the untuned default."""
    if device.type != "cuda" or INTERPRET or os.environ.get("SPARSEFFN_TUNE", "1") == "0":
        return False
    return not torch.cuda.is_current_stream_capturing()


def tuned_config(key: tuple, candidates: Sequence[LaunchConfig],
                 make_bench: Callable[[float], Callable[[LaunchConfig], None]],
                 device: torch.device) -> LaunchConfig:
    """Return the cached config for ``key``, tuning it first if allowed (see module docstring).

    ``make_bench(sparsity)`` builds synthetic inputs at that union sparsity and returns a function
    that runs the op once with a given config.
    """
    if key in _TUNED:
        return _TUNED[key]
    if len(candidates) == 1 or not tuning_enabled(device):
        return candidates[0]
    times: dict = {}
    for s in TUNE_SPARSITIES:
        run = make_bench(s)
        # Rounds over all candidates, keeping each one's best: a slow outlier of one timing
        # (another process, clocks) then costs no candidate its place.
        for _ in range(TUNE_ROUNDS):
            for cfg in candidates:
                t = time_on_device(lambda: run(cfg))
                times[(cfg, s)] = min(t, times.get((cfg, s), t))
    best = {s: min(times[(c, s)] for c in candidates) for s in TUNE_SPARSITIES}
    score = {c: max(times[(c, s)] / best[s] for s in TUNE_SPARSITIES) for c in candidates}
    chosen = min(candidates, key=lambda c: score[c])
    _TUNED[key] = chosen
    _TUNE_LOG.append({"key": key, "chosen": chosen, "score": score[chosen],
                      "times_us": {f"{c}@{s}": 1e3 * t for (c, s), t in times.items()}})
    return chosen


def time_on_device(fn: Callable[[], None]) -> float:
    """Median milliseconds of one call, replayed from a CUDA graph with L2 flushed before each.

    Timing the Python call itself (plain ``do_bench``) measures the host's launch overhead and
    allocations instead of the GPU; a graph replay costs the host a few microseconds, which the
    flush hides.
    """
    from triton.testing import do_bench

    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = do_bench(graph.replay, warmup=2, rep=10, return_mode="median")
    del graph
    return ms


def tuning_log() -> list[dict]:
    """Every tuning decision made in this process (key, chosen config, timings); for benchmarks."""
    return list(_TUNE_LOG)
