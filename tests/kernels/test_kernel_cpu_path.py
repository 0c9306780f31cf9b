"""The CPU decode path of every op against its plain-PyTorch reference: fresh random inputs,
odd shapes, several sparsities, batch 1 to 5, NaN-poisoned weights outside the rows it may read.

The CPU path is fp32 (where ``sparseffn.dispatch`` uses it); fp16/bf16 inputs run it too and
are checked at their own rounding.
"""
from __future__ import annotations

import pytest
import torch

import triton_kernels as tk

DTYPES = {"fp32": (torch.float32, 1e-5), "bf16": (torch.bfloat16, 2e-2),
          "fp16": (torch.float16, 2e-3)}
SHAPES = [(63, 431), (1023, 96), (576, 1536)]


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert bool(torch.isfinite(got).all())
    scale = ref.float().abs().max().clamp_min(1.0)
    assert float((got.float() - ref.float()).abs().max()) <= tol * scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,n", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("batch", [1, 5])
def test_input_sparse_cpu(dtype, k, n, sparsity, batch):
    dt, tol = DTYPES[dtype]
    g = torch.Generator().manual_seed(k * n + batch)
    x = torch.randn(batch, k, generator=g).to(dt)
    w_t = torch.randn(k, n, generator=g).to(dt)
    t = x.float().abs().flatten().quantile(sparsity) if sparsity else torch.tensor(0.0)
    ref = tk.input_sparse_gemv_ref(x, w_t, threshold=t)
    poisoned = w_t.clone()
    poisoned[(x.float().abs() <= t).all(dim=0)] = float("nan")  # rows no sequence needs
    _close(tk.input_sparse_gemv_cpu(x, poisoned, threshold=t), ref, tol)
    mask = x.float().abs() > t
    _close(tk.input_sparse_gemv_cpu(x, poisoned, mask=mask), ref, tol)
    grouped = tk.input_sparse_gemv_grouped_cpu(x, [w_t, w_t[:, :7]], [t, t])
    _close(grouped, tk.input_sparse_gemv_grouped_ref(x, [w_t, w_t[:, :7].contiguous()], [t, t]),
           tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,n", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("batch", [1, 5])
def test_output_sparse_cpu(dtype, k, n, sparsity, batch):
    dt, tol = DTYPES[dtype]
    g = torch.Generator().manual_seed(k + n + batch)
    x = torch.randn(batch, k, generator=g).to(dt)
    w = torch.randn(n, k, generator=g).to(dt)
    mask = torch.rand(batch, n, generator=g) >= sparsity
    poisoned = w.clone()
    poisoned[~mask.any(dim=0)] = float("nan")
    _close(tk.output_sparse_gemv_cpu(x, poisoned, mask), tk.output_sparse_gemv_ref(x, w, mask),
           tol)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("h,i", [(63, 431), (96, 1023)], ids=lambda v: str(v))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("batch", [1, 3])
def test_gated_mlp_cpu(activation, h, i, sparsity, batch):
    g = torch.Generator().manual_seed(h * i + batch)
    x = torch.randn(batch, h, generator=g)
    w_gate, w_up, w_down_t = (torch.randn(i, h, generator=g) / h ** 0.5 for _ in range(3))
    act = torch.nn.functional.silu(x @ w_gate.t()) if activation == "silu" else \
        torch.nn.functional.gelu(x @ w_gate.t(), approximate="tanh")
    t = act.abs().flatten().quantile(sparsity) if sparsity else torch.tensor(0.0)
    h_ref = tk.sparse_gate_up_ref(x, w_gate, w_up, threshold=t, activation=activation)
    _close(tk.sparse_gate_up_cpu(x, w_gate, w_up, threshold=t, activation=activation), h_ref,
           1e-5)
    y_ref = tk.sparse_gated_mlp_ref(x, w_gate, w_up, w_down_t, threshold=t,
                                    activation=activation)
    _close(tk.sparse_gated_mlp_cpu(x, w_gate, w_up, w_down_t, threshold=t,
                                   activation=activation), y_ref, 1e-5)
    y_fused, active = tk.sparse_gated_mlp_threshold_cpu(x, w_gate, w_up, w_down_t, t,
                                                        activation)
    _close(y_fused, y_ref, 1e-5)
    assert torch.equal(active, act.abs() > t)
    mask = torch.rand(batch, i, generator=g) >= sparsity
    off = ~mask.any(dim=0)
    pg, pu, pd = (w.clone() for w in (w_gate, w_up, w_down_t))
    for w in (pg, pu, pd):
        w[off] = float("nan")
    _close(tk.sparse_gated_mlp_cpu(x, pg, pu, pd, mask=mask, activation=activation),
           tk.sparse_gated_mlp_ref(x, w_gate, w_up, w_down_t, mask=mask, activation=activation),
           1e-5)
