"""What the kernel sweep measures: real model shapes, the inputs at a given sparsity, the op call,
its dense counterpart, the bytes each must read, and the reference it is checked against.

Activations are synthetic but shaped like real ones: each channel has its own magnitude (shared
by every sequence of the batch, as the outlier channels of real LLMs are) times a per-token normal
draw, and each sequence gets its own threshold at the target sparsity. A batch therefore loads the
union of its sequences' active rows; the sweep reports that union as measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import triton_kernels as tk

# Hidden and intermediate sizes; Mistral-7B has Llama-3-8B's MLP shape (4096 x 14336).
MODELS = {"llama3-8b": (4096, 14336), "mistral-7b": (4096, 14336), "qwen2.5-7b": (3584, 18944),
          "tiny": (96, 160)}  # tiny: CPU smoke runs of the sweep
# Attention widths (q, and each of k and v) for the grouped q/k/v cases.
ATTN = {"llama3-8b": (4096, 1024), "mistral-7b": (4096, 1024), "qwen2.5-7b": (3584, 512),
        "tiny": (96, 32)}
OPS = ("input_sparse", "output_sparse", "mlp_threshold", "mlp_mask")
# Weights that read one x: in one grouped launch, or as separate input-sparse calls (same run).
GROUPED_OPS = ("qkv_grouped", "qkv_separate", "gate_up_grouped", "gate_up_separate")
# What reading only the needed bytes buys the vendor library: cuBLAS (F.linear) over exactly the
# needed inputs, the weight's active columns and x's active entries compacted before the timed
# call (not timed: this "oracle" knows the active set ahead of the call). A reference, not a
# bound: cuBLAS's kernel choice for the compacted shapes varies (docs/kernels.md).
ORACLE_OPS = ("input_sparse_oracle",)
ALL_OPS = OPS + GROUPED_OPS + ORACLE_OPS
# Relative error (norm) allowed against the fp32 reference before a point is reported as wrong:
# about 8x the output rounding of each dtype.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@dataclass(frozen=True)
class Case:
    """One benchmarked problem. GEMVs map K inputs to N outputs; the MLP has hidden K, inner N."""

    op: str
    model: str
    K: int
    N: int

    @property
    def widths(self) -> tuple[int, ...]:
        """Output widths of the weights that share x (one for a plain GEMV)."""
        if self.op.startswith("qkv"):
            q, kv = ATTN[self.model]
            return (q, kv, kv)
        if self.op.startswith("gate_up"):
            return (self.N // 2, self.N // 2)
        return (self.N,)

    @property
    def label(self) -> str:
        if self.op.startswith("mlp"):
            return f"{self.op} {self.model} {self.K}x{self.N}"
        return f"{self.op} {self.model} {self.K}->{self.N}"


def cases(ops: list[str], models: list[str]) -> list[Case]:
    """GEMVs in both directions (up: hidden -> inner, down: inner -> hidden); MLPs once.

    Models with identical shapes are measured once, under the first name given."""
    out, seen = [], set()
    for model in models:
        H, I = MODELS[model]
        for op in ops:
            if op.startswith("qkv"):
                dims = [(H, ATTN[model][0] + 2 * ATTN[model][1])]
            elif op.startswith("gate_up"):
                dims = [(H, 2 * I)]
            elif op.startswith("mlp"):
                dims = [(H, I)]
            else:
                dims = [(H, I), (I, H)]
            for K, N in dims:
                if (op, K, N) not in seen:
                    seen.add((op, K, N))
                    out.append(Case(op, model, K, N))
    return out


def dense_weights(case: Case, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """The nn.Linear weights of one copy: (W [N, K],) or (gate [I, H], up [I, H], down [H, I])."""
    def w(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, device=device) / cols**0.5).to(dtype)
    if case.op.startswith("mlp"):
        return w(case.N, case.K), w(case.N, case.K), w(case.K, case.N)
    return tuple(w(n, case.K) for n in case.widths)


def reads_input_major(case: Case) -> bool:
    """Input-sparse ops (single or grouped): transposed weights, activations gated per input."""
    return case.op.startswith("input_sparse") or case.op in GROUPED_OPS


def sparse_weights(case: Case, dense: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The layouts our ops take (transposed once, as at patch time)."""
    if case.op in ORACLE_OPS:  # compacted per point by ``bind``
        return dense
    if reads_input_major(case):
        return tuple(d.t().contiguous() for d in dense)
    if case.op == "output_sparse":
        return dense
    return dense[0], dense[1], dense[2].t().contiguous()


def dense_call(case: Case, x: torch.Tensor, dense: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """What the unpatched model runs: cuBLAS through F.linear (and SiLU * up for the MLP)."""
    if case.op.startswith("mlp"):
        gate, up, down = dense
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
    if len(dense) > 1:  # as the unpatched model runs q, k, v (or gate, up): one GEMM each
        return [F.linear(x, d) for d in dense]
    return F.linear(x, dense[0])


def _token_values(batch: int, n: int, device: str) -> torch.Tensor:
    scale = torch.randn(n, device=device).abs() + 0.1
    return scale * torch.randn(batch, n, device=device)


def _per_token_threshold(values: torch.Tensor, sparsity: float) -> torch.Tensor:
    if sparsity == 0.0:
        return torch.full((values.shape[0], 1), -1.0, device=values.device)
    return torch.quantile(values.abs().float(), sparsity, dim=1, keepdim=True)


def _gap_threshold(g: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-token thresholds in the middle of the widest gap between |g| values within 1% of
    the target quantile. The kernel computes g with another fp32 summation order than the
    reference; a threshold right on a value would let that neuron flip and fail the check
    (seen once: 5e-3 relative error at sparsity 0.6, fp16)."""
    if sparsity == 0.0:
        return torch.full((g.shape[0], 1), -1.0, device=g.device)
    v = g.abs().sort(dim=1).values
    n = v.shape[1]
    q, w = round(sparsity * n), max(1, n // 100)
    lo, hi = max(1, q - w), min(n - 1, q + w)
    j = lo + (v[:, lo:hi + 1] - v[:, lo - 1:hi]).argmax(dim=1, keepdim=True)
    return (v.gather(1, j - 1) + v.gather(1, j)) / 2


@dataclass
class Point:
    """Inputs at one sparsity: x, the criterion, and the measured union of active rows."""

    x: torch.Tensor
    threshold: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    active_fraction: float


def make_point(case: Case, batch: int, sparsity: float, dtype: torch.dtype,
               weights: tuple[torch.Tensor, ...]) -> Point:
    dev = weights[0].device.type
    if reads_input_major(case):
        x = _token_values(batch, case.K, dev).to(dtype)
        thr = _per_token_threshold(x, sparsity)
        return Point(x, thr, None, (x.float().abs() > thr).any(0).float().mean().item())
    x = (torch.randn(batch, case.K, device=dev)).to(dtype)
    if case.op == "mlp_threshold":
        g = F.silu(x.float() @ weights[0].float().t())
        thr = _gap_threshold(g, sparsity)
        return Point(x, thr, None, (g.abs() > thr).any(0).float().mean().item())
    scores = _token_values(batch, case.N, dev)
    mask = scores.abs() > _per_token_threshold(scores, sparsity)
    return Point(x, None, mask, mask.any(0).float().mean().item())


def bind(case: Case, p: Point, w: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The operands one copy's timed call takes at point ``p``: ``w`` itself, except for the
    oracle, which gets (x_c [B, A], W_c [N, A]): x with each sequence's inactive entries zeroed,
    and both restricted to the A inputs any sequence needs (the measured union)."""
    if case.op not in ORACLE_OPS:
        return w
    on = p.x.float().abs() > p.threshold
    cols = on.any(0).nonzero().squeeze(1)
    x_c = torch.where(on, p.x, torch.zeros_like(p.x))[:, cols].contiguous()
    return x_c, w[0][:, cols].contiguous()


def sparse_call(case: Case, p: Point, w: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One call of the op at point ``p`` on one copy's operands (``bind``'s output)."""
    if case.op in ORACLE_OPS:
        return F.linear(w[0], w[1])
    if case.op == "input_sparse":
        return tk.input_sparse_gemv(p.x, w[0], threshold=p.threshold)
    if case.op.endswith("_grouped"):
        return tk.input_sparse_gemv_grouped(p.x, list(w), [p.threshold] * len(w))
    if case.op.endswith("_separate"):
        return [tk.input_sparse_gemv(p.x, wi, threshold=p.threshold) for wi in w]
    if case.op == "output_sparse":
        return tk.output_sparse_gemv(p.x, w[0], p.mask)
    return tk.sparse_gated_mlp(p.x, *w, threshold=p.threshold, mask=p.mask)


def reference(case: Case, p: Point, w: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if case.op in ORACLE_OPS:  # w: the dense [N, K] weight
        return tk.input_sparse_gemv_ref(p.x, w[0].t().contiguous(), threshold=p.threshold)
    if reads_input_major(case):
        return torch.cat([tk.input_sparse_gemv_ref(p.x, wi, threshold=p.threshold) for wi in w], 1)
    if case.op == "output_sparse":
        return tk.output_sparse_gemv_ref(p.x, w[0], p.mask)
    return tk.sparse_gated_mlp_ref(p.x, *w, threshold=p.threshold, mask=p.mask)


def rel_error(y: torch.Tensor | list[torch.Tensor], ref: torch.Tensor) -> float:
    if isinstance(y, list):
        y = torch.cat(y, 1)
    if torch.isnan(y).any():
        return float("nan")
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def weight_bytes(case: Case, dtype: torch.dtype) -> int:
    e = torch.empty((), dtype=dtype).element_size()
    return (3 if case.op.startswith("mlp") else 1) * case.K * case.N * e


def needed_bytes(case: Case, batch: int, dtype: torch.dtype, active: Optional[float]) -> float:
    """Bytes that must move: weights of active rows (all of them when ``active`` is None, i.e.
    dense), activations in and out, and the criterion."""
    e = torch.empty((), dtype=dtype).element_size()
    K, N = case.K, case.N
    io = batch * (K + (K if case.op.startswith("mlp") else N)) * e
    if active is None:
        return weight_bytes(case, dtype) + io
    if case.op == "mlp_threshold":  # the gate is read densely to compute the mask
        return K * N * e * (1 + 2 * active) + io + 4 * batch
    if case.op == "mlp_mask":
        return 3 * K * N * e * active + io + batch * N
    crit = batch * N if case.op == "output_sparse" else 4 * batch
    return K * N * e * active + io + crit

