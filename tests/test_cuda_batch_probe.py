"""Batches above 1 on CUDA under ``kernel_mode="auto"`` (``sparseffn.cuda_probe``): a module
takes the kernel path at batch B only where its decode launches, timed at B, are no slower than
the dense products; the decode loops probe before they compile a step.

On the CPU the kernel path runs through the Triton interpreter under ALWAYS; these tests then
put the modules under AUTO by hand (as a CUDA module would be) with the timings faked, so the
decision logic, the product lists and the decoded tokens are checked without a GPU. The test
marked ``gpu`` measures for real."""
from __future__ import annotations

import pytest
import torch

import sparseffn
from sparseffn import cuda_probe
from sparseffn.dispatch import KernelMode
from sparseffn.modules import probe_batch
from sparseffn.patching import sparse_modules
from sparseffn.testing import tiny_model

IDS = torch.randint(3, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
PROMPTS = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(3))


def _patched(method: str = "teal", scope: str = "all", device: str = "cpu"):
    model = tiny_model("llama").to(device)
    sparseffn.sparsify(model, method, 0.5, IDS, scope=scope, n_tokens=1024, progress=False,
                       kernel_mode="always")
    return model


def _as_cuda_auto(model) -> list:
    """Modules on the kernel path, switched to AUTO without re-deciding the path (what a CUDA
    module under AUTO looks like)."""
    modules = [m for _, m in sparse_modules(model) if m._layout_ready]
    assert modules and not any(m._cpu_path for m in modules)
    for m in modules:
        m.kernel_mode = KernelMode.AUTO
        m.forget_batch_probes()
    return modules


def _fake_times(monkeypatch, sparse_wins) -> list:
    calls = []

    def measure(weights, sparsities, batch):
        calls.append((tuple(tuple(w.shape) for w in weights), tuple(sparsities), batch))
        return (1.0, 2.0) if sparse_wins(weights, batch) else (2.0, 1.0)
    monkeypatch.setattr(cuda_probe, "_measure", measure)
    monkeypatch.setattr(cuda_probe, "_TIMES", {})
    return calls


def test_products_follow_each_decode_plan():
    """q/k/v: one grouped launch with each member's sparsity; o: alone; the TEAL MLP: gate/up
    grouped, then down; a neuron gate's plan (CHESS): not probed."""
    model = _patched()
    cal = sparseffn.patching.patch_state(model).calibration.sparsities
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    (weights, sparsities), = attn.k_proj.batch_products()
    assert [w is m.base.weight for w, m in zip(weights, (attn.q_proj, attn.k_proj,
                                                         attn.v_proj))] == [True] * 3
    assert list(sparsities) == [cal[f"layers.1.{s}"] for s in ("q_proj", "k_proj", "v_proj")]
    (o_w, o_s), = attn.o_proj.batch_products()
    assert o_w == [attn.o_proj.base.weight] and o_s == [cal["layers.1.o_proj"]]
    (gu, gu_s), (down, down_s) = mlp.batch_products()
    assert gu == [mlp.base.gate_proj.weight, mlp.base.up_proj.weight]
    assert down == [mlp.base.down_proj.weight] and down_s == [cal["layers.1.down_proj"]]
    assert _patched("chess", "mlp").model.layers[0].mlp.batch_products() == []


def test_a_batch_takes_the_kernels_only_where_they_measured_faster(monkeypatch):
    """Batch 2 pays for the MLP's down product only by summing with gate/up: the module decides
    on the sum; o_proj loses alone; an unprobed batch stays dense; the decoded tokens equal the
    reference path's; a new sparsity level forgets the decisions."""
    model = _patched()
    modules = _as_cuda_auto(model)
    hidden = model.config.hidden_size
    # gate/up wins by 1, down loses by 1 -> the MLP ties, and a tie takes the kernels.
    monkeypatch.setattr(cuda_probe, "_measure", lambda weights, sparsities, batch:
                        (1.0, 2.0) if len(weights) > 1 else
                        (2.0, 1.0) if weights[0].shape[0] == hidden else (1.0, 2.0))
    monkeypatch.setattr(cuda_probe, "_TIMES", {})
    probe_batch(model, 2)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert mlp._cuda_batches == (2,) and attn.q_proj._cuda_batches == (2,)
    assert attn.o_proj._cuda_batches == ()  # [hidden, hidden] alone: 2.0 against 1.0
    x = torch.randn(2, 1, hidden)
    w = mlp.base.down_proj.weight
    with torch.no_grad():
        assert mlp.use_kernels(x, w)
        assert not attn.o_proj.use_kernels(x, attn.o_proj.base.weight)
        assert not mlp.use_kernels(torch.randn(3, 1, hidden), w)  # never probed
    fast = sparseffn.generate(model, PROMPTS, max_new_tokens=6, compile=False)
    for m in modules:
        m.kernel_mode = KernelMode.NEVER
    assert torch.equal(fast, sparseffn.generate(model, PROMPTS, max_new_tokens=6,
                                                compile=False))
    sparseffn.set_sparsity(model, 0.3)
    assert all(m._cuda_batches == () and not m._cuda_probed for m in modules)


def test_transformers_loop_probes_its_decode_batch(monkeypatch):
    """A call ``model.generate`` leaves to transformers' own loop (here: beam search) probes
    the batch that loop decodes, prompts times beams, before decoding."""
    from sparseffn.hf_generate import decode_batch

    model = _patched()
    modules = _as_cuda_auto(model)
    calls = _fake_times(monkeypatch, lambda weights, batch: True)
    model.generate(PROMPTS, max_new_tokens=2, num_beams=2, do_sample=False)
    assert {batch for *_, batch in calls} == {4}
    assert all(m._cuda_batches == (4,) for m in modules)
    assert decode_batch(model, (PROMPTS,), {"num_return_sequences": 3, "do_sample": True}) == 6
    assert decode_batch(model, (), {"inputs_embeds": torch.zeros(2, 3, 4)}) is None


def test_each_product_is_measured_once_per_batch_and_level(monkeypatch):
    """The layers share measurements (same shapes, sparsities rounded to 0.05); batch 1, a
    module off AUTO and a shared-set module are never probed."""
    model = _patched()
    modules = _as_cuda_auto(model)
    calls = _fake_times(monkeypatch, lambda weights, batch: batch == 2)
    probe_batch(model, 1)
    assert not calls
    probe_batch(model, 2)
    probe_batch(model, 2)
    assert len(calls) == len(set(calls)) and all(c[2] == 2 for c in calls)
    assert all(all(s == round(s / 0.05) * 0.05 for s in c[1]) for c in calls)
    assert all(m._cuda_batches == (2,) for m in modules)
    probe_batch(model, 4)
    assert all(m._cuda_batches == (2,) and m._cuda_probed[4] is False for m in modules)
    modules[0].kernel_mode = KernelMode.ALWAYS
    modules[0].forget_batch_probes()
    probe_batch(model, 2)
    assert modules[0]._cuda_probed == {}


def test_pays_compares_the_sums(monkeypatch):
    w = torch.zeros(4, 4)
    times = {1: (3.0, 1.0), 2: (1.0, 2.5)}
    monkeypatch.setattr(cuda_probe, "product_times",
                        lambda weights, sparsities, batch: times[weights[0].shape[0]])
    small, big = ([w[:1]], [0.5]), ([w[:2]], [0.5])
    assert not cuda_probe.pays([small], 2)
    assert not cuda_probe.pays([small, big], 2)  # 4.0 against 3.5
    times[2] = (0.5, 3.0)
    assert cuda_probe.pays([small, big], 2)  # 3.5 against 4.0
    assert not cuda_probe.pays([], 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_probe_measures_on_the_gpu():
    """Real timings on a GPU: every module of the TEAL model decides, the timings are
    positive, and batch-2 greedy tokens under AUTO equal the reference path's."""
    model = tiny_model("llama").cuda()
    sparseffn.sparsify(model, "teal", 0.5, IDS, scope="all", n_tokens=1024, progress=False)
    probe_batch(model, 2)
    modules = [m for _, m in sparse_modules(model)]
    assert all(2 in m._cuda_probed for m in modules)
    for times in cuda_probe._TIMES.values():
        assert times[0] > 0 and times[1] > 0
    prompts = PROMPTS.cuda()
    fast = sparseffn.generate(model, prompts, max_new_tokens=6, compile=False)
    sparseffn.set_kernel_mode(model, "never")
    assert torch.equal(fast, sparseffn.generate(model, prompts, max_new_tokens=6,
                                                compile=False))
