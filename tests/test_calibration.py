"""Statistics and fitting: histogram quantiles, CHESS bisection, WINA scaling, text sources."""
from __future__ import annotations

import json

import pytest
import torch

from calibrate.histogram import (CHANNEL_BINS, POOLED_BINS, cdf_at, new_histogram, quantile,
                                 update_histogram)
from sparseffn.data import builtin_texts, load_texts
from sparseffn.errors import CalibrationError
from sparseffn.families import FAMILIES
from sparseffn.methods.chess import Chess
from sparseffn.methods.wina import Wina


def lognormal(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.exp(torch.randn(shape, generator=g) * 2.0)
    return magnitude * torch.sign(torch.randn(shape, generator=g))


@pytest.mark.parametrize("q", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
def test_pooled_quantile_matches_exact(q):
    x = lognormal((3000, 7))
    hist = new_histogram(1, POOLED_BINS)
    for chunk in x.split(1000):  # streaming: several updates
        update_histogram(hist, chunk)
    t = quantile(hist, q)[0]
    assert (x.abs() <= t).float().mean().item() == pytest.approx(q, abs=2e-3)
    if q == 0:
        assert t == 0


def test_per_channel_quantile_and_cdf():
    x = lognormal((4000, 5)) * torch.tensor([1e-3, 1e-1, 1.0, 10.0, 300.0])
    hist = new_histogram(5, CHANNEL_BINS)
    update_histogram(hist, x)
    t = quantile(hist, 0.4)
    assert torch.allclose((x.abs() <= t).float().mean(0), torch.full((5,), 0.4), atol=0.02)
    assert torch.allclose(cdf_at(hist, t).float(), torch.full((5,), 0.4), atol=1e-3)


def test_exact_zeros_fall_below_every_threshold():
    x = torch.cat([torch.zeros(500), lognormal((500,))])[:, None]
    hist = new_histogram(1, POOLED_BINS)
    update_histogram(hist, x)
    assert quantile(hist, 0.3)[0] == 0  # 50% zeros: any q below .5 keeps only nonzeros
    assert (x.abs() <= quantile(hist, 0.7)[0]).float().mean() == pytest.approx(0.7, abs=3e-3)


def test_chess_thresholds_scale_inversely_with_up_magnitude():
    act = lognormal((5000, 6), seed=1).abs()
    up_mean = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, 8.0])
    hist = new_histogram(6, CHANNEL_BINS)
    update_histogram(hist, act)
    stats = {"hist_channel.act": hist, "mean.up": up_mean}
    t = Chess(FAMILIES[0]).fit(stats, "act", 0.5)
    # One importance quantile q: t_i * E|up_i| is the same for every channel.
    assert torch.allclose(t * up_mean, (t * up_mean)[0].expand(6), rtol=1e-5)
    assert (act <= t).float().mean().item() == pytest.approx(0.5, abs=0.01)
    cut = (act <= t).float().mean(0)
    assert cut[0] > cut[-1]  # a neuron whose up output is small is cut more often


def test_wina_threshold_is_per_channel_division_by_column_norm():
    scores = lognormal((2000, 4)).abs()
    hist = new_histogram(1, POOLED_BINS)
    colnorm = torch.tensor([0.5, 1.0, 2.0, 4.0])
    update_histogram(hist, scores * colnorm)
    t = Wina(FAMILIES[0]).fit({"hist.q_proj": hist, "colnorm.q_proj": colnorm}, "q_proj", 0.6)
    assert t.shape == (4,)
    assert ((scores <= t).float().mean().item()) == pytest.approx(0.6, abs=3e-3)


def test_builtin_splits_are_disjoint():
    for source in ("pydoc", "austen"):
        cal, ev = builtin_texts(source, "calibration"), builtin_texts(source, "eval")
        assert cal and ev and not set(cal) & set(ev)
    assert sum(len(t) for t in builtin_texts("austen", "eval")) > 400_000  # Persuasion


def test_user_text_files_and_lists(tmp_path):
    (tmp_path / "a.txt").write_text("Plain text document.")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "From jsonl."}) + "\n\n")
    assert sorted(load_texts(tmp_path)) == ["From jsonl.", "Plain text document."]
    assert load_texts(["x", "", "y"]) == ["x", "y"]
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(CalibrationError, match="bad.jsonl:1.*'text'"):
        load_texts(tmp_path / "bad.jsonl")


def test_datasets_dataset_is_accepted():
    import datasets
    ds = datasets.Dataset.from_dict({"text": ["one doc", "two doc"], "id": [1, 2]})
    assert load_texts(ds) == ["one doc", "two doc"]
    with pytest.raises(CalibrationError, match="text_field"):
        load_texts(ds.remove_columns("text"))


def test_registry_names_every_required_family():
    names = {f.name for f in FAMILIES}
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3",
            "olmo"} <= names


def test_calibration_passes_skip_the_lm_head_and_keep_the_statistics():
    """The observed passes run the decoder without its LM head (no observer reads logits) and
    collect the same statistics as a pass through the whole model."""
    from unittest import mock

    import sparseffn
    from sparseffn.calibration import collect_statistics
    from sparseffn.families import family_of
    from sparseffn.methods import get_method
    from sparseffn.testing import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(3, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
    sparseffn.sparsify(model, "teal", 0.5, ids, scope="all", n_tokens=1024, progress=False)
    head_calls = []
    model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    spec = family_of(model)
    method = get_method("teal", spec)
    stats = collect_statistics(model, spec, method, "all", ids, progress=False)
    assert head_calls == []
    # The same pass through the whole model, head included (base_model made the model itself).
    with mock.patch.object(type(model), "base_model", property(lambda self: self)):
        whole = collect_statistics(model, spec, method, "all", ids, progress=False)
    assert head_calls  # the head did run this time
    assert stats.keys() == whole.keys()
    assert all(torch.equal(stats[k], whole[k]) for k in stats)
