"""allocation="layers": levels spread across layers against their measured sensitivity, the
mean at the target; saved, reloaded and refitted like any calibration."""
from __future__ import annotations

import pytest
import torch

import sparseffn
from calibrate.allocate import MAX_SITE_SPARSITY, layer_levels
from calibrate.fit import split_key
from sparseffn.testing import tiny_model


def test_levels_keep_the_mean_and_follow_sensitivity():
    sens = [0.4, 0.07, 0.01, 0.03, 0.2]
    levels = layer_levels(sens, 0.5, 0.1)
    assert sum(levels) / len(levels) == pytest.approx(0.5, abs=1e-5)
    order = sorted(range(5), key=lambda i: sens[i])  # least sensitive first
    assert [levels[i] for i in order] == sorted(levels, reverse=True)
    assert layer_levels(sens, 0.5, 0.0) == [0.5] * 5
    capped = layer_levels([100.0, 1e-9, 1e-9], 0.8, 0.5)
    assert max(capped) <= MAX_SITE_SPARSITY
    assert sum(capped) / 3 == pytest.approx(0.8, abs=1e-3)


def test_sparsify_with_layer_allocation(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(3, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
    sparseffn.sparsify(model, "teal", 0.5, ids, scope="all", allocation="layers",
                       n_tokens=1024, progress=False, kernel_mode="never")
    cal = sparseffn.get_calibration(model)
    per_layer: dict[int, set[float]] = {}
    for key, level in cal.sparsities.items():
        per_layer.setdefault(split_key(key)[0], set()).add(round(level, 6))
    assert all(len(v) == 1 for v in per_layer.values())  # one level per layer
    levels = [next(iter(v)) for _, v in sorted(per_layer.items())]
    assert sum(levels) / len(levels) == pytest.approx(0.5, abs=1e-4)
    sparseffn.reset_sparsity_stats(model)
    with torch.no_grad():
        model(input_ids=ids[:2])
    assert sparseffn.sparsity_report(model).overall == pytest.approx(0.5, abs=0.05)
    # Saved and loaded as it is; refitted with each layer's offset kept.
    path = sparseffn.save_calibration(model, tmp_path / "c")
    sparseffn.set_sparsity(model, 0.4)
    moved = sparseffn.get_calibration(model).sparsities
    for key, level in moved.items():
        if 0 < level < MAX_SITE_SPARSITY:
            assert level == pytest.approx(cal.sparsities[key] - 0.1, abs=1e-4)
    sparseffn.unsparsify(model)
    sparseffn.sparsify(model, calibration=path)
    assert sparseffn.get_calibration(model).sparsities == cal.sparsities
    sparseffn.unsparsify(model)


def test_layer_allocation_refuses_per_layer_overrides():
    with pytest.raises(sparseffn.SparseFFNError, match="allocation='layers'"):
        sparseffn.SparsityConfig(method="teal", allocation="layers", layer_sparsity={0: 0.3})
    for method in ("topk", "predictor"):
        with pytest.raises(sparseffn.SparseFFNError, match="Use 'uniform'"):
            sparseffn.SparsityConfig(method=method, allocation="layers")
