"""How ``sparsify`` reads what it is given: config or keywords (never both), the tokenizer
from the model's own folder, BOS-first windows for families that expect them."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import sparseffn
from sparseffn.data import token_windows
from sparseffn.families import window_bos
from sparseffn.testing import tiny_model

CALIB = dict(n_tokens=1024, seq_len=128, progress=False)


def test_config_and_keywords_together_are_refused(texts, tokenizer):
    model = tiny_model("llama")
    config = sparseffn.SparsityConfig(method="cats", sparsity=0.4)
    for kwargs in ({"sparsity": 0.6}, {"method": "teal"}, {"scope": "all"},
                   {"allocation": "greedy"}):
        with pytest.raises(sparseffn.SparseFFNError, match="either config= or"):
            sparseffn.sparsify(model, calibration=texts, tokenizer=tokenizer, config=config,
                               **kwargs, **CALIB)
    assert not sparseffn.is_sparsified(model)
    sparseffn.sparsify(model, calibration=texts, tokenizer=tokenizer, config=config, **CALIB)
    assert sparseffn.get_calibration(model).config.sparsity == 0.4


def test_tokenizer_comes_from_the_model_folder(tmp_path, texts, tokenizer):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    sparseffn.sparsify(loaded, "cats", 0.5, texts, **CALIB)  # no tokenizer= given
    with_tok = tiny_model("llama")
    sparseffn.sparsify(with_tok, "cats", 0.5, texts, tokenizer=tokenizer, **CALIB)
    assert torch.equal(sparseffn.get_calibration(loaded).thresholds["layers.0.act"],
                       sparseffn.get_calibration(with_tok).thresholds["layers.0.act"])
    in_memory = tiny_model("llama")  # no folder: the error names the fix
    with pytest.raises(sparseffn.CalibrationError, match="pass tokenizer="):
        sparseffn.sparsify(in_memory, "cats", 0.5, texts, **CALIB)


def test_windows_start_with_bos_only_where_the_family_expects_it(texts, tokenizer):
    gemma, llama = tiny_model("gemma"), tiny_model("llama")
    assert window_bos(llama, tokenizer) is None
    bos = window_bos(gemma, tokenizer)
    assert bos == tokenizer.bos_token_id
    windows = token_windows(tokenizer, texts, 1024, 128, bos=bos)
    assert windows.shape == (8, 128) and bool((windows[:, 0] == bos).all())
    plain = token_windows(tokenizer, texts, 1024, 127)
    assert torch.equal(windows[:, 1:], plain)  # the same text after the BOS


def test_the_library_calls_no_package_manager():
    """Built-in sources that need a download are fetched by scripts/fetch_texts.py; the only
    subprocesses the library starts are the CLI's benchmark runner and the C++ compiler that
    builds the CPU decode ops (triton_kernels/cpu/build.py)."""
    root = Path(__file__).resolve().parents[1]
    for folder in ("sparseffn", "calibrate", "triton_kernels"):
        for path in (root / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                     for a in n.names}
            strings = {n.value for n in ast.walk(tree)
                       if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            if path.name not in ("cli.py", "build.py"):
                assert "subprocess" not in names, path
            assert not strings & {"apt-get", "pip", "dpkg-deb"}, path


def test_report_before_any_token_says_so():
    model = tiny_model("llama")
    sparseffn.sparsify(model, "topk", 0.5, progress=False)
    report = sparseffn.sparsity_report(model)
    assert not report.observed and "no tokens observed yet" in report.table()
    with torch.no_grad():
        model(input_ids=torch.randint(3, 1000, (1, 8)))
    report = sparseffn.sparsity_report(model)
    assert report.observed and "0.500" in report.table()


def test_token_ids_outside_the_vocabulary_are_refused():
    model = tiny_model("llama")
    ids = torch.randint(3, 1000, (8, 128))
    ids[3, 5] = model.config.vocab_size
    with pytest.raises(sparseffn.CalibrationError, match="outside the model's vocabulary"):
        sparseffn.sparsify(model, "cats", 0.5, ids, **CALIB)
    assert not sparseffn.is_sparsified(model)


def test_short_calibration_text_is_announced(tokenizer):
    model = tiny_model("llama")
    text = [" ".join(["The quick brown fox jumps over the lazy dog."] * 150)]
    with pytest.warns(UserWarning, match="fewer than n_tokens=16384"):
        sparseffn.sparsify(model, "cats", 0.5, text, tokenizer=tokenizer, n_tokens=16384,
                           seq_len=128, progress=False)


def test_saved_files_share_their_permissions(tmp_path):
    model = tiny_model("llama")
    sparseffn.sparsify(model, "topk", 0.5, progress=False)
    path = sparseffn.save_calibration(model, tmp_path / "c")
    modes = {f.name: f.stat().st_mode & 0o777 for f in path.iterdir()}
    assert len(set(modes.values())) == 1, modes
