"""Batch-shared sparsity (``sparseffn.set_batch_sharing``): one active set per site for every
sequence of a batch, on the reference path and the kernel path (the Triton interpreter under
TRITON_INTERPRET=1, and the compiled CPU ops)."""
from __future__ import annotations

import pytest
import torch

import sparseffn
from sparseffn import dispatch
from sparseffn.patching import sparse_modules
from sparseffn.sharing import keep_count, shared_set
from sparseffn.testing import teacher_forced_logits, tiny_model

IDS = torch.randint(3, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
BATCH = torch.randint(3, 1000, (4, 12), generator=torch.Generator().manual_seed(1))
SPECS = ["teal:all", "wina:mlp", "cats", "chess"]


def _sparse(spec: str, **kw):
    method, _, scope = spec.partition(":")
    model = tiny_model("llama")
    sparseffn.sparsify(model, method, 0.5, IDS, scope=scope or "mlp", n_tokens=1024,
                       progress=False, **kw)
    return model


def test_shared_set_keeps_the_largest_summed_margins_per_position():
    margin = torch.tensor([[[3.0, 0.0, 1.0, 0.0]], [[0.0, 2.5, 1.0, 0.0]]])  # [B=2, T=1, C=4]
    assert shared_set(margin, 2).tolist() == [[[True, True, False, False]]]
    assert shared_set(margin, 4).all() and shared_set(margin, 9).shape == (1, 1, 4)
    assert keep_count(0.5, 7) == 3 and keep_count(0.999, 10) == 1 and keep_count(0.0, 5) == 5


@pytest.mark.parametrize("spec", SPECS)
def test_every_token_uses_the_batch_set_of_the_calibrated_size(spec):
    model = _sparse(spec, kernel_mode="never")
    with torch.no_grad():
        per_token = model(BATCH).logits
    sparseffn.set_batch_sharing(model, True)
    sparseffn.reset_sparsity_stats(model)
    with torch.no_grad():
        shared = model(BATCH).logits
    report = sparseffn.sparsity_report(model)
    # Each site keeps exactly keep_count(s, width) channels for every token.
    for site in report.sites:
        assert site.observed > 0
    assert report.overall == pytest.approx(0.5, abs=0.03)
    assert not torch.equal(shared, per_token)
    # A sequence's output depends on its batch-mates; alone, it is its own top-k.
    with torch.no_grad():
        alone = model(BATCH[:1]).logits
    assert not torch.allclose(alone, shared[:1])
    sparseffn.set_batch_sharing(model, False)
    with torch.no_grad():
        assert torch.equal(model(BATCH).logits, per_token)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("path", ["triton-interpreter", "cpu-ops"])
def test_kernel_path_shares_like_the_reference_path(spec, path, monkeypatch):
    if path == "cpu-ops":
        monkeypatch.setitem(dispatch._AVAILABLE, "cpu", False)
    elif not dispatch.kernels_on("cpu"):
        pytest.skip("needs Triton in interpreter mode")
    model = _sparse(spec, kernel_mode="always", batch_shared=True)
    assert all(m._layout_ready for _, m in sparse_modules(model))
    prompt, tokens = BATCH[:, :6], BATCH[:, 6:9]
    sparseffn.reset_sparsity_stats(model)
    fast = teacher_forced_logits(model, prompt, tokens)
    fast_sparsity = sparseffn.sparsity_report(model).overall
    sparseffn.set_kernel_mode(model, "never")
    sparseffn.reset_sparsity_stats(model)
    reference = teacher_forced_logits(model, prompt, tokens)
    assert torch.allclose(fast, reference, rtol=1e-4, atol=1e-4), \
        float((fast - reference).abs().max())
    assert fast_sparsity == pytest.approx(sparseffn.sparsity_report(model).overall, abs=1e-6)


def test_auto_decodes_shared_batches_through_the_cpu_ops(monkeypatch):
    from sparseffn import cpu_probe
    # the op pays at batch 1 only: per-token batches of 4 decode on the reference path
    monkeypatch.setattr(cpu_probe, "probe", lambda shape, dtype, batch=1: (1.0, 2.0)
                        if batch == 1 else (2.0, 1.0))
    model = _sparse("teal:all")
    mlp = model.model.layers[0].mlp
    x = torch.randn(4, 1, mlp.base.down_proj.weight.shape[0])
    with torch.no_grad():
        assert mlp._cpu_path and not mlp.use_kernels(x, mlp.base.down_proj.weight)  # batch 4
        sparseffn.set_batch_sharing(model, True)
        assert mlp.use_kernels(x, mlp.base.down_proj.weight)


@pytest.mark.parametrize("method", ["topk", "predictor"])
def test_methods_without_act_thresholds_refuse_sharing_and_leave_the_model(method):
    model = tiny_model("llama")
    with pytest.raises(sparseffn.SparseFFNError, match="cannot share"):
        sparseffn.sparsify(model, method, 0.5, IDS, n_tokens=1024, progress=False,
                           batch_shared=True)
    assert not sparseffn.is_sparsified(model)


def test_set_sparsity_resizes_the_shared_sets_and_undo_is_exact():
    model = tiny_model("llama")
    with torch.no_grad():
        dense = model(BATCH).logits
    sparseffn.sparsify(model, "chess", 0.5, IDS, n_tokens=1024, progress=False,
                       batch_shared=True)
    mlp = model.model.layers[0].mlp
    width = mlp.intermediate_size
    assert mlp.shared_keep["act"] == keep_count(0.5, width)
    sparseffn.set_sparsity(model, 0.25)
    assert mlp.shared_keep["act"] == keep_count(0.25, width)
    sparseffn.unsparsify(model)
    with torch.no_grad():
        assert torch.equal(model(BATCH).logits, dense)
