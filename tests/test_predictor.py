"""The "predictor" method: trained low-rank neuron predictors (Deja Vu style)."""
from __future__ import annotations

import pytest
import torch

import sparseffn
from calibrate.artifact import TENSORS_NAME
from calibrate.predictor import default_rank, keep_count
from sparseffn.errors import CalibrationError, SparseFFNError
from sparseffn.modules import SparseGatedMLP
from sparseffn.testing import tiny_model

IDS = torch.randint(3, 1000, (16, 256), generator=torch.Generator().manual_seed(0))
CALIB = dict(n_tokens=4096, progress=False)


def fresh_ids() -> torch.Tensor:
    """Tokens the calibration never saw: [8, 256]."""
    return torch.randint(3, 1000, (8, 256), generator=torch.Generator().manual_seed(9))


def mlps(model):
    return [m for m in model.modules() if isinstance(m, SparseGatedMLP)]


def heldout_recall(model, ids: torch.Tensor, untrained: bool = False) -> float:
    """Fraction of each token's top-k |act * up| neurons that the predictor's top-k holds
    (``untrained``: for random predictor weights of the same shapes instead)."""
    got = []
    g = torch.Generator().manual_seed(3)
    for mlp in mlps(model):
        seen = {}
        mlp.observe = seen.__setitem__
        with torch.no_grad():
            model(input_ids=ids)
        mlp.observe = None
        x, act, up = seen["mlp_in"], seen["act"], seen["up"]
        k = keep_count(mlp.intermediate_size, 0.5)
        truth = (act * up).abs().topk(k, dim=-1).indices
        if untrained:
            gate = mlp.neuron_gate
            a, b = (torch.randn(p.shape, generator=g) for p in (gate.pred_a, gate.pred_b))
            scores = torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)
        else:
            scores = mlp.neuron_gate.scores(x)
        pred = scores.topk(k, dim=-1).indices
        hit = torch.zeros_like(act, dtype=torch.bool).scatter_(-1, truth, True)
        got.append(float(hit.gather(-1, pred).float().mean()))
    return sum(got) / len(got)


def test_trained_predictor_beats_an_untrained_one_on_heldout_tokens():
    """On a random-weight model |act * up| is nearly symmetric in x, so a low-rank linear score
    can only do a little better than chance: a predictor fitted directly with 1000 Adam steps
    reached 0.575 here (chance: k / I = 0.5). The real-model test (test_smollm2) asks more."""
    model = tiny_model("llama")
    sparseffn.sparsify(model, "predictor", 0.5, IDS, **CALIB)
    heldout = torch.randint(3, 1000, (2, 64), generator=torch.Generator().manual_seed(5))
    trained, untrained = heldout_recall(model, heldout), heldout_recall(model, heldout, True)
    assert trained > 0.54 and untrained < 0.53, (trained, untrained)
    # The reported recall is measured on held-out calibration windows, also above chance.
    assert sparseffn.get_calibration(model).meta["predictor_recall"] > 0.53


def test_measured_sparsity_near_target_and_bytes_net_of_the_predictor():
    model = tiny_model("llama")
    sparseffn.sparsify(model, "predictor", 0.7, IDS, **CALIB)
    sparseffn.reset_sparsity_stats(model)
    with torch.no_grad():
        model(input_ids=fresh_ids())
    report = sparseffn.sparsity_report(model)
    inter = model.config.intermediate_size
    # Fresh tokens, one threshold per layer fitted on held-out calibration windows. On this
    # random model single 512-token windows measured 0.57-0.77 (the real-model test in
    # test_smollm2 holds the 2-point bound); a threshold fitted on the training windows
    # themselves measured 0.46.
    assert report.overall == pytest.approx(0.7, abs=0.1)
    # gate, up and down rows of inactive neurons, less the predictor's own weights
    mlp = mlps(model)[0]
    per_layer = 3 * inter * model.config.hidden_size
    expected = report.overall - (mlp.neuron_gate.pred_a.numel() + mlp.neuron_gate.pred_b.numel()) / per_layer
    assert report.ffn_bytes_skipped == pytest.approx(expected, rel=1e-6)


def test_save_load_keeps_the_predictors_and_the_function(tmp_path):
    model = tiny_model("qwen2")
    ids = torch.randint(3, 1000, (2, 16))
    sparseffn.sparsify(model, "predictor", 0.5, IDS, **CALIB)
    with torch.no_grad():
        first = model(input_ids=ids).logits
    cal = sparseffn.get_calibration(model)
    sparseffn.save_calibration(model, tmp_path / "calib")
    sparseffn.unsparsify(model)
    sparseffn.sparsify(model, calibration=tmp_path / "calib")
    loaded = sparseffn.get_calibration(model)
    assert loaded.extras.keys() == cal.extras.keys()
    assert all(torch.equal(loaded.extras[k], cal.extras[k]) for k in cal.extras)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, first)


def test_set_sparsity_refits_the_score_threshold_from_stored_quantiles():
    model = tiny_model("llama")
    sparseffn.sparsify(model, "predictor", 0.5, IDS, **CALIB)
    sparseffn.set_sparsity(model, 0.8)
    sparseffn.reset_sparsity_stats(model)
    with torch.no_grad():
        model(input_ids=fresh_ids())
    assert sparseffn.sparsity_report(model).overall == pytest.approx(0.8, abs=0.1)


def test_artifact_missing_a_layers_predictor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    model = tiny_model("llama")
    sparseffn.sparsify(model, "predictor", 0.5, IDS, **CALIB)
    path = sparseffn.save_calibration(model, tmp_path / "calib")
    tensors = load_file(str(path / TENSORS_NAME))
    del tensors["extras.layers.1.a"], tensors["extras.layers.1.b"]
    save_file(tensors, str(path / TENSORS_NAME))
    with pytest.raises(CalibrationError, match="layers.1.a"):
        sparseffn.load_calibration(path)


def test_bad_predictor_settings_are_refused():
    with pytest.raises(SparseFFNError, match="predictor_rank"):
        sparseffn.SparsityConfig(method="predictor", predictor_rank=-1)
    with pytest.raises(SparseFFNError, match="predictor_epochs"):
        sparseffn.SparsityConfig(method="predictor", predictor_epochs=0)
    with pytest.raises(SparseFFNError, match="scope"):
        sparseffn.SparsityConfig(method="predictor", scope="all")


def test_rank_follows_the_hidden_size_and_can_be_set():
    assert default_rank(576) == 64 and default_rank(4096) == 256 and default_rank(16384) == 1024
    model = tiny_model("llama")
    config = sparseffn.SparsityConfig(method="predictor", sparsity=0.5, predictor_rank=8,
                                      predictor_epochs=1)
    sparseffn.sparsify(model, calibration=IDS, config=config, **CALIB)
    assert mlps(model)[0].neuron_gate.pred_a.shape == (8, model.config.hidden_size)
