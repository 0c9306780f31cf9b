"""Plumbing shared by the sparse decode ops: Triton availability, input validation, buffers.

Environment: TRITON_INTERPRET=1 (read once, at import) runs the kernels on CPU tensors through
Triton's interpreter; SPARSEFFN_TUNE=0 (``tuning``) turns tuning off. Nothing else read from the
environment changes what a kernel computes or how it is launched.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable, Optional

import torch

#: Whether Triton is installed (the kernel modules import it themselves, lazily).
HAS_TRITON = importlib.util.find_spec("triton") is not None

#: Read once at import, like Triton itself: kernels are built as interpreted functions only when
#: TRITON_INTERPRET=1 was set before ``triton.jit`` ran.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Sequences handled by one launch. Larger batches loop over chunks of this many sequences; a
#: weight row is then loaded once per chunk that needs it.
MAX_BATCH_PER_LAUNCH = 16

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether the kernels must feed ``tl.dot`` fp32 operands instead of ``dtype`` ones.

    Only under the interpreter with bf16: Triton 3.9's interpreter multiplies bf16 dot operands
    as garbage (errors of 1e10 on a 16x16 product), while fp16 and fp32 are exact there.
    """
    return INTERPRET and dtype == torch.bfloat16


def kernels_available(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on tensors of ``device``.

    CUDA needs Triton; CPU tensors need Triton in interpreter mode (TRITON_INTERPRET=1 set before
    ``triton_kernels`` was imported), which is how CI exercises the kernels.
    """
    device = torch.device(device)
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and not INTERPRET
    return device.type == "cpu" and INTERPRET


def on_input_device(fn: Callable) -> Callable:
    """Run ``fn(x, ...)`` with ``x``'s CUDA device current.

    Triton compiles for, and launches on, the *current* device, not the tensors' device. In a
    model spread over GPUs with ``device_map`` (accelerate), a layer on cuda:1 is called while
    cuda:0 is current; without this guard its kernels would run on cuda:0 with cuda:1
    pointers (an error, or silently wrong results where peer access allows the reads). The
    tuner's graph capture and timing run inside the guard too.
    """
    @functools.wraps(fn)
    def run(x: torch.Tensor, *args, **kwargs):
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)
    return run


def require_kernels(device: torch.device) -> None:
    """Raise a RuntimeError naming the fix when the Triton kernels cannot run on ``device``."""
    if not kernels_available(device):
        raise RuntimeError(
            f"the Triton kernels cannot run on {device} tensors here (HAS_TRITON={HAS_TRITON}, "
            f"TRITON_INTERPRET={int(INTERPRET)}): use a CUDA device, or set TRITON_INTERPRET=1 "
            "before importing triton_kernels to run them on the CPU through the interpreter"
        )


def check_float_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")


def check_matrix(name: str, t: torch.Tensor, rows: int, cols: int, dtype: torch.dtype,
                 device: torch.device, contiguous_rows: bool) -> None:
    """Validate a 2-D operand. ``contiguous_rows``: weights must have unit stride along dim 1."""
    if t.dim() != 2 or tuple(t.shape) != (rows, cols):
        raise ValueError(f"{name} must have shape [{rows}, {cols}], got {list(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but x has {dtype}; cast one of them")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    if contiguous_rows and cols > 1 and t.stride(1) != 1:
        raise ValueError(
            f"{name} must be contiguous along its last dimension (strides {t.stride()}): store "
            "it once with .contiguous() (for a transposed weight, weight.t().contiguous()) "
            "when the model is patched, not per call"
        )


def _broadcast_view(t: torch.Tensor, name: str, rows: int, cols: int, device: torch.device,
                    what: str, hint: str) -> torch.Tensor:
    """``t`` as a [rows, cols] view (stride 0 where it broadcasts), or a ValueError."""
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    try:
        shape = torch.broadcast_shapes(t.shape, (rows, cols))
    except RuntimeError as err:
        raise ValueError(f"{name} of shape {list(t.shape)} does not broadcast to "
                         f"[{rows}, {cols}] ({what}){hint}") from err
    if tuple(shape) != (rows, cols):
        raise ValueError(f"{name} of shape {list(t.shape)} would broadcast to {list(shape)}, "
                         f"not [{rows}, {cols}] ({what})")
    return t.expand(rows, cols)


def expand_threshold(threshold: torch.Tensor, rows: int, cols: int, device: torch.device,
                     what: str) -> torch.Tensor:
    """Return ``threshold`` as a float32 [rows, cols] view (stride 0 where it broadcasts)."""
    if not isinstance(threshold, torch.Tensor) or not threshold.is_floating_point():
        raise ValueError("threshold must be a floating-point tensor (float32 preferred)")
    hint = f": use [], [{cols}] or [{rows}, 1]"
    return _broadcast_view(threshold.to(torch.float32), "threshold", rows, cols, device, what,
                           hint)


def expand_mask(mask: torch.Tensor, rows: int, cols: int, device: torch.device,
                what: str) -> torch.Tensor:
    """Return a bool mask as a [rows, cols] view (stride 0 where it broadcasts)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError("mask must be a bool tensor")
    return _broadcast_view(mask, "mask", rows, cols, device, what, "")


def exactly_one(threshold: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> None:
    if (threshold is None) == (mask is None):
        raise ValueError("pass exactly one of threshold= and mask=")


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An internal buffer every element of which the kernels overwrite.

    NaN-filled under the interpreter (CI), so that an element a kernel fails to write poisons the
    result and fails the tests; uninitialised (no fill kernel) on the GPU.
    """
    if INTERPRET:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def output_buffer(out: Optional[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """``out`` checked against the expected shape/dtype/device, or a new empty tensor."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {list(shape)} on "
                         f"{device}; got {out.dtype} {list(out.shape)} on {out.device}")
    return out


def row_pattern(n: int, sparsity: float, device: torch.device) -> torch.Tensor:
    """Bool [n]: a random set of round((1 - sparsity) * n) active rows (at least one)."""
    n_on = max(1, round((1.0 - sparsity) * n))
    on = torch.zeros(n, dtype=torch.bool, device=device)
    on[torch.randperm(n, device=device)[:n_on]] = True
    return on
