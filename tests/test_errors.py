"""Bad input gets a clear error and changes nothing."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

import sparseffn
from sparseffn.errors import (CalibrationError, PatchStateError, SparseFFNError,
                              UnsupportedModelError)
from sparseffn.testing import tiny_model

CALIB = dict(n_tokens=2048, seq_len=256, progress=False)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snap):
    assert not sparseffn.is_sparsified(model)
    state = model.state_dict()
    assert state.keys() == snap.keys() and all(torch.equal(state[k], snap[k]) for k in snap)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer, texts):
    model = tiny_model("llama")
    sparseffn.sparsify(model, "cats", 0.5, texts, tokenizer=tokenizer, **CALIB)
    path = tmp_path_factory.mktemp("calib") / "llama-cats"
    sparseffn.save_calibration(model, path)
    return path


def test_unsupported_architecture():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(UnsupportedModelError, match="gpt2.*not supported.*gated"):
        sparseffn.sparsify(model, "topk", 0.5)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "half", True])
def test_sparsity_outside_range(bad, tokenizer, texts):
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(SparseFFNError, match="sparsity"):
        sparseffn.sparsify(model, "cats", bad, texts, tokenizer=tokenizer, **CALIB)
    assert_unchanged(model, snap)


def test_already_patched(tokenizer, texts):
    model = tiny_model("llama")
    sparseffn.sparsify(model, "topk", 0.5)
    with pytest.raises(PatchStateError, match="already sparsified.*unsparsify"):
        sparseffn.sparsify(model, "topk", 0.3)
    with pytest.raises(PatchStateError, match="not sparsified"):
        sparseffn.unsparsify(sparseffn.unsparsify(model))


@pytest.mark.parametrize("data,match", [([], "empty"), (["", "   "], "empty"),
                                        (["A short text."], "tokens"),
                                        ("no_such_source", "neither a built-in source"),
                                        ([1, 2], "must be strings")])
def test_empty_or_short_calibration_data(data, match, tokenizer):
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(CalibrationError, match=match):
        sparseffn.sparsify(model, "chess", 0.5, data, tokenizer=tokenizer, **CALIB)
    assert_unchanged(model, snap)


def test_missing_tokenizer_or_data(texts):
    model = tiny_model("llama")
    with pytest.raises(CalibrationError, match="tokenizer"):
        sparseffn.sparsify(model, "cats", 0.5, texts)
    with pytest.raises(CalibrationError, match="needs calibration text"):
        sparseffn.sparsify(model, "cats", 0.5)


def test_method_scope_mismatch():
    with pytest.raises(SparseFFNError, match="scope='all'.*teal"):
        sparseffn.SparsityConfig(method="cats", scope="all")
    with pytest.raises(SparseFFNError, match="unknown method"):
        sparseffn.SparsityConfig(method="dejavu")


def test_calibration_from_another_architecture(saved):
    model = tiny_model("qwen2")
    snap = snapshot(model)
    with pytest.raises(CalibrationError, match="another model.*model_type"):
        sparseffn.sparsify(model, calibration=saved)
    assert_unchanged(model, snap)


def test_calibration_from_other_weights_same_shape(saved):
    model = tiny_model("llama", seed=1)
    with pytest.raises(CalibrationError, match="other weights"):
        sparseffn.sparsify(model, calibration=saved)
    sparseffn.sparsify(model, calibration=saved, strict=False)  # explicit override works
    assert sparseffn.is_sparsified(model)


def test_same_model_in_bf16_accepts_calibration(saved):
    model = tiny_model("llama", dtype=torch.bfloat16)
    sparseffn.sparsify(model, calibration=saved)
    assert sparseffn.get_calibration(model).config.method == "cats"


@pytest.mark.parametrize("damage", ["truncate_tensors", "garbage_json", "missing_tensors",
                                    "wrong_version"])
def test_corrupt_calibration(damage, saved, tmp_path):
    import shutil
    path = tmp_path / "calib"
    shutil.copytree(saved, path)
    tensors, meta = path / "calibration.safetensors", path / "calibration.json"
    if damage == "truncate_tensors":
        tensors.write_bytes(tensors.read_bytes()[:100])
    elif damage == "garbage_json":
        meta.write_text("{not json")
    elif damage == "missing_tensors":
        tensors.unlink()
    else:
        doc = json.loads(meta.read_text())
        doc["format_version"] = 99
        meta.write_text(json.dumps(doc))
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(CalibrationError, match="corrupt|missing|format version"):
        sparseffn.sparsify(model, calibration=path)
    assert_unchanged(model, snap)


def test_save_refuses_to_clobber(saved, tmp_path, tokenizer):
    model = tiny_model("llama")
    sparseffn.sparsify(model, calibration=saved)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SparseFFNError, match="not a calibration folder"):
        sparseffn.save_calibration(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    sparseffn.save_calibration(model, tmp_path / "c")
    with pytest.raises(SparseFFNError, match="overwrite=True"):
        sparseffn.save_calibration(model, tmp_path / "c")
    sparseffn.save_calibration(model, tmp_path / "c", overwrite=True)


def test_nan_activations_are_reported(tokenizer, texts):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="non-finite activations in decoder layer"):
        sparseffn.sparsify(model, "chess", 0.5, texts, tokenizer=tokenizer, **CALIB)
    assert not sparseffn.is_sparsified(model)


def test_artifact_loads_without_pickle(saved):
    # safetensors + JSON only: no file in the folder is a pickle.
    for f in saved.iterdir():
        assert f.suffix in (".json", ".safetensors")
        assert not f.read_bytes().startswith(b"\x80")
