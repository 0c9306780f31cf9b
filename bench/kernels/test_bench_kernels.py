"""The kernel benchmarks' own tests: CPU smoke runs of the sweep and the anatomy (so that CI
exercises the code the published numbers come from), checks of their arithmetic, and
pytest-benchmark cases (CUDA only; skipped cleanly without a GPU):

    pytest bench/kernels --benchmark-enable

Each benchmark round replays a CUDA graph that calls the op once per weight copy (as the sweep
does, so the weights never sit in L2); ``extra_info`` holds the per-call time and the dense
per-call time of the same graph shape. The sweep (``python -m bench.kernels.sweep``) is the full
measurement; these cases are quick regression timings at the Llama-3-8B shape, batch 1.
"""
from __future__ import annotations

import csv
import json

import pytest
import torch

from bench.kernels import anatomy, cases as cs, sweep
from bench.kernels.report import target_table

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Where the smoke runs find the kernels: the GPU where there is one (the interpreter is off
# there), else the CPU under TRITON_INTERPRET=1 (set by bench/conftest.py).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

def test_sweep_smoke_cpu(tmp_path):
    pytest.importorskip("matplotlib")
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


def test_sweep_smoke_grouped_and_oracle_cpu(tmp_path):
    """The grouped q/k/v and gate/up cases, their separate-call twins and the compacted cuBLAS
    oracle run through the sweep and check correct against the reference."""
    out = tmp_path / "sweep.csv"
    rc = sweep.main(["--device", "cpu", "--models", "tiny", "--batch", "1",
                     "--ops", ",".join(cs.GROUPED_OPS + cs.ORACLE_OPS),
                     "--sparsities", "0.5", "--replays", "1", "--dtypes", "fp16",
                     "--csv", str(out)])
    assert rc == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    # 4 grouped cases + the oracle cases in 2 directions
    assert len(rows) == 4 + 2 * len(cs.ORACLE_OPS)
    assert {r["op"] for r in rows} >= set(cs.ORACLE_OPS)
    assert all(r["correct"] == "True" and r["speedup"] for r in rows)
    q, kv = cs.ATTN["tiny"]
    assert {int(r["N"]) for r in rows if r["op"] == "qkv_grouped"} == {q + 2 * kv}


def test_anatomy_smoke(tmp_path):
    """The fixed-cost anatomy checks the GEMV against the reference and fits its line (at a
    tiny shape, and on the CPU with host timing: the numbers mean nothing, the plumbing is
    tested)."""
    out = tmp_path / "anatomy.json"
    assert anatomy.main(["--device", KERNEL_DEVICE, "--shapes", "96x160", "--dtype", "fp16",
                         "--sparsities", "0,0.5,0.9", "--replays", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "tuning" in result  # empty on the CPU, where nothing is tuned
    row = result["rows"][0]
    assert row["correct"]
    assert {"nothing_active_us", "fixed_us", "rate_tbps", "speedup_at_0.9"} <= set(row)
    assert set(row["fixed_us_allowed_by_target"]) == {"0.0", "0.5", "0.9"}


def test_anatomy_arguments_and_refusal(tmp_path):
    """The anatomy takes its arguments as given (what ``sparseffn bench anatomy`` forwards) and
    refuses, with exit code 2, a device where the kernels cannot run."""
    out = tmp_path / "a.json"
    assert anatomy.main(["--device", KERNEL_DEVICE, "--shapes", "64x96", "--dtype", "fp32",
                         "--sparsities", "0,0.5", "--replays", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["K"] == 64
    assert anatomy.main(["--device", "meta"]) == 2  # no kernels there: refused


def test_fit_line_recovers_a_line():
    a, b = anatomy.fit_line([1.0, 2.0, 4.0], [7.0 + 0.5 * x for x in (1.0, 2.0, 4.0)])
    assert abs(a - 7.0) < 1e-12 and abs(b - 0.5) < 1e-12


def test_report_targets_with_a_partial_sparsity_grid():
    """A sweep that skips some of the published levels (0.4, 0.6 ...) still gets its target
    table: prior points are counted over the levels it measured."""
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


COPIES = 8
H, I = cs.MODELS["llama3-8b"]
DIMS = {"input_sparse": [(H, I), (I, H)], "output_sparse": [(H, I), (I, H)],
        "mlp_threshold": [(H, I)], "mlp_mask": [(H, I)]}
PARAMS = [(op, K, N) for op, dims in DIMS.items() for K, N in dims]


def _graph(calls) -> torch.cuda.CUDAGraph:
    for c in calls:  # warm-up: compile and tune outside the capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    return graph


def _replay_us(benchmark, graph: torch.cuda.CUDAGraph) -> float:
    def run():
        graph.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
    stats = benchmark.stats
    return 1e6 * stats.stats.median / COPIES if stats is not None else float("nan")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("op,K,N", PARAMS, ids=[f"{o}-{k}x{n}" for o, k, n in PARAMS])
def test_sparse_op(benchmark, op, K, N, sparsity, dtype):
    case = cs.Case(op, "llama3-8b", K, N)
    dense0 = cs.dense_weights(case, dtype, "cuda")
    weights = [cs.sparse_weights(case, tuple(t.clone() for t in dense0)) for _ in range(COPIES)]
    p = cs.make_point(case, 1, sparsity, dtype, weights[0])
    err = cs.rel_error(cs.sparse_call(case, p, weights[0]), cs.reference(case, p, weights[0]))
    assert err <= cs.REL_TOL[dtype], f"wrong output (relative error {err:.2e}): not timed"
    graph = _graph([lambda w=w: cs.sparse_call(case, p, w) for w in weights])
    us = _replay_us(benchmark, graph)
    benchmark.extra_info.update(us_per_call=us, active_fraction=p.active_fraction)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("op,K,N", PARAMS, ids=[f"{o}-{k}x{n}" for o, k, n in PARAMS])
def test_dense_baseline(benchmark, op, K, N, dtype):
    case = cs.Case(op, "llama3-8b", K, N)
    dense0 = cs.dense_weights(case, dtype, "cuda")
    copies = [tuple(t.clone() for t in dense0) for _ in range(COPIES)]
    x = torch.randn(1, K, device="cuda").to(dtype)
    graph = _graph([lambda d=d: cs.dense_call(case, x, d) for d in copies])
    benchmark.extra_info.update(us_per_call=_replay_us(benchmark, graph))
