"""lm-eval drives the patched built-in model offline: rolling perplexity, multiple choice and
generate-until requests, the sparsity report read after the run, and the CLI around it."""
from __future__ import annotations

import csv
import json

import pytest

import sparseffn
from sparseffn.cli import main
from sparseffn.eval import harness

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not harness.lm_eval_available(),
                                 reason="lm-eval is a dev extra: pip install -e .[dev]")]

TASKS = harness.offline_task_names(("pydoc",))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return harness.write_offline_tasks(("pydoc",), items=40,
                                       folder=tmp_path_factory.mktemp("tasks"))


def test_offline_tasks_are_written_whole_and_deterministic(folder, tmp_path):
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{t}.{ext}" for t in TASKS for ext in ("jsonl", "yaml"))
    again = harness.write_offline_tasks(("pydoc",), items=40, folder=tmp_path)
    for t in TASKS:
        assert (folder / f"{t}.jsonl").read_text() == (again / f"{t}.jsonl").read_text()
    docs = [json.loads(line) for line in (folder / "sparseffn_nextsent_pydoc.jsonl").open()]
    assert len(docs) == 40 and all(len(d["choices"]) == 4 for d in docs)
    assert all(0 <= d["label"] < 4 and d["choices"][d["label"]] for d in docs)
    with pytest.raises(sparseffn.SparseFFNError, match="built-in sources"):
        harness.offline_task_names(("wikitext",))


def test_patched_model_through_all_three_request_types(builtin, folder):
    model, tokenizer = builtin
    dense = harness.run_lm_eval(model, tokenizer, TASKS, include_path=folder, limit=6)
    calib = sparseffn.load_texts("pydoc", "calibration")
    sparseffn.sparsify(model, "chess", 0.5, calib, tokenizer=tokenizer, n_tokens=2048,
                       progress=False)
    try:
        sparseffn.reset_sparsity_stats(model)
        assert not sparseffn.sparsity_report(model).observed
        sparse = harness.run_lm_eval(model, tokenizer, TASKS, include_path=folder, limit=6)
        report = sparseffn.sparsity_report(model)
        # Every request ran through the patched modules: the report moved to the target.
        assert report.observed and report.overall == pytest.approx(0.5, abs=0.1)
    finally:
        sparseffn.unsparsify(model)
    for results in (dense, sparse):
        assert set(results) == set(TASKS)
        assert results["sparseffn_ppl_pydoc"]["word_perplexity"] > 1
        assert 0 <= results["sparseffn_nextsent_pydoc"]["acc"] <= 1
        assert "acc_stderr" in results["sparseffn_nextsent_pydoc"]
        assert 0 <= results["sparseffn_lastword_pydoc"]["exact_match"] <= 1
    # Half the MLP neurons gone costs perplexity on held-out text.
    assert sparse["sparseffn_ppl_pydoc"]["word_perplexity"] > \
        dense["sparseffn_ppl_pydoc"]["word_perplexity"]


def test_generation_requests_through_the_lean_loop_score_the_same(builtin, folder,
                                                                monkeypatch):
    """lm-eval's generate_until (its stop strings as stopping criteria, padded batches) routed
    through the lean loop gives the same answers as transformers' loop."""
    from sparseffn import hf_generate

    model, tokenizer = builtin
    calib = sparseffn.load_texts("pydoc", "calibration")
    sparseffn.sparsify(model, "teal", 0.5, calib, tokenizer=tokenizer, n_tokens=1024,
                       progress=False)
    try:
        task = ["sparseffn_lastword_pydoc"]
        plain = harness.run_lm_eval(model, tokenizer, task, include_path=folder, limit=8)
        calls = []
        real = hf_generate.lean_generate

        def spy(*args, **kwargs):
            calls.append(kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(hf_generate, "ROUTED_DEVICES", ("cuda", "cpu"))
        monkeypatch.setattr(hf_generate, "lean_generate", spy)
        routed = harness.run_lm_eval(model, tokenizer, task, include_path=folder, limit=8)
    finally:
        sparseffn.unsparsify(model)
    assert calls and calls[0]["stopping_criteria"] is not None
    assert routed == plain


def test_patched_at_sparsity_zero_scores_like_the_original(builtin, folder):
    model, tokenizer = builtin
    tasks = ["sparseffn_ppl_pydoc", "sparseffn_nextsent_pydoc"]
    dense = harness.run_lm_eval(model, tokenizer, tasks, include_path=folder, limit=4)
    calib = sparseffn.load_texts("pydoc", "calibration")
    sparseffn.sparsify(model, "teal", 0.0, calib, tokenizer=tokenizer, scope="all",
                       n_tokens=1024, progress=False, kernel_mode="never")
    try:
        same = harness.run_lm_eval(model, tokenizer, tasks, include_path=folder, limit=4)
    finally:
        sparseffn.unsparsify(model)
    assert same == dense


def test_cli_lm_eval_sweep_writes_rows(tmp_path, builtin, capsys):
    out = tmp_path / "r.csv"
    code = main(["eval", "--harness", "lm-eval", "--methods", "cats", "--sparsities", "0.5",
                 "--data", "pydoc", "--eval-data", "pydoc", "--tokens", "1024", "--seq-len",
                 "256", "--items", "20", "--limit", "3", "--csv", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    assert code == 0 and "sparseffn_nextsent_pydoc (acc)" in text
    rows = list(csv.DictReader(out.open()))
    assert {r["method"] for r in rows} == {"dense", "cats"}
    assert {r["task"] for r in rows} == set(TASKS)
    cats = [r for r in rows if r["method"] == "cats"]
    assert float(cats[0]["measured"]) == pytest.approx(0.5, abs=0.1)
    assert all(r["harness"].startswith("lm-eval ") for r in rows)


def test_cli_refuses_lm_eval_options_without_the_harness(capsys):
    code = main(["eval", "--limit", "3", "--device", "cpu", "--data", "pydoc"])
    assert code == 2 and "--harness lm-eval" in capsys.readouterr().err
