"""Observe activations through watched modules and accumulate streaming statistics.

Calibration runs on a model whose sparse modules are *observable*: each has an ``observe``
attribute (None, or a callback ``(signal, value)``) through which it reports the quantities it
gates, before its mask, and a ``track`` flag for its sparsity counters. What a signal means is
the caller's business (``sparseffn`` names them ``attn_in``, ``o_in``, ``mlp_in``, ``act``,
``up``, ``down_in``); this module only accumulates the statistics asked for. Nothing is kept
per token: each batch updates count histograms and channel sums on the signal's own device (so
``device_map``-split models work); results move to the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from calibrate.errors import CalibrationError
from calibrate.histogram import CHANNEL_BINS, POOLED_BINS, new_histogram, update_histogram
from calibrate.rotation import block_moment

#: Statistic kinds: a pooled histogram of magnitudes, one histogram per channel, the mean
#: magnitude per channel, or the second moment of each block of consecutive channels
#: (``calibrate.rotation``; of the signal itself, not its magnitude).
STAT_KINDS = ("hist", "hist_channel", "mean_channel", "block_moment")


@dataclass(frozen=True)
class StatSpec:
    """One statistic collected per layer.

    Attributes:
        key: name of the statistic in the calibration artifact.
        signal: which reported signal it reads.
        kind: one of ``STAT_KINDS``.
        scale_by: a weight whose column norms multiply the signal first (WINA); the caller
            passes the norms to ``LayerObserver`` under this spec's key.
        block: channels per block of a ``block_moment``.
    """

    key: str
    signal: str
    kind: str
    scale_by: str | None = None
    block: int = 0

    def __post_init__(self) -> None:
        if self.kind not in STAT_KINDS:
            raise ValueError(f"StatSpec {self.key!r}: kind must be one of {STAT_KINDS}, "
                             f"got {self.kind!r}")
        if (self.kind == "block_moment") != (self.block > 0):
            raise ValueError(f"StatSpec {self.key!r}: a block size goes with kind "
                             f"'block_moment' and only with it (got block={self.block})")

    @property
    def bins(self) -> int:
        return POOLED_BINS if self.kind == "hist" else CHANNEL_BINS


class Observable(Protocol):
    """A module that reports its signals to ``observe`` and counts when ``track`` is on."""

    observe: Callable[[str, torch.Tensor], None] | None
    track: bool


class LayerObserver:
    """Accumulates one decoder layer's statistics from the signals its modules report.

    Args:
        layer_idx: decoder layer index (prefix of the output keys).
        specs: the statistics to collect.
        scales: for each spec with ``scale_by``, float32 column norms [C] on the layer's device.
        device: where the accumulators live.
    """

    def __init__(self, layer_idx: int, specs: tuple[StatSpec, ...],
                 scales: dict[str, torch.Tensor], device: torch.device) -> None:
        missing = [s.key for s in specs if s.scale_by is not None and s.key not in scales]
        if missing:
            raise ValueError(f"no column norms given for the scaled statistics {missing}")
        self.idx = layer_idx
        self.specs = specs
        self.scales = scales
        self.stats: dict[str, torch.Tensor] = {}
        self.counts = {s.key: torch.zeros((), dtype=torch.float64, device=device)
                       for s in specs if s.kind in ("mean_channel", "block_moment")}
        self.signals = {s.signal for s in specs}
        self.nan = torch.zeros((), dtype=torch.bool, device=device)

    def report(self, signal: str, value: torch.Tensor) -> None:
        """Add one signal [..., C] to every statistic that reads it (others are ignored)."""
        if signal not in self.signals:
            return
        value = value.detach().reshape(-1, value.shape[-1])
        for s in self.specs:
            if s.signal == signal and s.kind == "block_moment":
                if value.shape[-1] % s.block:
                    raise CalibrationError(f"statistic {s.key!r}: blocks of {s.block} do not "
                                           f"tile {value.shape[-1]} channels")
                total = block_moment(value, s.block)
                self.stats[s.key] = self.stats[s.key] + total if s.key in self.stats else total
                self.counts[s.key] += value.shape[0]
        value = value.abs()
        # A NaN or inf anywhere makes the sum non-finite; far cheaper than isfinite().all().
        self.nan |= ~torch.isfinite(value.sum(dtype=torch.float32))
        for s in self.specs:
            if s.signal != signal or s.kind == "block_moment":
                continue
            if s.kind == "mean_channel":
                total = value.double().sum(0)
                self.stats[s.key] = self.stats[s.key] + total if s.key in self.stats else total
                self.counts[s.key] += value.shape[0]
                continue
            scaled = value.float() * self.scales[s.key] if s.scale_by is not None else value
            if s.key not in self.stats:
                rows = 1 if s.kind == "hist" else value.shape[-1]
                self.stats[s.key] = new_histogram(rows, s.bins, device=value.device)
            update_histogram(self.stats[s.key], scaled)

    def finish(self) -> dict[str, torch.Tensor]:
        """CPU statistics with layer-prefixed keys, plus ``colnorm.{scale_by}`` of scaled ones."""
        if bool(self.nan):
            raise CalibrationError(
                f"non-finite activations in decoder layer {self.idx} during calibration; the "
                "model overflows in this dtype (load it in float32 or bfloat16) or its weights "
                "hold NaN/inf"
            )
        out = {}
        for key, value in self.stats.items():
            if key in self.counts:
                value = value / self.counts[key].clamp_min(1)
            out[f"layers.{self.idx}.{key}"] = value.cpu()
        for s in self.specs:
            if s.scale_by is not None:
                out[f"layers.{self.idx}.colnorm.{s.scale_by}"] = self.scales[s.key].cpu()
        return out


@torch.no_grad()
def run_observed(model: nn.Module, callbacks: list[tuple[Observable, Callable]],
                 windows: torch.Tensor, batch_size: int, progress: bool, desc: str) -> None:
    """Run ``windows`` [N, L] of token ids through ``model`` with each module's ``observe`` set
    to its callback and counting off (calibration passes are not measurements); both are
    restored afterwards, also on error."""
    try:
        for module, callback in callbacks:
            module.observe = callback
            module.track = False
        device = model.get_input_embeddings().weight.device
        # The decoder without its LM head: no observer looks at logits, and on a small model
        # the head is a large share of the work (SmolLM2-135M: 49152 x 576, about a fifth of
        # the FLOPs of a calibration pass).
        body = getattr(model, "base_model", model)
        for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch",
                          disable=not progress):
            body(input_ids=batch.to(device), use_cache=False)
    finally:
        for module, _ in callbacks:
            module.observe = None
            module.track = True
