"""Streaming log-spaced histograms of magnitudes, pooled or per channel.

Thresholds are quantiles of activation magnitudes that span many decades, so bins are spaced
evenly in log10 between ``LO`` and ``HI``; bin 0 holds everything below ``LO`` (exact zeros
included) and the last bin everything above ``HI``. A histogram is a plain count tensor
[rows, bins + 2] so it stores in safetensors and sums across batches and processes.
"""
from __future__ import annotations

import math

import torch

LO = 1e-6
HI = 1e4
POOLED_BINS = 4096  # 0.56% relative width: per-layer thresholds land within 0.1 point
CHANNEL_BINS = 256  # 9.4% relative width, interpolated; memory is rows * 258 * 4 bytes


def new_histogram(rows: int, bins: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Empty counts [rows, bins + 2]; int64 when pooled (can pass 2**31), int32 per channel."""
    dtype = torch.int64 if rows == 1 else torch.int32
    return torch.zeros(rows, bins + 2, dtype=dtype, device=device)


def _bin_index(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin of each magnitude: 0 below LO, 1..bins inside, bins + 1 above HI."""
    scale = bins / math.log10(HI / LO)
    pos = (torch.log10(values.float().clamp_min(LO * 0.5)) - math.log10(LO)) * scale
    return (pos.floor() + 1).clamp_(0, bins + 1).long()


def update_histogram(hist: torch.Tensor, values: torch.Tensor) -> None:
    """Add magnitudes ``values`` [..., C] to ``hist`` in place.

    ``hist`` with one row pools every value; with C rows, column c of ``values`` counts in
    row c (a per-channel histogram).
    """
    rows, width = hist.shape
    bins = width - 2
    idx = _bin_index(values.detach().abs(), bins)
    if rows == 1:
        counts = torch.bincount(idx.flatten(), minlength=width)
    else:
        if values.shape[-1] != rows:
            raise ValueError(f"per-channel histogram has {rows} rows, values have "
                             f"{values.shape[-1]} channels")
        offset = torch.arange(rows, device=idx.device) * width
        counts = torch.bincount((idx.reshape(-1, rows) + offset).flatten(),
                                minlength=rows * width).view(rows, width)
    hist += counts.to(hist.dtype)


def _edges(bins: int, device: torch.device) -> torch.Tensor:
    """log10 of the bin edges [bins + 1]: edge j is the lower edge of bin j + 1."""
    return torch.linspace(math.log10(LO), math.log10(HI), bins + 1, device=device,
                          dtype=torch.float64)


def quantile(hist: torch.Tensor, q: float | torch.Tensor) -> torch.Tensor:
    """Per-row value t with a fraction ``q`` of the counted magnitudes <= t.

    Interpolates geometrically inside the bin where the cumulative fraction crosses ``q``.
    q = 0 gives 0 (only exact zeros fall under a strict ``> t`` test).

    Returns:
        float32 [rows].
    """
    counts = hist.double()
    rows, width = counts.shape
    bins = width - 2
    total = counts.sum(-1, keepdim=True).clamp_min(1)
    cdf = counts.cumsum(-1) / total  # cdf[j]: fraction in bins 0..j
    q = torch.as_tensor(q, dtype=torch.float64, device=counts.device).expand(rows, 1)
    # First bin whose cumulative fraction reaches q.
    j = torch.searchsorted(cdf, q.contiguous()).clamp_(max=width - 1)
    prev = torch.where(j > 0, cdf.gather(-1, (j - 1).clamp_min(0)), torch.zeros_like(q))
    here = cdf.gather(-1, j)
    frac = ((q - prev) / (here - prev).clamp_min(1e-300)).clamp_(0, 1)
    edges = _edges(bins, counts.device)
    lo_edge = edges[(j - 1).clamp(0, bins)]
    hi_edge = edges[j.clamp(max=bins)]
    value = torch.pow(10.0, lo_edge + frac * (hi_edge - lo_edge))
    value = torch.where(j == 0, torch.zeros_like(value), value)  # underflow bin: zeros
    value = torch.where(j == width - 1, torch.full_like(value, HI), value)
    value = torch.where(q <= 0, torch.zeros_like(value), value)
    return value.squeeze(-1).float()


def cdf_at(hist: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-row fraction of magnitudes <= t (t [rows]), interpolated like ``quantile``.

    Returns:
        float64 [rows].
    """
    counts = hist.double()
    rows, width = counts.shape
    bins = width - 2
    total = counts.sum(-1).clamp_min(1)
    cdf = counts.cumsum(-1) / total[:, None]
    logt = torch.log10(t.double().clamp_min(1e-300))
    scale = bins / math.log10(HI / LO)
    pos = (logt - math.log10(LO)) * scale  # in [0, bins] inside the range
    j = (pos.floor() + 1).clamp(1, bins).long()  # the bin containing t
    frac = (pos - (j - 1)).clamp(0, 1)
    below = cdf.gather(-1, (j - 1)[:, None]).squeeze(-1)
    inside = counts.gather(-1, j[:, None]).squeeze(-1) / total
    out = below + frac * inside
    out = torch.where(pos < 0, cdf[:, 0], out)
    return torch.where(pos >= bins, cdf[:, bins], out)

