"""Schedules for a regularizer's factor: how strongly it pulls at each optimizer step.

``ProgressiveSchedule`` is the ProSparse recipe: a warm-up at factor 0 (the model first
recovers from any activation substitution), then stages in which the factor rises from the
previous stage's peak to the next along a quarter sine, so it climbs fast early in a stage and
levels off before the next one; after the last stage it holds its final value.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

from sparseffn.finetune.errors import FinetuneError


class Schedule(ABC):
    """Factor as a function of the optimizer step (0-based)."""

    @abstractmethod
    def __call__(self, step: int) -> float:
        """The factor at ``step``."""

    @property
    @abstractmethod
    def end(self) -> int:
        """First step from which the factor no longer changes."""


def _check_factor(value: float, what: str) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise FinetuneError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_step(value: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FinetuneError(f"{what} must be a step number >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class ConstantSchedule(Schedule):
    """``factor`` from ``start`` on, 0 before."""

    factor: float
    start: int = 0

    def __post_init__(self) -> None:
        _check_factor(self.factor, "the factor")
        _check_step(self.start, "the start step")

    def __call__(self, step: int) -> float:
        return self.factor if step >= self.start else 0.0

    @property
    def end(self) -> int:
        return self.start


@dataclass(frozen=True)
class LinearSchedule(Schedule):
    """0 until ``start``, rising linearly to ``factor`` at ``stop``, then constant."""

    factor: float
    start: int
    stop: int

    def __post_init__(self) -> None:
        _check_factor(self.factor, "the factor")
        _check_step(self.start, "the start step")
        _check_step(self.stop, "the stop step")
        if self.stop <= self.start:
            raise FinetuneError(
                f"the schedule ends (step {self.stop}) before it starts (step {self.start}); "
                "pass stop > start"
            )

    def __call__(self, step: int) -> float:
        if step < self.start:
            return 0.0
        return self.factor * min(1.0, (step - self.start) / (self.stop - self.start))

    @property
    def end(self) -> int:
        return self.stop


@dataclass(frozen=True)
class ProgressiveSchedule(Schedule):
    """ProSparse-style: ``warmup`` steps at 0, then sine-shaped stages.

    Attributes:
        warmup: steps at factor 0.
        stages: ``(end_step, peak)`` pairs with increasing end steps, all after ``warmup``; in
            the stage that ends at ``end_step`` the factor rises from the previous peak (0 for
            the first stage) to ``peak`` as ``prev + (peak - prev) * sin(pi/2 * progress)``.
    """

    warmup: int
    stages: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        _check_step(self.warmup, "the warm-up length")
        stages = tuple((int(_check_step(e, "a stage end")), _check_factor(f, "a stage peak"))
                       for e, f in self._as_pairs(self.stages))
        if not stages:
            raise FinetuneError("a progressive schedule needs at least one (end_step, peak) stage")
        start = self.warmup
        for end, _ in stages:
            if end <= start:
                raise FinetuneError(
                    f"a schedule stage ends at step {end}, before it starts at step {start} "
                    f"(warm-up {self.warmup}, stages {list(stages)}); stage ends must increase "
                    "and come after the warm-up"
                )
            start = end
        object.__setattr__(self, "stages", stages)

    @staticmethod
    def _as_pairs(stages: Sequence) -> list[tuple[int, float]]:
        try:
            return [(e, f) for e, f in stages]
        except (TypeError, ValueError) as exc:
            raise FinetuneError(
                f"stages must be (end_step, peak) pairs, got {stages!r}") from exc

    @classmethod
    def even(cls, warmup: int, total: int, peaks: Sequence[float]) -> "ProgressiveSchedule":
        """Stages of equal length from ``warmup`` to ``total`` reaching ``peaks`` in turn."""
        if total <= warmup:
            raise FinetuneError(
                f"the schedule ends (step {total}) before it starts (warm-up {warmup}); "
                "give more steps than warm-up steps"
            )
        n = len(peaks)
        ends = [warmup + round((total - warmup) * (k + 1) / n) for k in range(n)]
        return cls(warmup, tuple(zip(ends, peaks)))

    def __call__(self, step: int) -> float:
        start, previous = self.warmup, 0.0
        if step < start:
            return 0.0
        for end, peak in self.stages:
            if step < end:
                progress = (step - start) / (end - start)
                return previous + (peak - previous) * math.sin(0.5 * math.pi * progress)
            start, previous = end, peak
        return previous

    @property
    def end(self) -> int:
        return self.stages[-1][0]
