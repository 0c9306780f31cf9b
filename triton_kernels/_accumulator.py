"""Persistent fp32 accumulators for the input-sparse GEMV's split-K sums.

A launch whose K ranges are split over several programs adds their fp32 partials atomically into
a zeroed [B, N] buffer and then converts it to y. Allocating that buffer per call costs a fill
kernel and the conversion a second one: two extra graph nodes around every GEMV, which inside a
decode step (224 input-sparse calls for Llama-3-8B under TEAL) added about 460 us per step on the
H200 (docs/e2e.md). Here the buffer is allocated once, zeroed once, and ``finish`` converts it to
y *and zeroes it again* in one kernel, so the next call finds it zeroed: one extra node, not two.

Rules that keep it correct:
- One buffer per (device, number of elements); every call with that size uses it, so calls on
  one device must be ordered on one stream (as a decode step is). Concurrent calls on two streams
  of one device would add into the same buffer: they are not supported.
- A buffer is never freed or replaced: a captured CUDA graph keeps its address.
- Never allocated while a CUDA graph is captured, nor from a graph memory pool: on CUDA it is
  allocated on a private side stream, which ``torch.compile``'s cudagraph trees do not route
  into their pool (a pool block can be handed to another graph's tensors when the trees roll
  their pool state back). A call that finds no buffer during capture uses a temporary one.
- If the GEMV launch raises, the buffer is zeroed again before the error propagates.
"""
from __future__ import annotations

import os

import torch

#: SPARSEFFN_PERSISTENT_ACC=0 turns the persistent buffers off (a temporary zeroed buffer and a
#: cast per call, the earlier scheme): for A/B benchmarks of the two.
ENABLED = os.environ.get("SPARSEFFN_PERSISTENT_ACC", "1") != "0"

_BUFFERS: dict[tuple[str, int], torch.Tensor] = {}
_SIDE_STREAMS: dict[str, torch.cuda.Stream] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def persistent(numel: int, device: torch.device) -> torch.Tensor | None:
    """The zeroed fp32 buffer of ``numel`` elements for ``device``, or None where there is none
    and none may be made now (persistent buffers off, or a CUDA graph being captured)."""
    if not ENABLED:
        return None
    key = (str(device), numel)
    buf = _BUFFERS.get(key)
    if buf is not None or _capturing(device):
        return buf
    if device.type == "cuda":
        stream = _SIDE_STREAMS.setdefault(str(device), torch.cuda.Stream(device))
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            buf = torch.zeros(numel, dtype=torch.float32, device=device)
        torch.cuda.current_stream(device).wait_stream(stream)
    else:
        buf = torch.zeros(numel, dtype=torch.float32, device=device)
    _BUFFERS[key] = buf
    return buf


def allocated() -> dict[tuple[str, int], int]:
    """(device, elements) -> bytes of every persistent buffer (for memory reports and tests)."""
    return {key: buf.numel() * buf.element_size() for key, buf in _BUFFERS.items()}
