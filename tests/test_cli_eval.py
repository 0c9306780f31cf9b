"""CLI and evaluation on the real built-in model."""
from __future__ import annotations

import pytest

import sparseffn
from sparseffn.cli import main
from sparseffn.data import load_texts
from sparseffn.eval.sweep import plot, quality_sweep, write_csv
from sparseffn.eval.tasks import LastWordTask, NextSentenceTask

pytestmark = pytest.mark.slow


def test_cli_calibrate_writes_a_loadable_artifact(tmp_path, builtin, capsys):
    out = tmp_path / "calib"
    code = main(["calibrate", "--method", "cats", "--sparsity", "0.4", "--data", "pydoc",
                 "--tokens", "1024", "--seq-len", "256", "--out", str(out), "--device", "cpu"])
    assert code == 0 and "saved cats" in capsys.readouterr().out
    model, _ = builtin
    sparseffn.sparsify(model, calibration=out)
    try:
        assert sparseffn.get_calibration(model).config.sparsity == 0.4
    finally:
        sparseffn.unsparsify(model)


def test_cli_reports_bad_input_cleanly(tmp_path, capsys):
    code = main(["calibrate", "--sparsity", "1.2", "--out", str(tmp_path / "x"), "--device",
                 "cpu", "--data", "pydoc"])
    assert code == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_tasks_are_deterministic_and_beat_chance(builtin):
    model, tokenizer = builtin
    texts = load_texts("austen", "eval")
    task = NextSentenceTask(tokenizer, texts, n_items=60)
    assert task.items == NextSentenceTask(tokenizer, texts, n_items=60).items
    assert task.evaluate(model) > 0.3  # chance is 0.25; the dense model scores about 0.45
    assert LastWordTask(tokenizer, texts, n_items=60).evaluate(model) > 0.05  # about 0.17


def test_quality_sweep_rows_csv_and_plot(tmp_path, builtin):
    model, tokenizer = builtin
    texts = load_texts("pydoc", "eval")
    rows = quality_sweep(model, tokenizer, ["topk", "cats"], [0.0, 0.5], "pydoc", texts,
                         eval_tokens=512, seq_len=256, n_tokens=1024, n_items=8,
                         log=lambda _: None)
    assert [r.method for r in rows] == ["dense", "topk", "topk", "cats", "cats"]
    dense = rows[0].perplexity
    assert rows[1].perplexity == pytest.approx(dense, rel=1e-4)  # top-k keeping all neurons
    assert rows[2].perplexity > rows[1].perplexity and rows[2].measured == pytest.approx(0.5)
    write_csv(rows, tmp_path / "r.csv", {"device": "cpu"})
    assert (tmp_path / "r.csv").read_text().count("\n") == 6
    plot(rows, tmp_path / "r.png", "test")
    assert (tmp_path / "r.png").stat().st_size > 10_000
    assert not sparseffn.is_sparsified(model)


def test_quality_sweep_scores_decode_steps_for_methods_that_decide_at_the_prompt(builtin):
    """With a prompt length, dense and every method are read on the decode steps; coreinfer's
    tasks are not measured (NaN) and its sparsity is the decode steps' own."""
    import math

    model, tokenizer = builtin
    texts = load_texts("pydoc", "eval")
    rows = quality_sweep(model, tokenizer, ["coreinfer", "topk"], [0.0, 0.5], "pydoc", texts,
                         eval_tokens=512, seq_len=128, n_tokens=1024, n_items=4,
                         log=lambda _: None, prompt_len=96)
    assert [r.method for r in rows] == ["dense", "coreinfer", "coreinfer", "topk", "topk"]
    dense = rows[0].perplexity
    assert rows[1].perplexity == pytest.approx(dense, rel=1e-4)  # coreinfer keeping all
    assert rows[2].perplexity > rows[3].perplexity and rows[2].measured == pytest.approx(0.5)
    assert math.isnan(rows[2].next_sentence) and not math.isnan(rows[4].next_sentence)
    assert rows[4].perplexity > rows[3].perplexity == pytest.approx(dense, rel=1e-4)
    assert not sparseffn.is_sparsified(model)
