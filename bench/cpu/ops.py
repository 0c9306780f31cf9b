"""The CPU decode op on its own: the input-sparse product against ``F.linear`` on this CPU.

    python -m bench.cpu.ops --shapes llama3-8b smollm2 --sparsities 0 0.5 0.9 --threads 2
    python -m bench.cpu.ops --against HEAD~1     # and the op as built from another commit
    python -m bench.cpu.ops --patterns           # half the rows, contiguous or scattered

For each weight shape of the model (q/k/v/o/gate/up/down, input-major as the sparse modules hold
them) and sparsity, it times one decode product (batch 1, float32, a threshold at that quantile
of |x|) over enough weight copies that they never fit in the last-level cache, as in a decode
step, and ``F.linear`` over the same weights out-major (the dense model's call). Each point is
the median of ``--rounds`` rounds, the builds and ``F.linear`` interleaved within a round (an
``F.linear`` pass before each build's, so that each starts with its weights and their page-table
entries out of the caches), each build leading its rounds in turn, so that neither a slow
stretch of a shared machine nor a place in the order favours a variant. ``--against REV`` builds
``triton_kernels/cpu/ops.cpp`` as of that git revision beside the working tree's, to measure a
change of the op in one run. Columns: ``us`` per call, ``gbps`` over the bytes the call needs
(active rows only), and ``speedup`` over ``F.linear``. ``--patterns`` instead times the current
op with half the rows active in several arrangements (``PATTERNS``): the same bytes, contiguous
or scattered.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.e2e.shapes import SHAPES
from sparseffn.eval.sweep import write_csv
from triton_kernels.cpu import build

#: Weight bytes per point: several times a server's last-level cache.
COPY_BYTES = 300e6
#: The benchmark's model shapes, plus the built-in SmolLM2-135M's.
MODEL_SHAPES = {**SHAPES, "smollm2": dict(hidden_size=576, intermediate_size=1536,
                                          num_attention_heads=9, num_key_value_heads=3)}


def _compile(source: Path, out: Path) -> ctypes.CDLL:
    cxx = build.compiler()
    if cxx is None:
        raise SystemExit("no C++ compiler found: the CPU ops need one (e.g. apt-get install g++)")
    try:
        build._build(cxx, out, source)
    except build.CpuOpsUnavailable as e:
        raise SystemExit(str(e)) from None
    lib = ctypes.CDLL(str(out))
    build._declare(lib)
    return lib


def builds(against: list[str], workdir: Path) -> dict[str, ctypes.CDLL]:
    """The working tree's op, and the op of each revision in ``against``, keyed by name."""
    libs = {"current": _compile(build.SOURCE, workdir / "current.so")}
    for rev in against:
        src = subprocess.run(["git", "show", f"{rev}:triton_kernels/cpu/ops.cpp"],
                             capture_output=True, text=True, cwd=build.SOURCE.parent)
        if src.returncode != 0:
            raise SystemExit(f"cannot read ops.cpp at {rev!r}: {src.stderr.strip()}")
        path = workdir / f"ops_{len(libs)}.cpp"
        path.write_text(src.stdout)
        libs[rev] = _compile(path, workdir / f"ops_{len(libs)}.so")
    return libs


def _product(lib: ctypes.CDLL, x: torch.Tensor, w_t: torch.Tensor, thr: torch.Tensor,
             y: torch.Tensor) -> None:
    """y [1, N] = x [1, K] over its entries above thr, times w_t [K, N] (float32)."""
    k, n = w_t.shape
    lib.sfn_input_sparse(1, k, n, x.data_ptr(), w_t.data_ptr(), w_t.stride(0), 0,
                         thr.data_ptr(), 1, 0, 0, y.data_ptr(), n, 0, torch.get_num_threads())


def weight_shapes(shape: str) -> list[tuple[str, int, int]]:
    """(name, K, N) of the distinct input-sparse products of one decoder layer."""
    c = MODEL_SHAPES[shape]
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * c.get("head_dim", h // c["num_attention_heads"])
    out = [("q/o", h, h), ("k/v", h, kv), ("gate/up", h, i), ("down", i, h)]
    seen, unique = set(), []
    for name, k, n in out:
        if (k, n) not in seen:
            seen.add((k, n))
            unique.append((name, k, n))
    return unique


def _cold_weights(k: int, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """COPY_BYTES of random weights: input-major [k, n] copies for the op, and the same
    out-major for ``F.linear``."""
    w_ts = [torch.randn(k, n) for _ in range(max(4, int(COPY_BYTES / (k * n * 4))))]
    return w_ts, [w.t().contiguous() for w in w_ts]


def _us_per_call(call, weights: list[torch.Tensor]) -> float:
    """Microseconds per ``call(w)``, averaged over one pass through ``weights``."""
    t = time.perf_counter()
    for w in weights:
        call(w)
    return (time.perf_counter() - t) / len(weights) * 1e6


def time_point(libs: dict[str, ctypes.CDLL], k: int, n: int, sparsity: float,
               rounds: int) -> dict[str, float]:
    """Median microseconds per call of each build and of F.linear at one shape and sparsity."""
    w_ts, ws = _cold_weights(k, n)
    x = torch.randn(1, k)
    thr = torch.tensor([float(torch.quantile(x.abs(), sparsity)) if sparsity > 0 else 0.0])
    y = torch.empty(1, n)
    ref = torch.where(x.abs() > thr, x, 0.0) @ w_ts[0]
    for name, lib in libs.items():  # every build computes the same product
        _product(lib, x, w_ts[0], thr, y)
        if not torch.allclose(y, ref, rtol=1e-4, atol=1e-3):
            raise SystemExit(f"build {name!r} computes a wrong product at K={k} N={n}")
    runs: dict[str, list[float]] = {name: [] for name in [*libs, "F.linear"]}
    names = list(libs)
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:  # each build leads in turn
            # F.linear's pass before each build's leaves every build the same state: its own
            # weights, and their page-table entries, out of the caches, as in a decode step.
            runs["F.linear"].append(_us_per_call(lambda w: F.linear(x, w), ws))
            runs[name].append(_us_per_call(
                lambda w_t, lib=libs[name]: _product(lib, x, w_t, thr, y), w_ts))
    return {name: statistics.median(v) for name, v in runs.items()}


#: Which half of the rows is active, for ``--patterns`` (plus "all rows" for reference).
PATTERNS = ("all rows", "first half", "blocks of 32", "blocks of 8", "alternate", "random")


def half_active(pattern: str, k: int) -> torch.Tensor:
    """x [1, k] whose entries above 0.5 (the threshold) are the rows ``pattern`` keeps."""
    idx = torch.arange(k)
    on = {"all rows": idx >= 0, "first half": idx < k // 2,
          "blocks of 32": (idx // 32) % 2 == 0, "blocks of 8": (idx // 8) % 2 == 0,
          "alternate": idx % 2 == 0,
          "random": torch.zeros(k, dtype=torch.bool).index_fill_(0, torch.randperm(k)[:k // 2],
                                                                 True)}[pattern]
    return torch.where(on, 1.0, 0.1)[None, :]


def time_patterns(lib: ctypes.CDLL, k: int, n: int, rounds: int) -> dict[str, float]:
    """Median microseconds of one product with half the rows active in each of PATTERNS: what
    scattering the same bytes costs (an F.linear pass before each, as in time_point)."""
    w_ts, ws = _cold_weights(k, n)
    thr, y = torch.tensor([0.5]), torch.empty(1, n)
    xs = {p: half_active(p, k) for p in PATTERNS}
    runs: dict[str, list[float]] = {p: [] for p in PATTERNS}
    for _ in range(rounds):
        for p, x in xs.items():
            _us_per_call(lambda w: F.linear(x, w), ws)
            runs[p].append(_us_per_call(lambda w_t: _product(lib, x, w_t, thr, y), w_ts))
    return {p: statistics.median(v) for p, v in runs.items()}


def sparsity_rows(libs: dict[str, ctypes.CDLL], shapes: list[str], sparsities: list[float],
                  threads: int, rounds: int) -> list[dict]:
    """One row per shape, weight, sparsity and build (printed as it goes)."""
    rows = []
    for shape in shapes:
        for name, k, n in weight_shapes(shape):
            for s in sparsities:
                us = time_point(libs, k, n, s, rounds)
                need = k * n * 4 * (1 - s) / 1e9
                for build_name in libs:
                    rows.append({"shape": shape, "weight": name, "K": k, "N": n,
                                 "sparsity": s, "build": build_name, "threads": threads,
                                 "torch": torch.__version__, "us": round(us[build_name], 1),
                                 "gbps": round(need / (us[build_name] * 1e-6), 1),
                                 "linear_us": round(us["F.linear"], 1),
                                 "speedup": round(us["F.linear"] / us[build_name], 3)})
                print(f"{shape:10s} {name:8s} K={k:<6d} N={n:<6d} s={s:.2f}  "
                      + "  ".join(f"{b} {us[b]:8.1f}us" for b in [*libs, "F.linear"]),
                      flush=True)
    return rows


def pattern_rows(lib: ctypes.CDLL, shapes: list[str], threads: int, rounds: int) -> list[dict]:
    """One row per shape, weight and pattern of PATTERNS (printed as it goes)."""
    rows = []
    for shape in shapes:
        for name, k, n in weight_shapes(shape):
            us = time_patterns(lib, k, n, rounds)
            rows += [{"shape": shape, "weight": name, "K": k, "N": n, "pattern": pat,
                      "threads": threads, "torch": torch.__version__, "us": round(t, 1)}
                     for pat, t in us.items()]
            print(f"{shape:10s} {name:8s} K={k:<6d} N={n:<6d} "
                  + "  ".join(f"{pat} {t:.1f}us" for pat, t in us.items()), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["llama3-8b", "smollm2"],
                   help=f"model shapes, of {sorted(MODEL_SHAPES)}")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.5, 0.9])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--against", nargs="*", default=[], metavar="REV",
                   help="also time the op as built from these git revisions")
    p.add_argument("--patterns", action="store_true",
                   help="instead: the current op with half the rows active, contiguous or "
                        "scattered in several ways (what scattering costs)")
    p.add_argument("--csv", type=Path)
    a = p.parse_args(argv)
    unknown = [s for s in a.shapes if s not in MODEL_SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}; choose from {sorted(MODEL_SHAPES)}")
    if any(not 0 <= s < 1 for s in a.sparsities):
        p.error("sparsities must lie in [0, 1)")
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        libs = builds(a.against, Path(tmp))
        rows = (pattern_rows(libs["current"], a.shapes, a.threads, a.rounds) if a.patterns
                else sparsity_rows(libs, a.shapes, a.sparsities, a.threads, a.rounds))
    if a.csv:
        write_csv(rows, a.csv, {})
    return 0


if __name__ == "__main__":
    sys.exit(main())
