"""The CLI validates its arguments before loading a model or doing any work, and its errors
name the flag."""
from __future__ import annotations

import subprocess
import sys

import pytest

from sparseffn import cli


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(cli, "load_model", refuse)


@pytest.mark.parametrize("argv,flag", [
    (["calibrate", "--out", "{tmp}"], "--out"),
    (["calibrate", "--out", "{tmp}/new", "--data", "no-such-source"], ""),
    (["calibrate", "--out", "{tmp}/new", "--method", "cats", "--scope", "all"], ""),
    (["calibrate", "--out", "{tmp}/new", "--method", "cats", "--rotation", "64"], ""),
    (["eval", "--methods", "cats", "chess:al"], "--methods"),
    (["eval", "--methods", "teal:all:rotate=64"], "--methods"),
    (["eval", "--methods", "chess:rotation=64"], "--methods"),
    (["eval", "--sparsities", "0.5", "1.5"], "--sparsities"),
    (["eval", "--eval-data", "no-such-source"], ""),
    (["demo", "--sparsity", "1.5"], "--sparsity"),
    (["eval", "--methods", "chess", "coreinfer"], "--prompt-len"),
    (["eval", "--methods", "chess", "--prompt-len", "600"], "--prompt-len"),
    (["eval", "--methods", "coreinfer", "--harness", "lm-eval"], "--prompt-len"),
])
def test_bad_arguments_are_refused_before_any_work(argv, flag, tmp_path, no_model, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparseffn: error:") and flag in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_existing_calibration_needs_the_overwrite_flag(tmp_path, no_model, capsys):
    (tmp_path / "calibration.json").write_text("{}")
    assert cli.main(["calibrate", "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_python_dash_m_sparseffn_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "sparseffn", "--help"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "calibrate" in done.stdout


@pytest.mark.parametrize("argv", [["calibrate", "--tokens", "512", "--out", "x"],
                                  ["finetune", "--calib-tokens", "512", "--out", "x"]])
def test_too_few_calibration_tokens_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert "fewer than the 1024 tokens" in capsys.readouterr().err


def test_a_tuple_from_load_builtin_model_gets_the_right_fix():
    import sparseffn
    with pytest.raises(sparseffn.UnsupportedModelError, match="unpack it"):
        sparseffn.sparsify((object(), object()), "topk", 0.5)
