"""The lean decode loop (sparseffn.generate) against transformers' generate."""
from __future__ import annotations

import pytest
import torch

import sparseffn
from sparseffn.testing import tiny_model

CALIB = dict(n_tokens=1024, progress=False)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_greedy_equals_hf_generate(family):
    model = tiny_model(family)
    ids = torch.randint(3, 1000, (2, 7))
    expected = model.generate(ids, max_new_tokens=9, do_sample=False, eos_token_id=None)
    got = sparseffn.generate(model, ids, 9, eos_token_id=None, compile=False)
    assert torch.equal(got, expected)


def test_left_padded_batch_equals_hf_generate():
    model = tiny_model("llama")
    ids = torch.randint(3, 1000, (3, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              eos_token_id=None)
    got = sparseffn.generate(model, ids, 6, attention_mask=mask, eos_token_id=None,
                             compile=False)
    assert torch.equal(got, expected)


def test_eos_stops_like_hf_generate():
    model = tiny_model("llama")
    ids = torch.randint(3, 1000, (2, 5))
    free = sparseffn.generate(model, ids, 12, eos_token_id=None, compile=False)
    eos = int(free[0, 8])  # a token the model emits: stop there
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                              pad_token_id=0)
    got = sparseffn.generate(model, ids, 12, eos_token_id=eos, pad_token_id=0, compile=False)
    assert torch.equal(got, expected)


def test_sparse_model_and_compiled_step_reused():
    """A patched model through the compiled step: greedy matches eager, and a second call with
    a new sparsity level reuses the compiled step (no recompilation)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
    # The reference path: a compiled step cannot run the CPU ops (plain C calls), so eager and
    # compiled compare like with like.
    sparseffn.sparsify(model, "cats", 0.5, ids, kernel_mode="never", **CALIB)
    ids = torch.randint(3, 1000, (1, 6))
    eager = sparseffn.generate(model, ids, 5, eos_token_id=None, compile=False)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    compiled = sparseffn.generate(model, ids, 5, eos_token_id=None, max_cache_len=16)
    assert torch.equal(compiled, eager)
    frames = counters["stats"]["unique_graphs"]
    assert frames > 0  # the step really was compiled
    sparseffn.set_sparsity(model, 0.3)
    sparseffn.generate(model, ids, 5, eos_token_id=None, max_cache_len=16)
    assert counters["stats"]["unique_graphs"] == frames  # thresholds changed in place


def test_sampling_is_reproducible_and_respects_top_k():
    model = tiny_model("llama")
    ids = torch.randint(3, 1000, (2, 4))
    kw = dict(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, eos_token_id=None,
              compile=False)
    a = sparseffn.generate(model, ids, 6, generator=torch.Generator().manual_seed(3), **kw)
    b = sparseffn.generate(model, ids, 6, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)
    greedy = sparseffn.generate(model, ids, 1, eos_token_id=None, compile=False)
    one = sparseffn.generate(model, ids, 1, do_sample=True, top_k=1, eos_token_id=None,
                             compile=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(one, greedy)  # top-1 sampling is greedy


def test_bad_arguments():
    model = tiny_model("llama")
    ids = torch.randint(3, 1000, (1, 4))
    with pytest.raises(sparseffn.SparseFFNError, match="max_new_tokens"):
        sparseffn.generate(model, ids, 0)
    with pytest.raises(sparseffn.SparseFFNError, match="LongTensor"):
        sparseffn.generate(model, ids.float(), 3)
    with pytest.raises(sparseffn.SparseFFNError, match="max_cache_len"):
        sparseffn.generate(model, ids, 8, max_cache_len=6)
    with pytest.raises(sparseffn.SparseFFNError, match="temperature"):
        sparseffn.generate(model, ids, 3, do_sample=True, temperature=0)


def test_each_cache_length_compiles_a_static_graph():
    """Two loops (two cache lengths) each get a static graph: before, the second made dynamo
    mark the cache length dynamic (automatic dynamic), and its slower symbolic graph then
    served both loops."""
    import logging

    model = tiny_model("llama")
    ids = torch.randint(3, 1000, (1, 6))
    torch._dynamo.reset()
    marked: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "as dynamic" in record.getMessage():
                marked.append(record.getMessage())

    log = logging.getLogger("torch.fx.experimental.symbolic_shapes")  # dynamo marks there
    handler, level = Catch(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        first = sparseffn.generate(model, ids, 4, eos_token_id=None, max_cache_len=16)
        second = sparseffn.generate(model, ids, 4, eos_token_id=None, max_cache_len=32)
        again = sparseffn.generate(model, ids, 4, eos_token_id=None, max_cache_len=16)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert torch.equal(first, second) and torch.equal(first, again)
    assert not marked, marked
