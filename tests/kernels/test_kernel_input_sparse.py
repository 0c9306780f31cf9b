"""input_sparse_gemv's Triton kernel against its float64 reference (see triton_kernels.testing
for the error bounds). CPU cases run under the interpreter at small odd shapes with forced
configs that cover both the direct store (one K range) and the partial sums of several K ranges;
CUDA cases run the tuned configs at real model shapes."""
from __future__ import annotations

import pytest
import torch

from triton_kernels import LaunchConfig, input_sparse_gemv_ref
from triton_kernels.input_sparse.op import triton_impl
from triton_kernels.testing import (DTYPE_IDS, DTYPES, assert_within, devices, gemv_bound,
                                    nan_like, rows_with_tokens, weight)

# (threshold kind, (K, N), forced config on the CPU); CUDA uses real shapes and tuned configs.
CPU_CASES = [
    ("scalar", (63, 431), LaunchConfig(16, 128, 64)),  # one K range: direct store
    ("channel", (431, 63), LaunchConfig(16, 64, 128)),  # 4 K ranges meeting through fp32 atomics
    ("token", (1023, 97), LaunchConfig(32, 64, 256, prefetch=True)),  # next tile in flight
    ("mask", (4097, 33), LaunchConfig(16, 32, 1024, prefetch=True)),  # last range: one row
    # batch > 1 summed with FMAs (batch padded to a power of two), one and several K ranges
    ("channel", (97, 431), LaunchConfig(8, 64, 128, fma=True)),
    ("token", (1023, 97), LaunchConfig(4, 64, 256, prefetch=True, fma=True)),
]
CUDA_CASES = [
    ("scalar", (4096, 14336), None),
    ("token", (14336, 4096), None),
    ("channel", (4097, 1023), None),
    ("mask", (14336, 4096), None),
    ("channel", (4096, 6144), None),
    ("token", (1023, 431), None),
]


def make_x(batch: int, K: int, dtype: torch.dtype, device: str, kind: str) -> torch.Tensor:
    """Random activations; non-contiguous for the token and channel cases."""
    if kind == "token":
        return torch.randn(K, batch, device=device).to(dtype).t()  # strides (1, B)
    if kind == "channel":
        return torch.randn(batch, 2 * K, device=device).to(dtype)[:, ::2]
    return torch.randn(batch, K, device=device).to(dtype)


def make_criterion(x: torch.Tensor, kind: str, sparsity: float):
    """(threshold, mask) giving about ``sparsity`` per sequence (``mask``: union sparsity)."""
    B, K = x.shape
    a = x.float().abs()
    if kind == "mask":
        return None, rows_with_tokens(B, K, sparsity, x.device.type)
    if sparsity == 0.0:
        return torch.zeros((), device=x.device), None
    if kind == "scalar":
        return torch.quantile(a.flatten(), sparsity), None
    if kind == "token":
        return torch.quantile(a, sparsity, dim=1, keepdim=True), None
    scale = torch.empty(K, device=x.device).uniform_(0.5, 1.5)
    return torch.quantile(a.flatten(), sparsity) * scale, None


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", range(len(CPU_CASES)), ids=[c[0] for c in CPU_CASES])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_reference(device, case, sparsity, batch, dtype):
    kind, (K, N), cfg = (CPU_CASES if device == "cpu" else CUDA_CASES)[case]
    x = make_x(batch, K, dtype, device, kind)
    w_t = weight(K, N, dtype, device)
    thr, mask = make_criterion(x, kind, sparsity)
    active = x.float().abs() > thr if thr is not None else mask
    if kind in ("scalar", "token"):
        assert abs(1.0 - active.double().mean().item() - sparsity) <= 0.02 + 1.0 / K
    counts = torch.full((2,), 5, dtype=torch.int64, device=device)  # counts add, never reset
    y = triton_impl(x, w_t, thr, mask, config=cfg, out=nan_like((batch, N), dtype, device),
                    counts=counts)
    xa = torch.where(active, x.double(), 0.0)
    ref = xa @ w_t.double()
    assert_within(y, ref, gemv_bound(ref, xa.abs() @ w_t.double().abs(), dtype),
                  f"{kind} K={K} N={N}")
    assert counts.tolist() == [5 + int(active.expand(batch, K).sum()), 5 + batch * K]


@pytest.mark.parametrize("device", devices())
def test_batch_beyond_one_launch(device):
    """B = 17 > MAX_BATCH_PER_LAUNCH runs in chunks and is still exact per sequence."""
    dtype, B, K, N = torch.float16, 17, 97, 63
    x = torch.randn(B, K, device=device).to(dtype)
    w_t = weight(K, N, dtype, device)
    thr = torch.full((B, 1), 0.8, device=device)
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    y = triton_impl(x, w_t, thr, out=nan_like((B, N), dtype, device), counts=counts)
    xa = torch.where(x.float().abs() > thr, x.double(), 0.0)
    ref = xa @ w_t.double()
    assert_within(y, ref, gemv_bound(ref, xa.abs() @ w_t.double().abs(), dtype), "B=17")
    assert counts.tolist() == [int((x.float().abs() > thr).sum()), B * K]  # both launches


@pytest.mark.parametrize("device", devices())
def test_all_inactive_gives_zeros(device):
    """Nothing active: no weight row is loaded and y is exactly zero (not NaN, not garbage)."""
    x = torch.randn(2, 431, device=device).to(torch.bfloat16)
    w_t = weight(431, 63, torch.bfloat16, device)
    y = triton_impl(x, w_t, threshold=torch.tensor(1e9, device=device),
                     out=nan_like((2, 63), torch.bfloat16, device))
    assert torch.equal(y, torch.zeros_like(y))


def _race_params() -> list:
    """Every batch 1..8 and both directions on the GPU; two cheap cases on the CPU."""
    out = []
    for dev in devices():
        cuda = dev.values[0] == "cuda"
        shapes = [(4096, 14336), (14336, 4096)] if cuda else [(431, 63)]
        for B in (range(1, 9) if cuda else (1, 4)):
            out += [pytest.param(dev.values[0], B, K, N, id=f"{dev.id}-B{B}-{K}x{N}",
                                 marks=dev.marks) for K, N in shapes]
    return out


@pytest.mark.parametrize("device,B,K,N", _race_params())
def test_split_repeated_calls_race_free(device, B, K, N):
    """Many back-to-back launches that split K all match the reference (CUDA: real shapes).
    A single-kernel variant whose K ranges met through atomics and a last-program ticket passed
    single calls but gave wrong sums now and then over 30 calls at batch 3-4 (docs/history):
    repeat, don't sample."""
    calls = 30 if device == "cuda" else 3
    cfg = None if device == "cuda" else LaunchConfig(16, 64, 128)
    x = torch.randn(B, K, device=device).to(torch.float16)
    w_t = weight(K, N, torch.float16, device)
    thr = torch.zeros((), device=device)
    ref = x.double() @ w_t.double()
    bound = gemv_bound(ref, x.double().abs() @ w_t.double().abs(), torch.float16)
    outs = [triton_impl(x, w_t, thr, config=cfg, out=nan_like((B, N), torch.float16, device))
            for _ in range(calls)]
    for i, y in enumerate(outs):
        assert_within(y, ref, bound, f"call {i}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("batch", [1, 4])
def test_chained_calls_read_the_previous_output(device, batch):
    """Each call's x is the previous call's y, issued back to back with no host sync: a GEMV
    that read x before the kernel writing it had finished would fail the bound against the
    reference computed from the y actually written."""
    K = 4096 if device == "cuda" else 200
    cfg = None if device == "cuda" else LaunchConfig(16, 64, 64)
    w_t = weight(K, K, torch.float32, device) * 1.1  # keeps |x| about constant over the chain
    thr = torch.full((), 0.3, device=device)
    xs = [torch.randn(batch, K, device=device)]
    for _ in range(20 if device == "cuda" else 3):
        xs.append(triton_impl(xs[-1], w_t, thr, config=cfg,
                              out=nan_like((batch, K), torch.float32, device)))
    for i in range(1, len(xs)):
        # Against the threshold's own fp32 value, as the kernel compares: fp32(0.3) is
        # 0.3000000119, and an x equal to it is active against the literal 0.3 but not in the
        # kernel (an fp32 chain of 4 x 4096 hit that about once in 4000 calls on the GPU).
        xa = torch.where(xs[i - 1].double().abs() > thr.double(), xs[i - 1].double(), 0.0)
        ref = xa @ w_t.double()
        assert_within(xs[i], ref, gemv_bound(ref, xa.abs() @ w_t.double().abs(), torch.float32),
                      f"call {i}")


def test_reference_equals_dense_at_zero_sparsity():
    x = torch.randn(3, 63, dtype=torch.float64).float()
    w_t = torch.randn(63, 31)
    y = input_sparse_gemv_ref(x, w_t, threshold=torch.tensor(-1.0))
    torch.testing.assert_close(y, x @ w_t, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_persistent_accumulator_is_zero_after_each_call(device, monkeypatch):
    """The split-K sums go through one persistent buffer per size, which the finishing kernel
    must leave zeroed: later calls on other inputs are then exact, and a call that may not make
    a buffer (first seen during a CUDA graph capture) gives the same y with a temporary one."""
    from triton_kernels import accumulator

    dtype, B, K, N = torch.float16, 3, 431, 63
    cfg = None if device == "cuda" else LaunchConfig(16, 64, 128)  # 4 K ranges on the CPU
    w_t = weight(K, N, dtype, device)
    thr = torch.zeros((), device=device)
    for _ in range(3):
        x = torch.randn(B, K, device=device).to(dtype)
        y = triton_impl(x, w_t, thr, config=cfg, out=nan_like((B, N), dtype, device))
        ref = x.double() @ w_t.double()
        assert_within(y, ref, gemv_bound(ref, x.double().abs() @ w_t.double().abs(), dtype),
                      "persistent")
        buf = accumulator.persistent(B * N, torch.device(device))
        assert buf is not None and torch.count_nonzero(buf) == 0, "accumulator left dirty"
    monkeypatch.setattr(accumulator, "_capturing", lambda device: True)
    monkeypatch.setattr(accumulator, "_BUFFERS", {})
    y_temp = triton_impl(x, w_t, thr, config=cfg, out=nan_like((B, N), dtype, device))
    assert accumulator.allocated() == {}, "capturing: no buffer may be made"
    assert_within(y_temp, ref, gemv_bound(ref, x.double().abs() @ w_t.double().abs(), dtype),
                  "temporary")


def test_failed_launch_leaves_accumulator_zeroed(monkeypatch):
    """A launch that raises after partial sums landed must not poison the next call."""
    if not torch.cuda.is_available():
        from triton_kernels import common
        if not common.INTERPRET:
            pytest.skip("needs the Triton interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from triton_kernels import accumulator
    from triton_kernels.input_sparse import kernel as kmod

    B, K, N = 1, 431, 63
    x = torch.randn(B, K, device=device).to(torch.float16)
    buf = accumulator.persistent(B * N, x.device)

    class Exploding:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                buf.fill_(7.0)  # stands for partial sums written before the failure
                raise RuntimeError("launch failed")
            return launch

    monkeypatch.setattr(kmod, "_input_sparse_kernel", Exploding())
    w_t = weight(K, N, torch.float16, device)
    with pytest.raises(RuntimeError, match="launch failed"):
        triton_impl(x, w_t, torch.zeros((), device=device), config=LaunchConfig(16, 64, 128))
    assert torch.count_nonzero(buf) == 0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("batch", [1, 4])
def test_input_equal_to_its_threshold_is_inactive(device, batch):
    """The test is strict and in fp32: |x| == t is inactive and the next float above t is
    active, at every position of a tile. (A reference thresholding fp32 x against the
    literal 0.3 instead of fp32(0.3) = 0.3000000119 counted x == fp32(0.3) as active: the
    chained-call test's rare fp32 failures on the GPU.)"""
    K, N = 200, 63
    t = torch.tensor(0.3, device=device)
    above = torch.nextafter(t, torch.tensor(1.0, device=device))
    x = torch.randn(batch, K, device=device)
    x[:, 0::3] = t  # exactly the threshold: inactive
    x[:, 1::3] = -above  # just above it in magnitude: active
    w_t = weight(K, N, torch.float32, device)
    y = triton_impl(x, w_t, t, config=LaunchConfig(16, 64, 64) if device == "cpu" else None,
                     out=nan_like((batch, N), torch.float32, device))
    on = x.abs() > t
    assert not on[:, 0::3].any() and on[:, 1::3].all()
    xa = torch.where(on, x.double(), 0.0)
    ref = xa @ w_t.double()
    assert_within(y, ref, gemv_bound(ref, xa.abs() @ w_t.double().abs(), torch.float32),
                  "x on the threshold")
    # and the literal-0.3 reference would have differed: the test can tell the two apart
    literal = torch.where(x.double().abs() > 0.3, x.double(), 0.0) @ w_t.double()
    assert (literal - ref).abs().max() > 1e-3
