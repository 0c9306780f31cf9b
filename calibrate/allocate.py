"""How a sparsity target is spread: among the sites of one block, and across layers.

TEAL-style greedy allocation among the sites of one block:
Sites differ in how much their sparsity hurts: starting from zero, raise by one step the site
whose increase adds the least output error per weight byte skipped, until the bytes-weighted
mean sparsity reaches the block's target. The error function is the caller's (``sparseffn``
runs the real patched decoder layer on captured calibration inputs, so attention, norms and
residuals are all included).

Across layers (``layer_levels``): the first and last decoder layers of a model are many times
more sensitive to sparsity than the middle ones (SmolLM2: 10-40x in perplexity), so a uniform
level wastes quality there; levels move against each layer's measured sensitivity, the mean
held at the target.
"""
from __future__ import annotations

import math
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


#: The spreads tried for ``layer_levels`` (0: uniform); the caller keeps the one whose
#: calibration-text loss is lowest.
LAYER_ALPHAS = (0.0, 0.03, 0.06, 0.1, 0.15)


def layer_levels(sensitivity: list[float], target: float, alpha: float,
                 cap: float = MAX_SITE_SPARSITY) -> list[float]:
    """Per-layer sparsity levels with mean ``target``, lower where a layer is more sensitive.

    Level i starts at ``target + alpha * (mean_j log s_j - log s_i)`` (``s``: each layer's
    loss increase when it alone is sparsified), clipped to [0, ``cap``]; the levels are then
    shifted together until their mean is ``target`` again (decoder layers of one model have
    equal sizes, so the plain mean is the bytes-weighted one).
    """
    logs = [math.log(max(s, 1e-6)) for s in sensitivity]
    mean = sum(logs) / len(logs)
    levels = [target + alpha * (mean - v) for v in logs]
    for _ in range(20):  # clipping moves the mean: shift back until it holds
        levels = [min(cap, max(0.0, v)) for v in levels]
        gap = target - sum(levels) / len(levels)
        if abs(gap) < 1e-6:
            break
        levels = [v + gap for v in levels]
    return [min(cap, max(0.0, v)) for v in levels]
