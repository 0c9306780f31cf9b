"""The rotation probe's pieces on the built-in model: orthogonal bases, an exact round trip at
sparsity 0, the sparsity it sets, and the bytes it counts."""
from __future__ import annotations

import pytest
import torch

import sparseffn
from bench.quality import rotation as R


@pytest.fixture(scope="module")
def probe():
    torch.manual_seed(0)
    model, _ = sparseffn.load_builtin_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 48))
    return model, R.Activations(model, ids, stride=1), ids


@pytest.mark.parametrize("variant", ["layer", "residual", "global", "block-mlp", "random-mlp"])
def test_bases_are_orthogonal(probe, variant):
    _, acts, _ = probe
    for q in R.rotations(acts, variant).values():
        eye = torch.eye(q.shape[0])
        assert torch.allclose(q.T @ q, eye, atol=1e-4)


@pytest.mark.parametrize("variant", list(R.VARIANTS))
def test_sparsity_zero_keeps_the_dense_function(probe, variant):
    model, acts, ids = probe
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        handles = R.install(model, acts, R.rotations(acts, variant), variant, 0.0)
        try:
            rotated = model(input_ids=ids).logits
        finally:
            for h in handles:
                h.remove()
    # threshold 0 keeps every nonzero entry; the rotation and its inverse round in float32
    assert (rotated - dense).abs().max() < 1e-3 * dense.abs().max()


def test_hooks_drop_the_target_fraction(probe):
    """Layer 0's attention input meets no upstream sparsity: on the calibration tokens
    themselves its threshold drops the target quantile."""
    model, acts, ids = probe
    seen = []
    hooks = R.install(model, acts, {}, "plain", 0.5)
    hooks.append(model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, a: seen.append(a[0])))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    zero = (seen[0] == 0).float().mean().item()
    assert 0.49 < zero < 0.51


def test_read_fraction_counts_runtime_rotations(probe):
    model, _, _ = probe
    d = model.config.hidden_size
    dense = sum(m.weight.numel() for layer in model.model.layers for m in layer.modules()
                if isinstance(m, torch.nn.Linear))
    n = model.config.num_hidden_layers
    assert R.read_fraction(model, "plain", 0.5) == pytest.approx(0.5)
    assert R.read_fraction(model, "global", 0.5) == pytest.approx(0.5)
    assert R.read_fraction(model, "layer", 0.5) == pytest.approx(0.5 + 2 * n * d * d / dense)
    assert R.read_fraction(model, "residual", 0.5) == pytest.approx(0.5 + n * d * d / dense)
    assert R.read_fraction(model, "block-mlp", 0.5, block=64) == pytest.approx(
        0.5 + n * d * 64 / dense)


def test_block_eigenvectors_are_block_diagonal():
    moment = torch.randn(70, 70, dtype=torch.float64)
    moment = moment @ moment.T
    q = R.block_eigenvectors(moment, 32)
    outside = torch.ones(70, 70, dtype=torch.bool)
    for a in range(0, 70, 32):
        outside[a:a + 32, a:a + 32] = False
    assert q[outside].abs().max() == 0
    assert torch.allclose(q.T @ q, torch.eye(70, dtype=torch.float64), atol=1e-10)


def test_mlp_scope_refuses_attention_rotations(capsys):
    with pytest.raises(SystemExit):
        R.main(["--scope", "mlp", "--variants", "plain", "layer"])
    assert "layer" in capsys.readouterr().err
