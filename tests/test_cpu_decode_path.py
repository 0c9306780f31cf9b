"""The CPU decode path of the sparse modules (the compiled ops of ``triton_kernels.cpu``, taken
under ``kernel_mode="always"`` on CPU tensors without the Triton interpreter, and under AUTO
where ``sparseffn.cpu_probe`` measures them at least as fast as the reference path): within
fp32 rounding of the reference path on tiny models of every family and every method, with the
same greedy tokens and the same counted sparsity."""
from __future__ import annotations

import pytest
import torch

import sparseffn
from sparseffn import cpu_probe, dispatch, layout
from sparseffn.patching import sparse_modules
from sparseffn.testing import TINY_FAMILIES, teacher_forced_logits, tiny_model

IDS = torch.randint(3, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
PROMPT = torch.randint(3, 1000, (1, 9), generator=torch.Generator().manual_seed(1))
TOKENS = torch.randint(3, 1000, (1, 4), generator=torch.Generator().manual_seed(2))
SPECS = ["teal:all", "wina:mlp", "cats", "chess", "topk", "predictor"]


@pytest.fixture
def cpu_path(monkeypatch):
    """CPU tensors take the compiled CPU path under ALWAYS, not the Triton interpreter."""
    monkeypatch.setitem(dispatch._AVAILABLE, "cpu", False)


def _probe_says(monkeypatch, op_faster: bool) -> None:
    """Every shape measures as if the op were (or were not) faster than the reference path."""
    monkeypatch.setattr(cpu_probe, "probe", lambda shape, dtype, batch=1: (1.0, 2.0)
                        if op_faster else (2.0, 1.0))


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("spec", SPECS)
def test_cpu_path_matches_the_reference_path(family, spec, cpu_path):
    method, _, scope = spec.partition(":")
    model = tiny_model(family)
    sparseffn.sparsify(model, method, 0.5, IDS, scope=scope or "mlp", n_tokens=1024,
                       progress=False, kernel_mode="always")
    modules = [m for _, m in sparse_modules(model)]
    taking = [m for m in modules if m._layout_ready]
    assert taking and all(m._cpu_path for m in taking)
    fast = teacher_forced_logits(model, PROMPT, TOKENS)
    sparseffn.set_kernel_mode(model, "never")
    reference = teacher_forced_logits(model, PROMPT, TOKENS)
    assert torch.allclose(fast, reference, rtol=1e-4, atol=1e-4), \
        float((fast - reference).abs().max())
    assert bool(torch.isfinite(fast).all())


def test_cpu_path_counts_the_same_sparsity(cpu_path):
    model = tiny_model("llama")
    sparseffn.sparsify(model, "chess", 0.5, IDS, n_tokens=1024, progress=False,
                       kernel_mode="always")
    sparseffn.reset_sparsity_stats(model)
    teacher_forced_logits(model, PROMPT, TOKENS)
    fast = sparseffn.sparsity_report(model).overall
    sparseffn.set_kernel_mode(model, "never")
    sparseffn.reset_sparsity_stats(model)
    teacher_forced_logits(model, PROMPT, TOKENS)
    assert fast == pytest.approx(sparseffn.sparsity_report(model).overall, abs=0.02)


def test_auto_takes_the_cpu_path_where_measured_faster(monkeypatch):
    _probe_says(monkeypatch, op_faster=True)
    model = tiny_model("llama")
    sparseffn.sparsify(model, "teal", 0.5, IDS, scope="all", n_tokens=1024, progress=False)
    modules = [m for _, m in sparse_modules(model)]
    assert modules and all(m._cpu_path and m._layout_ready for m in modules)
    assert all(layout.is_input_major(m.kernel_linears()[0].weight) for m in modules)
    fast = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
    sparseffn.set_kernel_mode(model, "never")
    assert torch.equal(fast, model.generate(PROMPT, max_new_tokens=8, do_sample=False))


def test_auto_falls_back_to_the_reference_path_where_slower(monkeypatch):
    _probe_says(monkeypatch, op_faster=False)
    model = tiny_model("llama")
    sparseffn.sparsify(model, "chess", 0.5, IDS, n_tokens=1024, progress=False)
    for _, m in sparse_modules(model):
        assert not m._layout_ready and not m._cpu_path
        assert all(lin.weight.is_contiguous() for lin in m.kernel_linears())  # no relayout


def test_auto_takes_batches_up_to_the_probed_limit(monkeypatch):
    """Where the op pays at batch 4, per-token batches up to 4 decode through the CPU ops and
    larger ones on the reference path, and a batch of 4 decodes greedily as the reference path
    does; where it pays at batch 1 only, batch 2 decodes on the reference path."""
    monkeypatch.setattr(cpu_probe, "probe", lambda shape, dtype, batch=1: (1.0, 2.0))
    model = tiny_model("llama")
    sparseffn.sparsify(model, "teal", 0.5, IDS, scope="all", n_tokens=1024, progress=False)
    modules = [m for _, m in sparse_modules(model)]
    assert modules and all(m._cpu_path and m._cpu_batch == 4 for m in modules)
    mlp = model.model.layers[0].mlp
    w = mlp.base.down_proj.weight
    with torch.no_grad():
        assert mlp.use_kernels(torch.randn(4, 1, w.shape[0]), w)
        assert not mlp.use_kernels(torch.randn(5, 1, w.shape[0]), w)
    prompts = torch.randint(3, 1000, (4, 9), generator=torch.Generator().manual_seed(3))
    fast = model.generate(prompts, max_new_tokens=8, do_sample=False)
    sparseffn.set_kernel_mode(model, "never")
    assert torch.equal(fast, model.generate(prompts, max_new_tokens=8, do_sample=False))
    monkeypatch.setattr(cpu_probe, "probe", lambda shape, dtype, batch=1: (1.0, 2.0)
                        if batch == 1 else (2.0, 1.0))
    sparseffn.set_kernel_mode(model, "auto")
    assert mlp._cpu_path and mlp._cpu_batch == 1
    with torch.no_grad():
        assert not mlp.use_kernels(torch.randn(2, 1, w.shape[0]), w)


def test_the_probe_decides_per_shape_once_and_a_group_together(monkeypatch):
    """q, k and v run as one call: they decide on their summed times, so they agree even where
    k/v alone would lose; each shape is measured once."""
    calls = []

    def measure(n, k, dtype, batch=1):
        calls.append((n, k, batch))
        return (1.0, 1.5) if n == k else (1.0, 0.9)  # q (square) wins, k and v lose
    monkeypatch.setattr(cpu_probe, "_measure", measure)
    monkeypatch.setattr(cpu_probe, "_TIMES", {})
    model = tiny_model("llama")
    sparseffn.sparsify(model, "teal", 0.5, IDS, scope="all", n_tokens=1024, progress=False)
    attn = model.model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    assert k.base.weight.shape != q.base.weight.shape  # k alone: 1.0 against 0.9, loses
    assert q._cpu_path and k._cpu_path and v._cpu_path
    assert len(set(calls)) == len(calls)


@pytest.mark.parametrize("batch", [1, 4])
def test_the_measured_probe_runs_both_products(batch):
    op, ref = cpu_probe._measure(24, 40, torch.float32, batch)
    assert 0 < op < 1 and 0 < ref < 1


def test_no_compiler_means_the_reference_path_and_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(cpu_probe.cpu_ops, "available", lambda: False)
    monkeypatch.setattr(cpu_probe.cpu_ops, "unavailable_reason", lambda: "no C++ compiler")
    monkeypatch.setattr(cpu_probe, "_WARNED", False)
    model = tiny_model("llama")
    with caplog.at_level("WARNING", logger="sparseffn"):
        sparseffn.sparsify(model, "teal", 0.5, IDS, scope="all", n_tokens=1024, progress=False)
    assert not any(m._cpu_path for _, m in sparse_modules(model))
    assert sum("no CPU decode path" in r.message for r in caplog.records) == 1


def test_a_compiled_step_runs_the_reference_path(monkeypatch):
    """The CPU ops are plain C calls that torch.compile cannot trace: a compiled decode step
    (sparseffn.generate) takes the reference path instead of failing, and the eager steps still
    take the CPU ops."""
    _probe_says(monkeypatch, op_faster=True)
    model = tiny_model("llama")
    sparseffn.sparsify(model, "teal", 0.5, IDS, scope="all", n_tokens=1024, progress=False)
    torch._dynamo.reset()
    out = sparseffn.generate(model, PROMPT, 4, eos_token_id=None, max_cache_len=16)
    assert out.shape == (1, PROMPT.shape[1] + 4)
    sparseffn.reset_sparsity_stats(model)
    before = int(model.model.layers[0].self_attn.q_proj.counters["q_proj"].total)
    sparseffn.generate(model, PROMPT, 2, eos_token_id=None, compile=False)
    assert int(model.model.layers[0].self_attn.q_proj.counters["q_proj"].total) > before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cpu_path_takes_half_precision_models(dtype, cpu_path):
    """Each sparse module on the CPU ops against its reference path on the same input and the
    same weight layout (the masks of input sites are then identical: both test the same values
    in fp32), at the dtype's rounding."""
    model = tiny_model("qwen2", dtype=dtype)
    sparseffn.sparsify(model, "teal", 0.5, IDS, scope="all", n_tokens=1024, progress=False,
                       kernel_mode="always")
    modules = [m for _, m in sparse_modules(model)]
    assert modules and all(m._cpu_path for m in modules)
    g = torch.Generator().manual_seed(3)
    inputs = {id(m): torch.randn(3, 1, m.base.weight.shape[1] if hasattr(m.base, "weight")
                                 else m.base.down_proj.weight.shape[0], generator=g).to(dtype)
              for m in modules}
    with torch.no_grad():
        fast = {id(m): m(inputs[id(m)]) for m in modules}
        sparseffn.patching.set_kernel_mode(model, "never", keep_layout=True)
        for m in modules:
            ref = m(inputs[id(m)])
            got = fast[id(m)]
            assert got.dtype == dtype and torch.isfinite(got).all()
            scale = ref.float().abs().max().clamp_min(1.0)
            assert float((got.float() - ref.float()).abs().max()) <= 3e-2 * scale
