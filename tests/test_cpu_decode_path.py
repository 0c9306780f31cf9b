"""The CPU decode path of the sparse modules (the ops' ``cpu`` implementations, taken under
``kernel_mode="always"`` on CPU tensors without the Triton interpreter): within fp32 rounding of
the reference path on tiny models of every family and every method; AUTO keeps the CPU on the
reference path."""
from __future__ import annotations

import pytest
import torch

import sparseffn
from sparseffn import dispatch, layout
from sparseffn.patching import sparse_modules
from sparseffn.testing import TINY_FAMILIES, teacher_forced_logits, tiny_model

IDS = torch.randint(3, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
PROMPT = torch.randint(3, 1000, (1, 9), generator=torch.Generator().manual_seed(1))
TOKENS = torch.randint(3, 1000, (1, 4), generator=torch.Generator().manual_seed(2))
SPECS = ["teal:all", "wina:mlp", "cats", "chess", "topk", "predictor"]


@pytest.fixture
def cpu_path(monkeypatch):
    """CPU tensors take the gather-based CPU path, not the Triton interpreter."""
    monkeypatch.setitem(dispatch._AVAILABLE, "cpu", False)


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


def test_auto_keeps_the_cpu_on_the_reference_path(cpu_path):
    model = tiny_model("llama")
    sparseffn.sparsify(model, "teal", 0.5, IDS, scope="all", n_tokens=1024, progress=False)
    for _, m in sparse_modules(model):
        assert not m._layout_ready and not m._cpu_path
        assert all(lin.weight.is_contiguous() for lin in m.kernel_linears())  # no relayout
    sparseffn.set_kernel_mode(model, "always")
    assert all(m._cpu_path and layout.is_input_major(m.kernel_linears()[0].weight)
               for _, m in sparse_modules(model))
