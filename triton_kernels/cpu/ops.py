"""The CPU decode path of the sparse ops: one compiled call per product (``ops.cpp``).

Same semantics as the references (``|x| > threshold`` strict, in float32, or a mask), reading
only the weight rows of active inputs or neurons; several sequences share each row they need
(read once for all of them). ``counts``, where given, is a site's int64 [2] CPU tensor
[active, total] that the op increments in place by the entries it tested (the sparsity
report's counters, kept without a tensor op per call). Activations are computed in float32 and returned in x's dtype;
weights may be float32, bfloat16 or float16. Unchecked beyond what the C code would misread
(the sparse modules call these with shapes they built): weight rows must be contiguous.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .build import load

_WDTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ACT = {"silu": 0, "gelu_tanh": 1}
#: Stands in for an absent threshold or mask (never read).
_NULL = 0


def _wdtype(*ws: torch.Tensor) -> int:
    code = _WDTYPE.get(ws[0].dtype)
    for w in ws:
        if w.dtype != ws[0].dtype or code is None:
            raise TypeError(f"CPU decode ops take float32/bfloat16/float16 weights of one "
                            f"dtype, got {sorted({str(w.dtype) for w in ws})}")
        if w.stride(-1) != 1 or w.device.type != "cpu":
            raise ValueError(f"CPU decode ops need CPU weights with contiguous rows, got "
                             f"strides {tuple(w.stride())} on {w.device}")
    return code


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as contiguous float32, without a copy when it already is (the decode-step case)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def _gate(threshold: Optional[torch.Tensor], mask: Optional[torch.Tensor], batch: int,
          width: int) -> tuple[int, int, int, int, torch.Tensor]:
    """(thr pointer, thr_len, mask pointer, mask_rows, the tensor to keep alive) of a call:
    the mask when given, else the threshold."""
    if mask is None:
        t = _f32(threshold)
        return t.data_ptr(), t.numel(), _NULL, 0, t
    m = mask.reshape(-1, width).contiguous()
    if m.dtype != torch.bool:
        m = m != 0
    rows = m.shape[0]
    if rows not in (1, batch):
        raise ValueError(f"mask of {rows} rows for a batch of {batch}")
    return _NULL, 0, m.data_ptr(), rows, m


def _counts_ptr(counts: Optional[torch.Tensor]) -> int:
    if counts is None:
        return _NULL
    if counts.dtype != torch.int64 or counts.shape != (2,) or counts.device.type != "cpu":
        raise ValueError(f"counts must be an int64 [2] CPU tensor, got {counts.dtype} "
                         f"{tuple(counts.shape)} on {counts.device}")
    return counts.data_ptr()


def _out(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return y if like.dtype == torch.float32 else y.to(like.dtype)


def input_sparse_gemv_cpu(x: torch.Tensor, w_t: torch.Tensor,
                          threshold: Optional[torch.Tensor] = None,
                          mask: Optional[torch.Tensor] = None,
                          counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [B, K], w_t [K, N] (input-major) -> y [B, N] = x_active @ w_t, in x's dtype."""
    return input_sparse_gemv_grouped_cpu(x, [w_t], [threshold], mask, [counts])


def input_sparse_gemv_grouped_cpu(x: torch.Tensor, w_ts: Sequence[torch.Tensor],
                                  thresholds: Sequence[Optional[torch.Tensor]],
                                  mask: Optional[torch.Tensor] = None,
                                  counts: Optional[Sequence[Optional[torch.Tensor]]] = None
                                  ) -> torch.Tensor:
    """x [B, K], one w_t [K, N_g], threshold and counts per weight -> [B, sum N_g] (weights
    that read the same input, such as q/k/v: one output tensor, no concatenation)."""
    # The hot path of a CPU decode step (a few calls per layer): kept to few tensor ops.
    lib = load()
    b, k = x.shape
    xf = _f32(x)
    wdtype = _wdtype(*w_ts)
    total = sum(w.shape[1] for w in w_ts)
    y = torch.empty(b, total, dtype=torch.float32)
    col, threads, xp, yp = 0, torch.get_num_threads(), xf.data_ptr(), y.data_ptr()
    shared = _gate(None, mask, b, k) if mask is not None else None  # one mask for every weight
    for j, (w_t, t) in enumerate(zip(w_ts, thresholds)):
        thr, thr_len, m, mask_rows, _keep = shared or _gate(t, None, b, k)
        n = w_t.shape[1]
        lib.sfn_input_sparse(b, k, n, xp, w_t.data_ptr(), w_t.stride(0), wdtype, thr, thr_len,
                             m, mask_rows, yp + 4 * col, total,
                             _counts_ptr(counts[j]) if counts else _NULL, threads)
        col += n
    return _out(y, x)


def output_sparse_gemv_cpu(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, K], w [N, K] (out-major), mask bool [B or 1, N] -> y [B, N], exact zeros off mask."""
    lib = load()
    b, k = x.shape
    xf = _f32(x)
    _, _, m, mask_rows, _keep = _gate(None, mask, b, w.shape[0])
    y = torch.empty(b, w.shape[0], dtype=torch.float32)
    lib.sfn_output_sparse(b, k, w.shape[0], xf.data_ptr(), w.data_ptr(), w.stride(0),
                          _wdtype(w), m, mask_rows, y.data_ptr(), torch.get_num_threads())
    return _out(y, x)


def sparse_gated_mlp_cpu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                         w_down_t: torch.Tensor, threshold: Optional[torch.Tensor] = None,
                         mask: Optional[torch.Tensor] = None, activation: str = "silu",
                         counts: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated MLP over active neurons in one call: (y [B, H], active bool [B, I]).

    x [B, H]; w_gate, w_up [I, H]; w_down_t [I, H] (down_proj.weight transposed, rows
    contiguous). With ``threshold``, neuron i is active where |act(gate_i(x))| > threshold
    (every gate row is read, and the up and down rows of active neurons); with ``mask``
    [B or 1, I], only the masked neurons' gate, up and down rows are read. ``counts`` counts
    the active neurons.
    """
    lib = load()
    b, h = x.shape
    i = w_gate.shape[0]
    xf = _f32(x)
    thr, thr_len, m, mask_rows, _keep = _gate(threshold, mask, b, i)
    y = torch.empty(b, h, dtype=torch.float32)
    active = torch.empty(b, i, dtype=torch.bool)
    lib.sfn_gated_mlp(b, h, i, xf.data_ptr(), w_gate.data_ptr(), w_up.data_ptr(),
                      w_down_t.data_ptr(), _wdtype(w_gate, w_up, w_down_t), thr, thr_len, m,
                      mask_rows, _ACT[activation], y.data_ptr(), active.data_ptr(),
                      _counts_ptr(counts), torch.get_num_threads())
    return _out(y, x), active
