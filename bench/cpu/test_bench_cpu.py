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
