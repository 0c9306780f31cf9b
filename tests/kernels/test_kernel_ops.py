"""The custom ops themselves: registration, fake (meta) implementations, dispatch to the
reference off-GPU, torch.compile(fullgraph=True) (and CUDA graphs on a GPU), input validation."""
from __future__ import annotations

import pytest
import torch

import triton_kernels as tk

OPS = {
    "input_sparse_gemv": torch.ops.sparseffn.input_sparse_gemv.default,
    "input_sparse_gemv_counted": torch.ops.sparseffn.input_sparse_gemv_counted.default,
    "output_sparse_gemv": torch.ops.sparseffn.output_sparse_gemv.default,
    "sparse_gated_mlp": torch.ops.sparseffn.sparse_gated_mlp.default,
    "sparse_gate_up": torch.ops.sparseffn.sparse_gate_up.default,
}


def small_args(dtype=torch.float16, device="cpu", B=3, H=63, I=97):
    """One call's (args, kwargs) per op, at odd sizes."""
    x = torch.randn(B, H, device=device).to(dtype)
    w_t = (torch.randn(H, I, device=device) / H**0.5).to(dtype)
    w = (torch.randn(I, H, device=device) / H**0.5).to(dtype)
    w2 = (torch.randn(I, H, device=device) / H**0.5).to(dtype)
    mask = torch.rand(B, I, device=device) < 0.4
    return {
        "input_sparse_gemv": ((x, w_t), {"threshold": torch.tensor(0.6, device=device)}),
        "input_sparse_gemv_counted": ((x, w_t, torch.zeros(2, dtype=torch.int64, device=device)),
                                      {"threshold": torch.tensor(0.6, device=device)}),
        "output_sparse_gemv": ((x, w, mask), {}),
        "sparse_gated_mlp": ((x, w, w2, w_t.t().contiguous()),
                             {"threshold": torch.full((B, 1), 0.1, device=device)}),
        "sparse_gate_up": ((x, w, w2), {"threshold": torch.full((I,), 0.1, device=device)}),
    }


@pytest.mark.parametrize("name", list(OPS))
def test_opcheck(name):
    """Schema, fake tensor and AOT-dispatch checks of torch.library on the CPU path."""
    args, kwargs = small_args()[name]
    torch.library.opcheck(OPS[name], args, kwargs)


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fake_impl_shape_and_dtype(name, dtype):
    args, kwargs = small_args(dtype)[name]
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fargs = [mode.from_tensor(a) for a in args]
        fkw = {k: mode.from_tensor(v) for k, v in kwargs.items()}
        out = OPS[name](*fargs, **fkw)
    expected = {"input_sparse_gemv": (3, 97), "input_sparse_gemv_counted": (3, 97),
                "output_sparse_gemv": (3, 97),
                "sparse_gated_mlp": (3, 63), "sparse_gate_up": (3, 97)}[name]
    assert tuple(out.shape) == expected and out.dtype == dtype


def test_cpu_ops_are_the_references_or_the_interpreted_kernels():
    """On CPU tensors an op is its reference, except under TRITON_INTERPRET=1, where it runs
    the Triton kernel (so CI's patched models take the real kernel path): then it equals the
    op's own Triton entry point and matches the reference to rounding (fp16 outputs; the gated
    ops round gate and up to fp16, where another summation order may round one value the other
    way: 2 ulps)."""
    from triton_kernels.gated_mlp import op as gated_mlp
    from triton_kernels.input_sparse import op as input_sparse
    from triton_kernels.output_sparse import op as output_sparse
    triton_entry = {"input_sparse_gemv": input_sparse.triton_impl,
                    "output_sparse_gemv": output_sparse.triton_impl,
                    "sparse_gated_mlp": gated_mlp.triton_impl,
                    "sparse_gate_up": gated_mlp.gate_up_triton_impl}
    for name, (args, kwargs) in small_args().items():
        if name.endswith("_counted"):  # the counting form: test_compile_fullgraph_cpu
            continue
        ref = getattr(tk, f"{name}_ref")(*args, **kwargs)
        got = getattr(tk, name)(*args, **kwargs)
        if tk.kernels_available("cpu"):
            torch.testing.assert_close(got, ref, rtol=2e-3, atol=1e-3)
            # Same launch configs in both calls (no tuning on the CPU): identical up to the
            # order of the split-K atomics, i.e. fp32 rounding.
            torch.testing.assert_close(got, triton_entry[name](*args, **kwargs), rtol=1e-6,
                                       atol=1e-6)
        else:
            assert torch.equal(got, ref), name


def _all_ops(x, w_t, w, w2, w_down_t, mask, thr, counts):
    a = tk.input_sparse_gemv_counted(x * 2, w_t, counts, threshold=thr)
    b = tk.output_sparse_gemv(x, w, mask)
    c = tk.sparse_gated_mlp(x, w, w2, w_down_t, threshold=thr)
    d = tk.sparse_gated_mlp(x, w, w2, w_down_t, mask=mask, activation="gelu_tanh")
    return a.float().sum(1) + b.float().relu().sum(1) + (c.float() - d.float()).sum(1)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_cpu(backend):
    (x, w_t), _ = small_args(torch.float32)["input_sparse_gemv"]
    (_, w, mask), _ = small_args(torch.float32)["output_sparse_gemv"]
    w2 = torch.randn_like(w)
    counts = torch.zeros(2, dtype=torch.int64)
    args = (x, w_t, w, w2, w_t.t().contiguous(), mask, torch.tensor(0.05), counts)
    compiled = torch.compile(_all_ops, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(*args), _all_ops(*args), rtol=1e-5, atol=1e-5)
    # The compiled call added to the caller's counts as the eager one did.
    assert counts.tolist() == [2 * int(((x * 2).abs() > 0.05).sum()), 2 * x.numel()]


_KEEP: list = []  # accumulators of the test below stay allocated: graphs may hold them


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture)")
def test_compile_reduce_overhead_cuda_graphs(monkeypatch):
    """fullgraph + CUDA graphs: recorded once, replayed on fresh inputs, masks and thresholds
    (values read at replay, not frozen at capture), still correct."""
    H, I = 4096, 14336
    dt = torch.bfloat16
    (_, w_t), _ = small_args(dt, "cuda", H=H, I=I)["input_sparse_gemv"]
    (_, w, _), _ = small_args(dt, "cuda", H=H, I=I)["output_sparse_gemv"]
    w2, w_down_t = torch.randn_like(w) / H**0.5, w_t.t().contiguous()
    from triton_kernels import accumulator
    fresh: dict = {}  # made anew inside the cudagraph trees' warm-up below (kept alive: _KEEP)
    _KEEP.append(fresh)
    monkeypatch.setattr(accumulator, "_BUFFERS", fresh)
    compiled = torch.compile(_all_ops, fullgraph=True, mode="reduce-overhead")
    counts, eager_counts = (torch.zeros(2, dtype=torch.int64, device="cuda") for _ in range(2))
    for i in range(4):  # warm-up, record, then replays
        x = torch.randn(1, H, device="cuda").to(dt)
        mask = torch.rand(1, I, device="cuda") < 0.3 + 0.2 * i
        args = (x, w_t, w, w2, w_down_t, mask, torch.tensor(0.3 * (i + 1), device="cuda"))
        torch.testing.assert_close(compiled(*args, counts), _all_ops(*args, eager_counts),
                                   rtol=1e-5, atol=1e-4)
        assert counts.tolist() == eager_counts.tolist()  # the replays count too
    # The persistent split-K accumulators must lie outside every graph pool (pool id (0, 0)).
    segments = torch.cuda.memory_snapshot()
    for buf in accumulator._BUFFERS.values():
        seg = next(s for s in segments
                   if s["address"] <= buf.data_ptr() < s["address"] + s["total_size"])
        assert tuple(seg["segment_pool_id"]) == (0, 0), "accumulator allocated in a graph pool"
    assert accumulator._BUFFERS


def test_validation_errors():
    x = torch.randn(2, 63, dtype=torch.float16)
    w_t = torch.randn(63, 31, dtype=torch.float16)
    thr = torch.tensor(0.5)
    with pytest.raises(ValueError, match=r"contiguous\(\)"):
        tk.input_sparse_gemv(x, torch.randn(31, 63, dtype=torch.float16).t(), threshold=thr)
    with pytest.raises(ValueError, match="dtype"):
        tk.input_sparse_gemv(x, w_t.float(), threshold=thr)
    with pytest.raises(ValueError, match=r"\[K, N\]"):
        tk.input_sparse_gemv(x, w_t[:62], threshold=thr)
    with pytest.raises(ValueError, match="exactly one"):
        tk.input_sparse_gemv(x, w_t)
    with pytest.raises(ValueError, match="broadcast"):
        tk.input_sparse_gemv(x, w_t, threshold=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="bool"):
        tk.output_sparse_gemv(x, w_t.t().contiguous(), torch.ones(2, 31))
    with pytest.raises(ValueError, match="activation"):
        tk.sparse_gated_mlp(x, w_t.t().contiguous(), w_t.t().contiguous(), w_t.t().contiguous(),
                            threshold=thr, activation="relu")
    with pytest.raises(ValueError, match="dtype"):
        tk.input_sparse_gemv(x.to(torch.int32), w_t, threshold=thr)


@pytest.mark.skipif(not tk.kernels_available("cuda" if torch.cuda.is_available() else "cpu"),
                    reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("criterion", ["threshold", "mask"])
def test_gate_up_then_down_is_the_fused_mlp(criterion):
    """sparse_gate_up's h, finished by input_sparse_gemv(h, w_down_t, threshold=0), computes
    what the fused op computes (both run the same two kernels), and h is NaN-free where written."""
    from triton_kernels.gated_mlp.op import gate_up_triton_impl, triton_impl
    from triton_kernels.input_sparse.op import triton_impl as input_sparse_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    B, H, I = 3, 63, 97
    x = torch.randn(B, H, device=dev, dtype=torch.float16)
    w, w2 = ((torch.randn(I, H, device=dev) / H**0.5).half() for _ in range(2))
    w_down_t = (torch.randn(I, H, device=dev) / I**0.5).half()
    crit = ({"threshold": torch.full((I,), 0.1, device=dev)} if criterion == "threshold"
            else {"mask": torch.rand(B, I, device=dev) < 0.4})
    h = gate_up_triton_impl(x, w, w2, **crit,
                            out=torch.full((B, I), float("nan"), device=dev, dtype=torch.float16))
    torch.testing.assert_close(h, tk.sparse_gate_up_ref(x, w, w2, **crit), rtol=2e-3, atol=2e-3)
    y = input_sparse_triton(h, w_down_t, threshold=torch.zeros((), device=dev))
    torch.testing.assert_close(y, triton_impl(x, w, w2, w_down_t, **crit), rtol=0, atol=2e-3)


def test_kernels_available():
    assert tk.kernels_available("meta") is False
    assert tk.kernels_available("cpu") == (tk.HAS_TRITON and tk.INTERPRET)


def test_ops_run_with_the_input_device_current(monkeypatch):
    """Triton launches on the current device: every op entry makes x's CUDA device current
    (a model spread over GPUs calls layers on cuda:1 while cuda:0 is current). Checked on the
    CPU with a fake CUDA tensor and a recording device switch."""
    from triton_kernels import common

    seen = []

    class FakeX:
        is_cuda = True
        device = torch.device("cuda", 1)

    class Switch:
        def __init__(self, device):
            seen.append(("enter", device))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            seen.append(("exit",))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Switch)
    body = common.on_input_device(lambda x, y: seen.append(("body", y)) or y)
    assert body(FakeX(), 7) == 7
    assert seen == [("enter", torch.device("cuda", 1)), ("body", 7), ("exit",)]
    seen.clear()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # already current: no switch
    assert body(FakeX(), 8) == 8 and seen == [("body", 8)]
    cpu = torch.zeros(1)
    seen.clear()
    assert body(cpu, 9) == 9 and seen == [("body", 9)]
    import triton_kernels.gated_mlp.op as g
    import triton_kernels.input_sparse.op as i
    import triton_kernels.output_sparse.op as o
    for fn in (i.triton_impl, i.grouped_triton_impl, o.triton_impl, g.triton_impl,
               g.gate_up_triton_impl):
        assert hasattr(fn, "__wrapped__"), f"{fn.__name__} lacks the device guard"
