"""pytest-benchmark cases for the kernels (CUDA only; skipped cleanly without a GPU).

    pytest bench/kernels --benchmark-enable

Each round replays a CUDA graph that calls the op once per weight copy (as the sweep does, so the
weights never sit in L2); ``extra_info`` holds the per-call time and the dense per-call time of
the same graph shape. The sweep (``python -m bench.kernels.sweep``) is the full measurement; these
cases are quick regression timings at the Llama-3-8B shape, batch 1.
"""
from __future__ import annotations

import pytest
import torch

from bench.kernels import cases as cs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("op,K,N", PARAMS, ids=[f"{o}-{k}x{n}" for o, k, n in PARAMS])
def test_dense_baseline(benchmark, op, K, N, dtype):
    case = cs.Case(op, "llama3-8b", K, N)
    dense0 = cs.dense_weights(case, dtype, "cuda")
    copies = [tuple(t.clone() for t in dense0) for _ in range(COPIES)]
    x = torch.randn(1, K, device="cuda").to(dtype)
    graph = _graph([lambda d=d: cs.dense_call(case, x, d) for d in copies])
    benchmark.extra_info.update(us_per_call=_replay_us(benchmark, graph))
