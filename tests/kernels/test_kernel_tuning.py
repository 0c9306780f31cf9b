"""The tuner's choice and cache, with a fake clock, so that no GPU is needed."""
from __future__ import annotations

import torch

from triton_kernels import LaunchConfig, tuning


def test_tuner_picks_smallest_worst_ratio_and_caches(monkeypatch):
    """A config best at one sparsity but 3x off at another loses to a steady one, also when the
    steady one's first timing at each sparsity is a 10x outlier (the fastest round counts)."""
    fast_dense, steady = LaunchConfig(16, 64), LaunchConfig(32, 64)
    times = {(fast_dense, 0.0): 1.0, (fast_dense, 0.5): 1.0, (fast_dense, 0.9): 3.0,
             (steady, 0.0): 1.1, (steady, 0.5): 1.1, (steady, 0.9): 1.1}
    calls = []

    def make_bench(sparsity):
        return lambda cfg: calls.append((cfg, sparsity))

    def fake_time(fn):
        fn()
        outlier = calls[-1][0] == steady and calls.count(calls[-1]) == 1
        return times[calls[-1]] * (10.0 if outlier else 1.0)

    monkeypatch.setattr(tuning, "tuning_enabled", lambda device: True)
    monkeypatch.setattr(tuning, "time_on_device", fake_time)
    key = ("test", 1, 63, 431, torch.float16, "cpu")
    monkeypatch.delitem(tuning._TUNED, key, raising=False)
    chosen = tuning.tuned_config(key, [fast_dense, steady], make_bench, torch.device("cpu"))
    assert chosen == steady
    rounds = tuning.TUNE_ROUNDS
    assert rounds >= 2
    assert len(calls) == 6 * rounds  # every candidate at every tuning sparsity, in each round
    assert tuning.tuned_config(key, [fast_dense, steady], make_bench,
                                torch.device("cpu")) == steady
    assert len(calls) == 6 * rounds  # cached: a second call (any sparsity) does not re-tune
    assert tuning.tuning_log()[-1]["chosen"] == steady
    monkeypatch.delitem(tuning._TUNED, key)
