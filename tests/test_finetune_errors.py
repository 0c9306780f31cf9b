"""Fine-tuning: schedules behave as documented, and bad input gets a clear error."""
from __future__ import annotations

import math

import pytest
import torch
import transformers

from sparseffn.errors import SparseFFNError
from sparseffn.finetune import (ConstantSchedule, DensityLoss, FinetuneError, FixedThreshold,
                                LinearSchedule, ProgressiveL1, ProgressiveSchedule,
                                ReluSubstitution, SparsityRegularization, apply_lora,
                                training_texts, training_windows)
from sparseffn.finetune.recipe import FinetuneConfig
from sparseffn.testing import tiny_model


def test_progressive_schedule_warms_up_then_climbs_sine_stages():
    s = ProgressiveSchedule(warmup=10, stages=((20, 1.0), (40, 3.0)))
    assert [s(t) for t in (0, 9, 10)] == [0.0, 0.0, 0.0]
    # Quarter sine: halfway through a stage the factor is sin(pi/4) of the way up.
    assert s(15) == pytest.approx(math.sin(math.pi / 4))
    assert s(20) == pytest.approx(1.0)
    assert s(30) == pytest.approx(1.0 + 2.0 * math.sin(math.pi / 4))
    assert s(40) == s(1000) == pytest.approx(3.0)
    values = [s(t) for t in range(50)]
    assert all(b >= a for a, b in zip(values, values[1:]))  # never decreases
    assert s.end == 40


def test_even_stages_split_the_steps_after_warmup():
    s = ProgressiveSchedule.even(warmup=4, total=16, peaks=[0.5, 1.0, 2.0])
    assert s.stages == ((8, 0.5), (12, 1.0), (16, 2.0))


def test_constant_and_linear_schedules():
    assert [ConstantSchedule(2.0, start=3)(t) for t in (2, 3, 9)] == [0.0, 2.0, 2.0]
    lin = LinearSchedule(1.0, start=2, stop=6)
    assert [lin(t) for t in (0, 2, 4, 6, 9)] == [0.0, 0.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("make", [
    lambda: ProgressiveSchedule(warmup=10, stages=((5, 1.0),)),
    lambda: ProgressiveSchedule(warmup=0, stages=((20, 1.0), (10, 2.0))),
    lambda: ProgressiveSchedule.even(warmup=50, total=50, peaks=[1.0]),
    lambda: LinearSchedule(1.0, start=8, stop=3),
], ids=["stage-before-warmup", "stages-out-of-order", "even-no-room", "linear-reversed"])
def test_schedule_that_ends_before_it_starts(make):
    with pytest.raises(FinetuneError, match="before it starts"):
        make()


@pytest.mark.parametrize("make", [
    lambda: ProgressiveSchedule(warmup=0, stages=()),
    lambda: ProgressiveSchedule(warmup=-1, stages=((5, 1.0),)),
    lambda: ConstantSchedule(float("nan")),
    lambda: ConstantSchedule(-1.0),
], ids=["no-stages", "negative-warmup", "nan-factor", "negative-factor"])
def test_bad_schedule_values(make):
    with pytest.raises(FinetuneError):
        make()


def test_warmup_longer_than_training_is_refused():
    with pytest.raises(FinetuneError, match="ends .* before it starts"):
        FinetuneConfig(method="l1", steps=10, warmup=10)


@pytest.mark.parametrize("target", [0.0, 1.0, -0.2, 1.5, float("nan")])
def test_target_density_outside_open_unit_interval(target):
    with pytest.raises(FinetuneError, match=r"target density must lie in \(0, 1\)"):
        DensityLoss(target)


@pytest.mark.parametrize("sparsity", [0.0, 1.0, 1.2])
def test_target_sparsity_outside_open_unit_interval(sparsity):
    with pytest.raises(FinetuneError, match=r"sparsity must lie in \(0, 1\)"):
        FinetuneConfig(method="density", sparsity=sparsity)


@pytest.mark.parametrize("reg", [lambda: ProgressiveL1(), lambda: DensityLoss(0.3),
                                 lambda: ReluSubstitution()], ids=["l1", "density", "relu"])
def test_regularizer_on_a_model_without_gated_ffn(reg):
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(FinetuneError, match="gated FFN.*'gpt2'"):
        SparsityRegularization(model, [reg()])


def test_fixed_threshold_needs_a_patched_model():
    model = tiny_model("llama")
    with pytest.raises(FinetuneError, match="patch the model first.*sparsify"):
        SparsityRegularization(model, [FixedThreshold()])
    # The failed attach left no probe behind: a new regularization attaches cleanly.
    SparsityRegularization(model, [ProgressiveL1()]).remove()


def test_second_attachment_is_refused():
    model = tiny_model("qwen2")
    reg = SparsityRegularization(model, [ProgressiveL1()])
    with pytest.raises(FinetuneError, match="already carries"):
        SparsityRegularization(model, [DensityLoss(0.3)])
    reg.remove()
    assert type(model.model.layers[0].mlp.act_fn).__name__ != "ActivationProbe"


@pytest.mark.parametrize("data", [[], ["", "   \n"]], ids=["empty-list", "blank-docs"])
def test_empty_training_data(data):
    with pytest.raises(FinetuneError, match="training data.*empty"):
        training_texts(data)


def test_empty_datasets_dataset():
    import datasets
    with pytest.raises(FinetuneError, match="training data.*empty"):
        training_texts(datasets.Dataset.from_dict({"text": []}))


def test_text_shorter_than_one_window(tokenizer):
    with pytest.raises(FinetuneError, match="training data.*fewer than one window"):
        training_windows(tokenizer, ["only a few words"], n_windows=4, seq_len=64)


def test_bad_lora_settings():
    model = tiny_model("llama")
    with pytest.raises(FinetuneError, match="match no nn.Linear.*gate_proj"):
        apply_lora(model, targets=["gate", "up_proj"])
    with pytest.raises(FinetuneError, match="rank"):
        apply_lora(model, r=0)


def test_errors_are_sparseffn_errors():
    assert issubclass(FinetuneError, SparseFFNError)
    with pytest.raises(FinetuneError, match="unknown fine-tuning method"):
        FinetuneConfig(method="magic")


def test_tolerance_must_match_layers():
    model = tiny_model("llama")
    with pytest.raises(FinetuneError, match="2 layers"):
        SparsityRegularization(model, [ProgressiveL1()], tolerance=[0.1, 0.1, 0.1])
    with pytest.raises(FinetuneError, match=">= 0"):
        SparsityRegularization(model, [ProgressiveL1()], tolerance=[0.1, torch.tensor(-1.0)])


def test_datasets_dataset_and_text_files_are_read(tmp_path):
    import datasets
    ds = datasets.Dataset.from_dict({"body": ["first document", "", "second one"]})
    assert training_texts(ds, text_field="body") == ["first document", "second one"]
    (tmp_path / "a.jsonl").write_text('{"text": "from jsonl"}\n')
    (tmp_path / "b.txt").write_text("from txt")
    assert sorted(training_texts(tmp_path)) == ["from jsonl", "from txt"]
