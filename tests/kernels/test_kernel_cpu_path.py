"""The compiled CPU decode ops (``triton_kernels.cpu``) against their plain-PyTorch references:
fresh random inputs, odd shapes, several sparsities, batch 1 to 5, NaN-poisoned weights outside
the rows they may read, every weight dtype, and the site counts they keep."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import triton_kernels as tk
from triton_kernels import cpu as cpu_ops
from triton_kernels.cpu import build

DTYPES = {"fp32": (torch.float32, 1e-5), "bf16": (torch.bfloat16, 2e-2),
          "fp16": (torch.float16, 2e-3)}
SHAPES = [(63, 431), (1023, 96), (576, 1536), (5, 3)]


@pytest.fixture(autouse=True)
def two_threads():
    """The ops split rows between torch's threads: test that split even where the test run
    gives each worker one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def GEMV_CASES(test):  # noqa: N802 - used as a decorator
    """Every dtype, shape, sparsity and batch of the GEMV tests."""
    for mark in (pytest.mark.parametrize("batch", [1, 5]),
                 pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9]),
                 pytest.mark.parametrize("k,n", SHAPES, ids=lambda v: str(v)),
                 pytest.mark.parametrize("dtype", DTYPES, ids=str)):
        test = mark(test)
    return test


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert bool(torch.isfinite(got).all())
    scale = ref.float().abs().max().clamp_min(1.0)
    assert float((got.float() - ref.float()).abs().max()) <= tol * scale


def test_the_ops_build_here():
    """CI machines have a C++ compiler: the path must be there, not silently absent."""
    assert cpu_ops.available(), cpu_ops.unavailable_reason()
    assert build.library_path(build.compiler()).exists()


@GEMV_CASES
def test_input_sparse_cpu(dtype, k, n, sparsity, batch):
    dt, tol = DTYPES[dtype]
    g = torch.Generator().manual_seed(k * n + batch)
    x = torch.randn(batch, k, generator=g).to(dt)
    w_t = torch.randn(k, n, generator=g).to(dt)
    t = x.float().abs().flatten().quantile(sparsity) if sparsity else torch.tensor(0.0)
    ref = tk.input_sparse_gemv_ref(x, w_t, threshold=t)
    poisoned = w_t.clone()
    poisoned[(x.float().abs() <= t).all(dim=0)] = float("nan")  # rows no sequence needs
    counts = torch.zeros(2, dtype=torch.int64)
    _close(tk.input_sparse_gemv_cpu(x, poisoned, threshold=t, counts=counts), ref, tol)
    assert counts.tolist() == [int((x.float().abs() > t).sum()), batch * k]
    mask = x.float().abs() > t
    _close(tk.input_sparse_gemv_cpu(x, poisoned, mask=mask), ref, tol)
    per_channel = torch.full((k,), float(t))
    _close(tk.input_sparse_gemv_cpu(x, poisoned, threshold=per_channel), ref, tol)
    grouped = tk.input_sparse_gemv_grouped_cpu(x, [w_t, w_t[:, :2]], [t, t])
    _close(grouped, tk.input_sparse_gemv_grouped_ref(x, [w_t, w_t[:, :2].contiguous()], [t, t]),
           tol)


@GEMV_CASES
def test_output_sparse_cpu(dtype, k, n, sparsity, batch):
    dt, tol = DTYPES[dtype]
    g = torch.Generator().manual_seed(k + n + batch)
    x = torch.randn(batch, k, generator=g).to(dt)
    w = torch.randn(n, k, generator=g).to(dt)
    for mask in (torch.rand(batch, n, generator=g) >= sparsity,
                 torch.rand(1, n, generator=g) >= sparsity):  # one set shared by the batch
        poisoned = w.clone()
        poisoned[~mask.any(dim=0)] = float("nan")
        _close(tk.output_sparse_gemv_cpu(x, poisoned, mask),
               tk.output_sparse_gemv_ref(x, w, mask), tol)


def _act(g: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("h,i", [(63, 431), (96, 1023), (7, 5)], ids=lambda v: str(v))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("batch", [1, 3])
def test_gated_mlp_cpu(dtype, activation, h, i, sparsity, batch):
    dt, tol = DTYPES[dtype]
    g = torch.Generator().manual_seed(h * i + batch)
    x = torch.randn(batch, h, generator=g).to(dt)
    w_gate, w_up, w_down_t = ((torch.randn(i, h, generator=g) / h ** 0.5).to(dt)
                              for _ in range(3))
    act = _act(x.float() @ w_gate.float().t(), activation)
    t = act.abs().flatten().quantile(sparsity) if sparsity else torch.tensor(0.0)
    counts = torch.zeros(2, dtype=torch.int64)
    y, active = tk.sparse_gated_mlp_cpu(x, w_gate, w_up, w_down_t, threshold=t,
                                        activation=activation, counts=counts)
    # Neurons within rounding of the threshold may fall either way (the gate's dot product
    # sums in another order); every other neuron must agree, and the output within tolerance.
    # The reference rounds act(gate) to x's dtype before its test; the op tests in fp32.
    clear = (act.abs() - t).abs() > 1e-4 * act.abs().max() + (0 if dt == torch.float32 else
                                                              2e-2 * act.abs().max())
    assert torch.equal(active[clear], (act.abs() > t)[clear])
    assert counts.tolist() == [int(active.sum()), batch * i]
    _close(y, tk.sparse_gated_mlp_ref(x, w_gate, w_up, w_down_t, mask=active,
                                      activation=activation), tol)
    mask = torch.rand(batch, i, generator=g) >= sparsity
    off = ~mask.any(dim=0)
    pg, pu, pd = (w.clone() for w in (w_gate, w_up, w_down_t))
    for w in (pg, pu, pd):
        w[off] = float("nan")
    y_mask, active_mask = tk.sparse_gated_mlp_cpu(x, pg, pu, pd, mask=mask,
                                                  activation=activation)
    _close(y_mask, tk.sparse_gated_mlp_ref(x, w_gate, w_up, w_down_t, mask=mask,
                                           activation=activation), tol)
    assert torch.equal(active_mask, mask)


def test_bad_weights_are_refused_with_the_reason():
    x = torch.randn(1, 8)
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        tk.input_sparse_gemv_cpu(x, torch.zeros(8, 4, dtype=torch.float64),
                                 threshold=torch.tensor(0.0))
    with pytest.raises(ValueError, match="contiguous rows"):
        tk.input_sparse_gemv_cpu(x, torch.zeros(4, 8).t(), threshold=torch.tensor(0.0))
    with pytest.raises(ValueError, match="int64 \\[2\\]"):
        tk.input_sparse_gemv_cpu(x, torch.zeros(8, 4), threshold=torch.tensor(0.0),
                                 counts=torch.zeros(2))


def test_a_missing_compiler_is_reported_not_raised_at_import(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "_LIB", None)
    monkeypatch.setattr(build, "_ERROR", None)
    monkeypatch.setenv("SPARSEFFN_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    assert not cpu_ops.available()
    assert "no C++ compiler" in cpu_ops.unavailable_reason()
    with pytest.raises(cpu_ops.CpuOpsUnavailable, match="apt-get install g\\+\\+"):
        build.load()
