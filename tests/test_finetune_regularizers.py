"""Regularizers on tiny models: a few steps lower the measured density, the loss stays finite.

Density is measured on a fixed held-out batch at per-layer tolerances frozen on the model
before training (its median |a|, so it starts near 0.5), before and after a few AdamW steps.
"""
from __future__ import annotations

import pytest
import torch

import sparseffn
from sparseffn.finetune import (ConstantSchedule, DensityLoss, FixedThreshold, ProgressiveL1,
                                ProgressiveSchedule, ReluSubstitution, ShiftedReLU,
                                SparsityRegularization, training_windows)
from sparseffn.finetune.probe import ActivationProbe
from sparseffn.testing import TINY_FAMILIES, tiny_model

STEPS, BATCH, SEQ = 8, 2, 32


@pytest.fixture(scope="module")
def windows(tokenizer, texts):
    return training_windows(tokenizer, texts, 4 + STEPS * BATCH, SEQ)


def measure(model, ids, tolerance=None):
    """(density per layer [L], frozen tolerances) of ``model`` on ``ids``, in eval mode."""
    reg = SparsityRegularization(model, [], tolerance=tolerance)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train(was_training)
    out = reg.density(), [reg.tolerance(i).clone() for i in range(len(reg.probes))]
    reg.remove(keep_activation=False)
    return out


def train(model, reg, windows, lr=3e-3):
    """STEPS plain-loop steps with ``loss + reg.term(step)``; returns the losses.

    The (tied) embedding stays frozen: it is most of a tiny model's parameters and time.
    """
    model.get_input_embeddings().weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(STEPS):
        batch = windows[4 + step * BATCH: 4 + (step + 1) * BATCH]
        out = model(input_ids=batch, labels=batch)
        loss = out.loss + reg.term(step)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


METHODS = {
    "l1": lambda: [ProgressiveL1(ProgressiveSchedule(warmup=1, stages=((3, 2.0), (6, 5.0))))],
    "density": lambda: [DensityLoss(0.2, ConstantSchedule(2.0))],
    "relu": lambda: [ReluSubstitution()],
    "fatrelu": lambda: [ReluSubstitution(shift=0.05)],
    "prosparse": lambda: [ReluSubstitution(),
                          ProgressiveL1(ProgressiveSchedule(warmup=2, stages=((6, 5.0),)))],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_few_steps_lower_measured_density(method, windows):
    model = tiny_model("llama")
    held = windows[:4]
    before, tolerance = measure(model, held)
    assert torch.allclose(before, torch.full_like(before, 0.5), atol=0.02)
    reg = SparsityRegularization(model, METHODS[method](), tolerance=tolerance)
    losses = train(model, reg, windows)
    logs = reg.logs()
    assert all(torch.isfinite(torch.tensor(losses)))
    if method in ("l1", "density", "prosparse"):
        assert logs["reg/term"] > 0
    # The attached counters (what the Trainer callback logs) measure what a fresh probe does.
    with torch.no_grad():
        model(input_ids=held)
    counted = reg.logs()
    reg.remove()
    after, _ = measure(model, held, tolerance)
    assert (after < before - 0.05).all(), (method, before, after)
    assert [counted[f"density/layer_{i:02d}"] for i in range(2)] == pytest.approx(after.tolist())


def test_plain_finetune_does_not_lower_density(windows):
    """The control: the same steps without a regularizer leave density near where it was."""
    model = tiny_model("llama")
    held = windows[:4]
    before, tolerance = measure(model, held)
    reg = SparsityRegularization(model, [], tolerance=tolerance)
    train(model, reg, windows)
    reg.remove()
    after, _ = measure(model, held, tolerance)
    assert (after > before - 0.05).all(), (before, after)


def test_fixed_threshold_trains_the_sparse_forward(windows, tokenizer, texts):
    """CATS fine-tuning: density is fixed by the thresholds (it does not fall by itself); the
    sparse model's loss falls, and the masked neurons get no gradient through their product."""
    model = tiny_model("llama")
    sparseffn.sparsify(model, "cats", 0.6, texts, tokenizer=tokenizer, n_tokens=2048,
                       seq_len=256, progress=False)
    held = windows[:4]
    reg = SparsityRegularization(model, [FixedThreshold()])
    with torch.no_grad():
        sparse_loss_before = float(model(input_ids=held, labels=held).loss)
    density_before = reg.logs()["density/mean"]
    assert density_before == pytest.approx(0.4, abs=0.08)  # the mask's density
    # Gradient check on one batch: d loss / d act is zero exactly where the mask is off.
    kept = {}
    probe = reg.probes[1]
    orig = probe.forward

    def keep(gate):
        act = orig(gate)
        act.retain_grad()
        kept["act"] = act
        return act
    probe.forward = keep
    model.train()
    model(input_ids=held, labels=held).loss.backward()
    probe.forward = orig
    act = kept["act"]
    off = act.detach().abs() <= model.model.layers[1].mlp.threshold("act")
    assert off.float().mean() > 0.4
    assert torch.count_nonzero(act.grad[off]) == 0
    assert torch.count_nonzero(act.grad[~off]) > 0.9 * (~off).sum()
    model.zero_grad()
    reg.term()  # releases the kept activations
    losses = train(model, reg, windows)
    assert all(torch.isfinite(torch.tensor(losses)))
    with torch.no_grad():
        sparse_loss_after = float(model(input_ids=held, labels=held).loss)
    assert sparse_loss_after < sparse_loss_before - 0.1
    assert reg.logs()["density/mean"] == pytest.approx(density_before, abs=0.1)
    reg.remove()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_probes_cover_every_family_and_train(family, windows):
    model = tiny_model(family)
    batch = windows[4:6]
    with torch.no_grad():
        dense = model(input_ids=batch).logits
    reg = SparsityRegularization(model, [ProgressiveL1(), DensityLoss(0.3)])
    assert len(reg.probes) == 2
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch).logits, dense)  # probing changes nothing
    model.train()
    out = model(input_ids=batch, labels=batch)
    term = reg.term()
    (out.loss + term).backward()
    assert torch.isfinite(term) and term > 0
    grads = [p.grad for n, p in model.named_parameters() if "mlp" in n and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    reg.remove()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch).logits, dense)  # removed without a trace


def test_relu_substitution_stays_after_removal_and_config_says_relu(windows):
    model = tiny_model("gemma")  # GELU-tanh, config key hidden_activation/hidden_act
    reg = SparsityRegularization(model, [ReluSubstitution(shift=0.1)])
    with torch.no_grad():
        trained_fn = model(input_ids=windows[:2]).logits
    reg.remove(keep_activation=True)
    act = model.model.layers[0].mlp.act_fn
    assert isinstance(act, ShiftedReLU) and act.shift == 0.1
    assert model.config.hidden_act == "relu" and model.config.sparseffn_relu_shift == 0.1
    with torch.no_grad():
        assert torch.equal(model(input_ids=windows[:2]).logits, trained_fn)
    x = torch.tensor([-1.0, 0.05, 0.1, 0.2])
    assert act(x).tolist() == [0.0, 0.0, 0.0, pytest.approx(0.2)]


def test_term_is_added_to_the_loss_weighted_by_token_share(windows):
    """With add_to_loss (the Trainer path) the model's loss carries the term, scaled by this
    batch's share of the accumulated label tokens exactly like the LM loss is."""
    model = tiny_model("llama")
    reg = SparsityRegularization(model, [ProgressiveL1(ConstantSchedule(0.5))])
    batch = windows[4:6]
    model.train()
    plain = model(input_ids=batch, labels=batch)
    term = reg.term()
    reg.add_to_loss = True
    share = 3 * (batch.shape[1] - 1) * batch.shape[0]  # as if 3 such batches were accumulated
    out = model(input_ids=batch, labels=batch, num_items_in_batch=share)
    lm = plain.loss * batch[:, 1:].numel() / share
    expected = lm + term * batch[:, 1:].numel() / share
    assert torch.allclose(out.loss, expected, rtol=1e-5)
    out = model(input_ids=batch, labels=batch)
    assert torch.allclose(out.loss, plain.loss + term, rtol=1e-5)
    reg.remove()
    assert not any(isinstance(m, ActivationProbe) for m in model.modules())


def test_gradient_checkpointing_gives_the_same_gradients(windows):
    """Recomputed forwards (outside the top-level call) are not counted or kept twice."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
                "use_reentrant": False})
        reg = SparsityRegularization(model, [ProgressiveL1(), DensityLoss(0.3)])
        model.train()
        batch = windows[4:6]
        (model(input_ids=batch, labels=batch).loss + reg.term()).backward()
        counted = int(reg._total[0])  # entries counted in layer 0: one forward's, not two
        assert counted == batch.numel() * model.config.intermediate_size
        grads.append(model.model.layers[0].mlp.gate_proj.weight.grad.clone())
        reg.remove()
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)

