"""Persistent fp32 accumulators for the input-sparse GEMV's split-K sums.

A launch whose K ranges are split over several programs adds their fp32 partials atomically into
a zeroed [B, N] buffer and then converts it to y. Allocating that buffer per call costs a fill
kernel and the conversion a second one: two extra graph nodes around every GEMV, and a decode
step makes hundreds of GEMV calls (224 for Llama-3-8B under TEAL). Here the buffer is allocated
once, zeroed once, and the finishing kernel converts it to y *and zeroes it again*, so the next
call finds it zeroed: one extra node, not two.

Rules that keep it correct:
- One buffer per (device, number of elements); every call with that size uses it, so calls on
  one device must be ordered on one stream (as a decode step is). Concurrent calls on two streams
  of one device would add into the same buffer: they are not supported.
- A buffer is never freed or replaced: a captured CUDA graph keeps its address.
- Never allocated while a CUDA graph is captured, nor from a graph memory pool. Cudagraph trees
  (``torch.compile(mode="reduce-overhead")``) route every allocation of the *thread* that runs
  their warm-up into their pool and fail on pool tensors they do not track ("Detected 3
  tensor(s) in the cudagraph pool not tracked as outputs", also when allocated from a side
  stream of the same thread); so a CUDA buffer is allocated and zeroed on a short-lived helper
  thread, outside any pool. A call that finds no buffer during a capture uses a temporary one.
- If the GEMV launch raises, the buffer is zeroed again before the error propagates.
"""
from __future__ import annotations

import threading

import torch

_BUFFERS: dict[tuple[str, int], torch.Tensor] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def persistent(numel: int, device: torch.device) -> torch.Tensor | None:
    """The zeroed fp32 buffer of ``numel`` elements for ``device``, or None where there is none
    and none may be made now (a CUDA graph being captured)."""
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0": one buffer
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), numel)
    buf = _BUFFERS.get(key)
    if buf is not None or _capturing(device):
        return buf
    buf = _zeros_outside_pools(numel, device)
    _BUFFERS[key] = buf
    return buf


def _zeros_outside_pools(numel: int, device: torch.device) -> torch.Tensor:
    """fp32 zeros [numel], on CUDA allocated and zeroed by another thread (see module doc)."""
    if device.type != "cuda":
        return torch.zeros(numel, dtype=torch.float32, device=device)
    box: dict = {}

    def work() -> None:
        try:
            with torch.cuda.device(device):
                box["buf"] = torch.zeros(numel, dtype=torch.float32, device=device)
                torch.cuda.synchronize(device)  # zeroed before any stream of the caller uses it
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            box["err"] = err

    worker = threading.Thread(target=work, name="sparseffn-accumulator")
    worker.start()
    worker.join()
    if "err" in box:
        raise box["err"]
    return box["buf"]


def allocated() -> dict[tuple[str, int], int]:
    """(device, elements) -> bytes of every persistent buffer (memory reports, tests)."""
    return {key: buf.numel() * buf.element_size() for key, buf in _BUFFERS.items()}
