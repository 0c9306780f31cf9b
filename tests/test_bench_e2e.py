"""The end-to-end benchmark runs through its CLI on a tiny model (CPU smoke run): every point
has a measured sparsity near its target, and dense rows compare with themselves."""
from __future__ import annotations

import csv

from sparseffn.cli import main


def test_bench_e2e_cli_smoke(tmp_path):
    out = tmp_path / "e2e.csv"
    rc = main(["bench", "e2e", "--shape", "tiny-llama", "--dtype", "float32", "--device", "cpu",
               "--methods", "cats", "teal:all", "predictor",
               "--sparsities", "0.5", "--harnesses", "lean",
               "--batches", "1", "--prompts", "16", "--new-tokens", "4", "--repeats", "1",
               "--calib-tokens", "1024", "--calib-seq-len", "128", "--kernel-mode", "never",
               "--csv", str(out), "--plot", str(tmp_path / "e2e.png")])
    assert rc == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["method"] for r in rows] == ["dense", "cats", "teal", "predictor"]
    for r in rows[1:]:
        assert abs(float(r["measured_sparsity"]) - 0.5) < 0.05
        assert float(r["tok_s"]) > 0 and float(r["dense_tok_s"]) == float(rows[0]["tok_s"])
    assert (tmp_path / "e2e.png").stat().st_size > 0
