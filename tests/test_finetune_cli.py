"""``sparseffn finetune`` end to end on a tiny model saved to disk (Trainer, merge, save)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparseffn
from sparseffn.cli import main
from sparseffn.finetune.probe import ActivationProbe
from sparseffn.testing import tiny_model

FAST = ["--data", "pydoc", "--steps", "3", "--batch-size", "2", "--seq-len", "32",
        "--calib-tokens", "1024", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_fixed_with_lora_saves_a_merged_model_and_its_calibration(model_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    code = main(["finetune", "--model", str(model_dir), "--method", "fixed",
                 "--threshold-method", "cats", "--sparsity", "0.6",
                 "--trainable", "lora", "--lora-r", "4", "--calib-method", "cats", "--out",
                 str(out), *FAST])
    assert code == 0, capsys.readouterr().err
    assert "trained fixed for 3 steps" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any(isinstance(m, ActivationProbe) for m in model.modules())
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert any(not torch.equal(p, q) for p, q in zip(
        model.parameters(), AutoModelForCausalLM.from_pretrained(model_dir).parameters()))
    sparseffn.sparsify(model, calibration=out / "calibration")  # strict: same weights
    assert sparseffn.get_calibration(model).config.sparsity == 0.6
    log = json.loads((out / "log.json").read_text())
    assert log["sparsity"] and "density/layer_01" in log["sparsity"][-1]
    assert any("loss" in entry for entry in log["trainer"])
    assert json.loads((out / "finetune_config.json").read_text())["method"] == "fixed"


def test_fatrelu_model_loads_with_relu_and_thresholds_floored(model_dir, tmp_path):
    out = tmp_path / "ft"
    code = main(["finetune", "--model", str(model_dir), "--method", "fatrelu", "--relu-shift",
                 "0.05", "--trainable", "ffn", "--sparsity", "0.3", "--out", str(out), *FAST])
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.hidden_act == "relu" and model.config.sparseffn_relu_shift == 0.05
    assert isinstance(model.model.layers[0].mlp.act_fn, torch.nn.ReLU)
    calib = sparseffn.load_calibration(out / "calibration")
    act = [v for k, v in calib.thresholds.items() if k.endswith(".act")]
    assert act and all(bool((t >= 0.05).all()) for t in act)


@pytest.mark.parametrize("argv,message", [
    (["--method", "density", "--sparsity", "1.5"], r"sparsity must lie in \(0, 1\)"),
    (["--method", "l1", "--warmup", "5"], "before it starts"),
    (["--data", "EMPTY"], "training data.*empty"),
], ids=["target-outside", "schedule-reversed", "empty-data"])
def test_bad_input_is_reported_cleanly(argv, message, model_dir, tmp_path, capsys):
    import re
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    argv = [str(empty) if a == "EMPTY" else a for a in argv]
    base = ["finetune", "--model", str(model_dir), "--out", str(tmp_path / "x"), *FAST]
    code = main(base + argv)  # later flags win over FAST's
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()
