"""input_sparse_gemv_grouped (up to three weights sharing x in one launch) against the per-weight
float64 reference: each group's columns must be exactly its own GEMV with its own threshold, in
its own place of y. CPU cases run under the interpreter with forced configs (one K range and
split K); CUDA cases use tuned configs at Llama-3-8B q/k/v and gate/up shapes."""
from __future__ import annotations

import pytest
import torch

import triton_kernels as tk
from triton_kernels import LaunchConfig
from triton_kernels.input_sparse.op import grouped_triton_impl
from triton_kernels.testing import (DTYPE_IDS, DTYPES, assert_within, devices, gemv_bound,
                                    nan_like, weight)

# (K, widths, forced CPU config)
CPU_CASES = [
    ((63, (97, 31)), LaunchConfig(16, 64, 64)),  # one K range, widths not multiples of cols
    ((431, (63, 33, 17)), LaunchConfig(16, 32, 128)),  # three groups, 4 K ranges (atomics)
]
CUDA_CASES = [
    ((4096, (14336, 14336)), None),  # gate / up
    ((4096, (4096, 1024, 1024)), None),  # q / k / v
]


def _thresholds(x: torch.Tensor, groups: int, sparsity: float) -> list[torch.Tensor]:
    """A different kind of threshold per group: global, per channel, per token."""
    B, K = x.shape
    a = x.float().abs()
    if sparsity == 0.0:
        return [torch.zeros((), device=x.device)] * groups
    q = torch.quantile(a.flatten(), sparsity)
    kinds = [q, q * torch.empty(K, device=x.device).uniform_(0.5, 1.5),
             torch.quantile(a, sparsity, dim=1, keepdim=True)]
    return kinds[:groups]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", range(2))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grouped_matches_per_weight_reference(device, case, sparsity, batch, dtype):
    (K, widths), cfg = (CPU_CASES if device == "cpu" else CUDA_CASES)[case]
    x = torch.randn(batch, K, device=device).to(dtype)
    w_ts = [weight(K, n, dtype, device) for n in widths]
    thrs = _thresholds(x, len(widths), sparsity)
    counts = [torch.zeros(2, dtype=torch.int64, device=device) for _ in widths]
    y = grouped_triton_impl(x, w_ts, thrs, config=cfg,
                             out=nan_like((batch, sum(widths)), dtype, device), counts=counts)
    col = 0
    for g, (w_t, t) in enumerate(zip(w_ts, thrs)):
        assert counts[g].tolist() == [int((x.float().abs() > t).sum()), batch * K], f"group {g}"
        xa = torch.where(x.float().abs() > t, x.double(), 0.0)
        ref = xa @ w_t.double()
        part = y[:, col:col + w_t.shape[1]]
        assert_within(part, ref, gemv_bound(ref, xa.abs() @ w_t.double().abs(), dtype),
                      f"group {g} of {widths}")
        col += w_t.shape[1]


def test_grouped_reference_and_errors():
    x = torch.randn(2, 63)
    w_ts = [torch.randn(63, 5), torch.randn(63, 7)]
    thrs = [torch.tensor(0.5), torch.full((63,), 0.2)]
    y = tk.input_sparse_gemv_grouped(x, w_ts, thrs)  # CPU tensors: the reference
    expect = torch.cat([tk.input_sparse_gemv(x, w, threshold=t) for w, t in zip(w_ts, thrs)], 1)
    torch.testing.assert_close(y, expect)
    with pytest.raises(ValueError, match="one threshold per weight"):
        tk.input_sparse_gemv_grouped(x, w_ts, thrs[:1])
    with pytest.raises(ValueError, match="1 to 3 weights"):
        tk.input_sparse_gemv_grouped(x, w_ts * 2, thrs * 2)
    with pytest.raises(ValueError, match="K=63"):
        tk.input_sparse_gemv_grouped(x, [w_ts[0], torch.randn(62, 7)], thrs)
    with pytest.raises(ValueError, match="dtype"):
        tk.input_sparse_gemv_grouped(x, [w_ts[0], w_ts[1].half()], thrs)
    with pytest.raises(ValueError, match="one counts tensor per weight"):
        tk.input_sparse_gemv_grouped_counted(x, w_ts, thrs, [torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(ValueError, match="int64"):
        tk.input_sparse_gemv_grouped_counted(x, w_ts, thrs, [torch.zeros(2), torch.zeros(2)])


def test_grouped_op_fake_and_compile():
    """The grouped op's schema and fake implementation pass opcheck, and it compiles whole."""
    x = torch.randn(3, 31)
    w_ts = [torch.randn(31, 9), torch.randn(31, 4)]
    thrs = [torch.tensor(0.3), torch.tensor(0.6)]
    counts = [torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)]
    torch.library.opcheck(torch.ops.sparseffn.input_sparse_gemv_grouped.default,
                          (x, w_ts, thrs))
    torch.library.opcheck(torch.ops.sparseffn.input_sparse_gemv_grouped_counted.default,
                          (x, w_ts, thrs, counts))
    f = torch.compile(lambda a, c: tk.input_sparse_gemv_grouped_counted(a, w_ts, thrs, c),
                      fullgraph=True, backend="inductor")
    for c in counts:
        c.zero_()
    torch.testing.assert_close(f(x, counts), tk.input_sparse_gemv_grouped(x, w_ts, thrs))
    # The compiled call's counts land in the caller's tensors (the op mutates them).
    assert [c.tolist() for c in counts] == [[int((x.abs() > t).sum()), 3 * 31] for t in thrs]
