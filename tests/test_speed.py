"""Decode speed as the demo and ``sparseffn eval`` report it."""
from __future__ import annotations

import torch

import sparseffn
from sparseffn.eval.speed import decode_speed, device_name
from sparseffn.testing import tiny_model


def test_decode_speed_times_decode_steps_and_says_where():
    model = tiny_model("llama")
    speed = decode_speed(model, prompt=8, new_tokens=4, repeats=1)
    assert speed.tokens_per_s > 0 and speed.new_tokens == 4
    assert speed.threads == torch.get_num_threads()
    assert speed.device == device_name("cpu") and speed.device
    assert f"{speed.threads} threads" in speed.describe()
    sparseffn.sparsify(model, "topk", 0.5, progress=False)
    assert decode_speed(model, prompt=8, new_tokens=4, repeats=1).tokens_per_s > 0
