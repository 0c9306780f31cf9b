"""The real built-in model (SmolLM2-135M): measured sparsity on held-out text hits the target."""
from __future__ import annotations

import pytest
import torch

import sparseffn
from sparseffn.data import load_texts, token_windows
from sparseffn.eval.perplexity import perplexity

pytestmark = pytest.mark.slow
# The README's levels but 0.4 (between two that are checked): each case calibrates on 2048
# tokens of the real model, about 12 s on two cores, and CI must stay well under 30 minutes.
TARGETS = (0.25, 0.5, 0.65)
METHODS = ("teal:all", "teal:mlp", "wina:all", "cats", "chess", "topk")
# Chance is 0.5 at 50%; this test's predictor measured 0.624 here (and 0.488 sparsity).
RECALL_FLOOR = 0.58


@pytest.fixture(scope="module")
def heldout(builtin):
    _, tokenizer = builtin
    return token_windows(tokenizer, load_texts("austen", "eval"), 1024, 512, "evaluation")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("spec", METHODS)
def test_measured_sparsity_within_two_points_on_heldout_text(spec, target, builtin, heldout):
    model, tokenizer = builtin
    name, _, scope = spec.partition(":")
    sparseffn.sparsify(model, name, target, "austen", tokenizer=tokenizer,
                       scope=scope or "mlp", n_tokens=2048, progress=False)
    try:
        sparseffn.reset_sparsity_stats(model)
        perplexity(model, heldout)
        report = sparseffn.sparsity_report(model)
        assert report.overall == pytest.approx(target, abs=0.02)
        # Every layer is gated, none wildly off the target.
        assert all(abs(s - target) < 0.1 for s in report.per_layer())
    finally:
        sparseffn.unsparsify(model)


def test_sparsity_zero_and_undo_on_real_model(builtin, heldout):
    model, tokenizer = builtin
    ids = heldout[:1, :128]
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        sparseffn.sparsify(model, "chess", 0.0, "pydoc", tokenizer=tokenizer, n_tokens=2048,
                           progress=False)
        assert torch.equal(model(input_ids=ids).logits, dense)
        sparseffn.set_sparsity(model, 0.5)
        assert not torch.equal(model(input_ids=ids).logits, dense)
        sparseffn.unsparsify(model)
        assert torch.equal(model(input_ids=ids).logits, dense)


def test_predictor_on_real_model_hits_target_and_predicts(builtin, heldout):
    """Predictors trained on 8192 Austen tokens (2 epochs): the score threshold, fitted on
    1024 held-out calibration tokens, gives the target on Persuasion, and the predictor finds
    more of each token's most important neurons than chance (k / I = 0.5)."""
    model, tokenizer = builtin
    config = sparseffn.SparsityConfig(method="predictor", sparsity=0.5, predictor_epochs=2)
    sparseffn.sparsify(model, calibration="austen", tokenizer=tokenizer, config=config,
                       n_tokens=8192, seq_len=256, progress=False)
    try:
        sparseffn.reset_sparsity_stats(model)
        perplexity(model, heldout)
        report = sparseffn.sparsity_report(model)
        assert report.overall == pytest.approx(0.5, abs=0.02)
        assert sparseffn.get_calibration(model).meta["predictor_recall"] > RECALL_FLOOR
    finally:
        sparseffn.unsparsify(model)
