"""The tuner's choice and cache (with a fake clock, so no GPU is needed) and a CPU smoke run of
the benchmark sweep, so that CI exercises the code the H100 numbers come from."""
from __future__ import annotations

import csv

import pytest
import torch

from triton_kernels import LaunchConfig, _common


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

    monkeypatch.setattr(_common, "tuning_enabled", lambda device: True)
    monkeypatch.setattr(_common, "_time_on_device", fake_time)
    key = ("test", 1, 63, 431, torch.float16, "cpu")
    monkeypatch.delitem(_common._TUNED, key, raising=False)
    chosen = _common.tuned_config(key, [fast_dense, steady], make_bench, torch.device("cpu"))
    assert chosen == steady
    rounds = _common.TUNE_ROUNDS
    assert rounds >= 2
    assert len(calls) == 6 * rounds  # every candidate at every tuning sparsity, in each round
    assert _common.tuned_config(key, [fast_dense, steady], make_bench,
                                torch.device("cpu")) == steady
    assert len(calls) == 6 * rounds  # cached: a second call (any sparsity) does not re-tune
    assert _common.tuning_log()[-1]["chosen"] == steady
    monkeypatch.delitem(_common._TUNED, key)


def test_sweep_smoke_cpu(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.kernels import sweep

    out = tmp_path / "sweep.csv"
    # One sparsity: the plumbing is under test here (the kernels at 0 and 0.99 are tested in
    # their own files); each point runs every kernel through the interpreter.
    rc = sweep.main(["--device", "cpu", "--models", "tiny", "--batch", "1,3",
                     "--sparsities", "0.5", "--replays", "1", "--dtypes", "fp16",
                     "--csv", str(out), "--plot", str(tmp_path / "sweep")])
    assert rc == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    # 6 cases (2 GEMV ops x 2 directions + 2 MLP criteria) x 2 batches
    assert len(rows) == 12
    assert all(r["correct"] == "True" and r["speedup"] for r in rows)
    assert (tmp_path / "sweep_batch1.png").exists() and (tmp_path / "sweep_batch.png").exists()


def test_sweep_smoke_grouped_and_ab_ops_cpu(tmp_path):
    """The grouped q/k/v and gate/up cases, their separate-call twins, the A/B cases
    (temporary accumulators, programmatic dependent launch) and the compacted cuBLAS oracle run
    through the sweep and check correct against the reference."""
    from bench.kernels import cases as cs, sweep

    out = tmp_path / "sweep.csv"
    rc = sweep.main(["--device", "cpu", "--models", "tiny", "--batch", "1",
                     "--ops", ",".join(cs.GROUPED_OPS + cs.AB_OPS + cs.ORACLE_OPS),
                     "--sparsities", "0.5", "--replays", "1", "--dtypes", "fp16",
                     "--csv", str(out)])
    assert rc == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    # 4 grouped cases + the A/B and oracle cases in 2 directions
    assert len(rows) == 4 + 2 * len(cs.AB_OPS + cs.ORACLE_OPS)
    assert {r["op"] for r in rows} >= set(cs.AB_OPS + cs.ORACLE_OPS)
    assert all(r["correct"] == "True" and r["speedup"] for r in rows)
    q, kv = cs.ATTN["tiny"]
    assert {int(r["N"]) for r in rows if r["op"] == "qkv_grouped"} == {q + 2 * kv}


# Where the anatomy's smoke runs find the kernels: the GPU where there is one (the interpreter
# is off there), else the CPU under TRITON_INTERPRET=1.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_anatomy_smoke(tmp_path):
    """The fixed-cost anatomy runs every launch variant, checks each against the reference and
    fits its line (at a tiny shape, and on the CPU with host timing: the numbers mean nothing,
    the plumbing is tested)."""
    import json

    from bench.kernels import anatomy

    out = tmp_path / "anatomy.json"
    assert anatomy.main(["--device", KERNEL_DEVICE, "--shapes", "96x160", "--dtype", "fp16",
                         "--sparsities", "0,0.5,0.9", "--replays", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "tuning" in result  # empty on the CPU, where nothing is tuned
    row = result["rows"][0]
    for variant in anatomy.VARIANTS:
        assert row[variant]["correct"], variant
        assert {"nothing_active_us", "fixed_us", "rate_tbps", "speedup_at_0.9"} <= set(row[variant])
    assert set(row["fixed_us_allowed_by_target"]) == {"0.0", "0.5", "0.9"}


def test_cli_forwards_to_the_kernel_benchmarks(tmp_path):
    """`sparseffn bench anatomy ...` runs the anatomy with the arguments as given (and its exit
    code); other commands still reject arguments they do not know."""
    import json

    from sparseffn.cli import main

    out = tmp_path / "a.json"
    assert main(["bench", "anatomy", "--device", KERNEL_DEVICE, "--shapes", "64x96",
                 "--dtype", "fp32",
                 "--sparsities", "0,0.5", "--replays", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["K"] == 64
    assert main(["bench", "anatomy", "--device", "meta"]) == 2  # no kernels there: refused
    with pytest.raises(SystemExit):
        main(["eval", "--no-such-option"])


def test_fit_line_recovers_a_line():
    from bench.kernels.anatomy import fit_line
    a, b = fit_line([1.0, 2.0, 4.0], [7.0 + 0.5 * x for x in (1.0, 2.0, 4.0)])
    assert abs(a - 7.0) < 1e-12 and abs(b - 0.5) < 1e-12


def test_report_targets_with_a_partial_sparsity_grid():
    """A sweep that skips some of the published levels (0.4, 0.6 ...) still gets its target
    table: prior points are counted over the levels it measured."""
    from bench.kernels.report import target_table

    rows = [{"op": "input_sparse", "model": "llama3-8b", "K": "4096", "N": "14336",
             "dtype": "bfloat16", "batch": "1", "sparsity": str(s), "speedup": str(x),
             "frac_of_bound": "0.5"}
            for s, x in ((0.0, 0.9), (0.25, 1.1), (0.5, 1.9), (0.9, 6.0))]
    table = target_table(rows)
    line = table.splitlines()[-1]
    assert "0.90 (miss)" in line and "1.90 |" in line and "6.00 |" in line
    assert line.count("/3") == 2  # 0.25, 0.5 and 0.9 of each published curve


def test_oracle_operands_are_the_needed_inputs_only():
    """The oracle's timed call reads only the union of active inputs (A columns of W) and, with
    each sequence's own inactive entries zeroed, computes the input-sparse reference; a
    mistake in the compaction (a column dropped, a per-sequence mask ignored) fails here."""
    from bench.kernels import cases as cs

    torch.manual_seed(0)
    case = cs.Case("input_sparse_oracle", "tiny", 63, 431)
    w = cs.sparse_weights(case, cs.dense_weights(case, torch.float32, "cpu"))
    p = cs.make_point(case, 3, 0.6, torch.float32, w)
    x_c, w_c = cs.bind(case, p, w)
    union = round(p.active_fraction * case.K)
    assert 0 < union < case.K and x_c.shape == (3, union) and w_c.shape == (case.N, union)
    ref = cs.reference(case, p, w)
    assert cs.rel_error(cs.sparse_call(case, p, (x_c, w_c)), ref) < 1e-6
    dense = torch.nn.functional.linear(p.x, w[0])  # every input counted: far from the reference
    assert cs.rel_error(dense, ref) > 0.1
