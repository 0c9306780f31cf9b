"""The "coreinfer" method: each sequence's core neurons, fixed from its prompt for decoding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparseffn
from sparseffn.errors import SparseFFNError
from sparseffn.eval.perplexity import perplexity
from sparseffn.eval.sweep import check_prompt_len
from sparseffn.methods.coreinfer import CoreGate
from sparseffn.modules import SparseGatedMLP, start_sequences
from sparseffn.testing import TINY_FAMILIES, teacher_forced_logits, tiny_model

KERNELS = sparseffn.dispatch.kernels_on("cuda") or sparseffn.dispatch.kernels_on("cpu")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def ids(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(3, 1000, shape, generator=torch.Generator().manual_seed(seed))


def gates(model) -> list[CoreGate]:
    return [m.neuron_gate for m in model.modules() if isinstance(m, SparseGatedMLP)]


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma"])
def test_sparsity_zero_is_the_original_model_exactly(family):
    dense = tiny_model(family)
    model = tiny_model(family)
    sparseffn.sparsify(model, "coreinfer", 0.0, kernel_mode="never")
    prompt, cont = ids((3, 9), 1), ids((3, 5), 2)
    assert torch.equal(teacher_forced_logits(model, prompt, cont),
                       teacher_forced_logits(dense, prompt, cont))


def reference_decode_logits(model, prompt: torch.Tensor, cont: torch.Tensor,
                            sparsity: float) -> torch.Tensor:
    """The criterion written out with hooks on the unpatched model: record act * up over the
    prompt, keep each sequence's top-k mean magnitudes, mask h to them on decode steps."""
    cores, handles = {}, []

    def make(i: int, mlp):
        def hook(mod, args):
            h = args[0]
            if h.shape[1] > 1:  # the prompt: choose, and compute densely
                score = h.abs().float().mean(1)
                k = h.shape[-1] - round(sparsity * h.shape[-1])
                cores[i] = torch.zeros_like(score, dtype=torch.bool).scatter_(
                    -1, score.topk(k, -1).indices, True)
                return None
            return (torch.where(cores[i][:, None, :], h, 0),)
        return hook
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(make(i, layer.mlp)))
    try:
        return teacher_forced_logits(model, prompt, cont)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_decode_steps_keep_the_prompts_top_mean_neurons(family):
    model = tiny_model(family)
    prompt, cont = ids((2, 11), 3), ids((2, 6), 4)
    want = reference_decode_logits(model, prompt, cont, 0.5)
    sparseffn.sparsify(model, "coreinfer", 0.5, kernel_mode="never")
    sparseffn.reset_sparsity_stats(model)
    got = teacher_forced_logits(model, prompt, cont)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Each sequence has its own set, of exactly k neurons, and decoding differs from dense.
    core = gates(model)[0].core
    assert core.shape == (2, 100) and (core.sum(-1) == 50).all()
    assert not torch.equal(core[0], core[1])
    assert not torch.allclose(got, teacher_forced_logits(tiny_model(family), prompt, cont))


def test_prompt_runs_densely_and_counts_as_dense():
    dense, model = tiny_model("llama"), tiny_model("llama")
    sparseffn.sparsify(model, "coreinfer", 0.6, kernel_mode="never")
    sparseffn.reset_sparsity_stats(model)
    prompt = ids((2, 13), 5)
    with torch.no_grad():
        assert torch.equal(model(input_ids=prompt).logits, dense(input_ids=prompt).logits)
    assert sparseffn.sparsity_report(model).overall == 0.0


def test_padding_does_not_vote_and_start_sequences_forgets_held_sets():
    gate = CoreGate(0.5, 8, torch.device("cpu"))
    h = torch.rand(1, 5, 8)
    h[0, :2, :4] = 100.0  # two padded positions that would win neurons 0-3
    h[0, 2:, 4:] += 1.0
    gate.start_sequences(torch.tensor([[0, 0, 1, 1, 1]]))
    gate.mask(h, h, torch.ones_like(h))
    assert gate.core[0].tolist() == [False] * 4 + [True] * 4
    # Without the mask the padded tokens win.
    gate.start_sequences()
    gate.mask(h, h, torch.ones_like(h))
    assert gate.core[0].tolist() == [True] * 4 + [False] * 4
    # A one-token forward is a decode step of the held set, unless new sequences began.
    one = torch.zeros(1, 1, 8)
    one[0, 0, 4:] = 1.0
    assert gate.mask(one, one, torch.ones_like(one))[0, 0].tolist() == [True] * 4 + [False] * 4
    gate.start_sequences()
    assert gate.mask(one, one, torch.ones_like(one)).all()  # a one-token prompt: dense
    assert gate.core[0].tolist() == [False] * 4 + [True] * 4


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_generate_greedy_equals_hooked_reference_and_undo(family):
    dense = tiny_model(family)
    model = tiny_model(family)
    sparseffn.sparsify(model, "coreinfer", 0.5, kernel_mode="never")
    prompt = ids((1, 7), 6)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    # Its greedy tokens, fed back teacher-forced to the hooked reference, are its argmaxes.
    ref = reference_decode_logits(dense, prompt, out[:, 7:-1], 0.5)
    assert torch.equal(ref.argmax(-1).T, out[:, 8:])
    # A second generation from a one-token prompt chooses afresh (start_sequences).
    short = out[:, :1]
    again = model.generate(short, max_new_tokens=3, do_sample=False)
    assert gates(model)[0].core.shape == (1, 100)
    fresh = tiny_model(family)
    sparseffn.sparsify(fresh, "coreinfer", 0.5, kernel_mode="never")
    assert torch.equal(again, fresh.generate(short, max_new_tokens=3, do_sample=False))
    sparseffn.unsparsify(model)
    assert torch.equal(model(input_ids=prompt).logits, dense(input_ids=prompt).logits)


@pytest.mark.skipif(not KERNELS, reason="needs CUDA or Triton in interpreter mode")
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_kernel_path_matches_reference_path(family):
    ref = tiny_model(family).to(DEVICE)
    sparseffn.sparsify(ref, "coreinfer", 0.5, kernel_mode="never")
    kern = tiny_model(family).to(DEVICE)
    sparseffn.sparsify(kern, "coreinfer", 0.5, kernel_mode="always")
    assert all(m.plan == "gate" for m in kern.modules() if isinstance(m, SparseGatedMLP))
    prompt, cont = ids((3, 9), 7).to(DEVICE), ids((3, 5), 8).to(DEVICE)
    torch.testing.assert_close(teacher_forced_logits(kern, prompt, cont),
                               teacher_forced_logits(ref, prompt, cont), rtol=1e-4, atol=1e-4)
    assert torch.equal(gates(kern)[1].core, gates(ref)[1].core)
    # A one-token prompt on the kernel path: dense, and it sets the core from that token.
    start_sequences(kern)
    start_sequences(ref)
    one = ids((3, 1), 9).to(DEVICE)
    torch.testing.assert_close(teacher_forced_logits(kern, one, cont),
                               teacher_forced_logits(ref, one, cont), rtol=1e-4, atol=1e-4)
    assert torch.equal(gates(kern)[0].core, gates(ref)[0].core)


def test_decode_perplexity_scores_the_steps_after_the_prompt():
    model = tiny_model("llama")
    windows = ids((3, 24), 10)
    # Dense: the decode steps' NLL is the whole window's on the same tokens.
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, 9:-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 10:].reshape(-1))
    torch.testing.assert_close(perplexity(model, windows, batch_size=2, prompt_len=10),
                               float(nll.exp()), rtol=1e-4, atol=0)
    # coreinfer: its sparsity is counted over the decode steps only, at the target.
    sparseffn.sparsify(model, "coreinfer", 0.5, kernel_mode="never")
    sparseffn.reset_sparsity_stats(model)
    perplexity(model, windows, prompt_len=10)
    assert sparseffn.sparsity_report(model).ffn_bytes_skipped == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="prompt_len"):
        perplexity(model, windows, prompt_len=23)


def test_refusals():
    model = tiny_model("llama")
    sparseffn.sparsify(model, "coreinfer", 0.5)
    with pytest.raises(SparseFFNError, match="cannot share"):
        sparseffn.set_batch_sharing(model, True)
    with pytest.raises(SparseFFNError, match="--prompt-len"):
        check_prompt_len(["chess", "coreinfer"], 0)
    check_prompt_len(["chess", "coreinfer"], 64)
    for family in TINY_FAMILIES:
        m = tiny_model(family)
        sparseffn.sparsify(m, "coreinfer", 0.5, kernel_mode="never")
        teacher_forced_logits(m, ids((1, 4), 11), ids((1, 2), 12))
