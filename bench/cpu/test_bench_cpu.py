"""The CPU decode benchmark runs end to end on the built-in model (smoke run)."""
from __future__ import annotations

import csv

import pytest

from bench.cpu import decode

pytestmark = pytest.mark.slow


def test_cpu_decode_benchmark_writes_dense_and_sparse_rows(tmp_path, monkeypatch):
    from sparseffn import dispatch
    # The CPU decode path, not the Triton interpreter the tests set up for CPU tensors.
    monkeypatch.setitem(dispatch._AVAILABLE, "cpu", False)
    out = tmp_path / "cpu.csv"
    assert decode.main(["--methods", "topk", "--sparsities", "0.5", "--prompt", "8",
                        "--new-tokens", "4", "--repeats", "1", "--threads", "1",
                        "--csv", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["method"] for r in rows] == ["dense", "topk"]
    assert float(rows[1]["tok_s"]) > 0 and float(rows[1]["measured"]) == pytest.approx(0.5)
    assert rows[0]["threads"] == "1" and rows[0]["cpu"]


def test_cpu_op_benchmark_times_two_builds_against_f_linear(tmp_path, monkeypatch):
    from bench.cpu import ops
    from triton_kernels.cpu import build
    if build.compiler() is None:
        pytest.fail("no C++ compiler: the CPU ops (and this benchmark) need one")
    monkeypatch.setattr(ops, "COPY_BYTES", 4e6)  # a smoke run, not a measurement
    out = tmp_path / "ops.csv"
    assert ops.main(["--shapes", "tiny-llama", "--sparsities", "0", "0.5", "--rounds", "1",
                     "--threads", "1", "--against", "HEAD", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    # 4 distinct weight shapes x 2 sparsities x 2 builds
    assert len(rows) == 16 and {r["build"] for r in rows} == {"current", "HEAD"}
    assert all(float(r["us"]) > 0 and float(r["linear_us"]) > 0 for r in rows)
    assert ops.main(["--shapes", "tiny-llama", "--patterns", "--rounds", "1", "--threads", "1",
                     "--csv", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["pattern"] for r in rows[:len(ops.PATTERNS)]] == list(ops.PATTERNS)
    assert all(float(r["us"]) > 0 for r in rows)
    with pytest.raises(SystemExit):
        ops.main(["--shapes", "no-such-model"])
