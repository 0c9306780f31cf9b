"""TEAL-style greedy allocation of sparsity among the sites of one block.

Sites differ in how much their sparsity hurts: starting from zero, raise by one step the site
whose increase adds the least output error per weight byte skipped, until the bytes-weighted
mean sparsity reaches the block's target. The error function is the caller's (``sparseffn``
runs the real patched decoder layer on captured calibration inputs, so attention, norms and
residuals are all included).
"""
from __future__ import annotations

from typing import Callable

MAX_SITE_SPARSITY = 0.95


def greedy_levels(sizes: dict[str, int], target: float, step: float,
                  error_at: Callable[[dict[str, float]], float]) -> dict[str, float]:
    """Per-site sparsity levels whose bytes-weighted mean reaches ``target``.

    Args:
        sizes: weight elements each site covers (its bytes, up to the dtype).
        target: the block's sparsity target in [0, 1).
        step: the sparsity increment tried per site and round.
        error_at: relative output error of the block with the sites at the given levels.

    Returns:
        ``{site: level}``; every level at most ``MAX_SITE_SPARSITY``. If every site reaches
        the cap first, the target is not met and the capped levels are returned.
    """
    total = sum(sizes.values())
    goal = target * total
    level = dict.fromkeys(sizes, 0.0)
    current = 0.0
    while sum(level[s] * sizes[s] for s in sizes) < goal - 1e-9:
        best = None
        needed = goal - sum(level[s] * sizes[s] for s in sizes)
        for s in sizes:
            if level[s] >= MAX_SITE_SPARSITY:
                continue
            inc = min(step, MAX_SITE_SPARSITY - level[s], needed / sizes[s])
            err = error_at({**level, s: level[s] + inc})
            cost = (err - current) / (inc * sizes[s])
            if best is None or cost < best[0]:
                best = (cost, s, inc, err)
        if best is None:  # every site at its cap: the target is out of reach
            break
        _, s, inc, current = best
        level[s] += inc
    return level
