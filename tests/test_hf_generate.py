"""``model.generate`` on a sparsified model: routed through the lean loop where its arguments
allow, the same tokens as transformers' own loop on the same sparse model, and transformers'
loop (with one log line) everywhere else.

The route is taken on CUDA only; these tests add the CPU to the routed devices (the loop then
runs its step eagerly) so the argument translation is checked in CI."""
from __future__ import annotations

import logging

import pytest
import torch

import sparseffn
from sparseffn import hf_generate
from sparseffn.testing import tiny_model

CALIB = dict(n_tokens=1024, progress=False)


@pytest.fixture
def routed(monkeypatch):
    """Route CPU calls too, and count the calls that took the lean loop."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return sparseffn.generate(*args, **kwargs)

    monkeypatch.setattr(hf_generate, "ROUTED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(hf_generate, "lean_generate", spy)
    hf_generate._SAID.clear()
    return calls


def _sparse(family: str = "llama", method: str = "teal", scope: str = "all"):
    model = tiny_model(family)
    calib = torch.randint(3, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
    sparseffn.sparsify(model, method, 0.5, calib, scope=scope if method == "teal" else None,
                       **CALIB)
    return model


def _both(model, *args, **kwargs):
    """(routed model.generate, transformers' generate on the same sparse model)."""
    got = model.generate(*args, **kwargs)
    expected = type(model).generate(model, *args, **kwargs)
    return got, expected


@pytest.mark.parametrize("family,method", [("llama", "teal"), ("gemma2", "chess"),
                                           ("qwen2", "cats")])
def test_greedy_routed_equals_transformers(routed, family, method):
    model = _sparse(family, method)
    ids = torch.randint(3, 1000, (2, 7))
    got, expected = _both(model, ids, max_new_tokens=9, do_sample=False)
    assert len(routed) == 1
    assert torch.equal(got, expected)


def test_eos_pad_min_new_tokens_and_max_length(routed):
    model = _sparse()
    ids = torch.randint(3, 1000, (2, 5))
    free = type(model).generate(model, ids, max_new_tokens=12, do_sample=False,
                                eos_token_id=None)
    eos = int(free[0, 8])  # a token the model emits: generation ends there
    cases = [dict(max_new_tokens=12, eos_token_id=eos, pad_token_id=0),
             dict(max_new_tokens=12, eos_token_id=[eos, 999], pad_token_id=0),
             dict(max_new_tokens=12, min_new_tokens=7, eos_token_id=eos, pad_token_id=0),
             dict(max_length=14, min_length=9, eos_token_id=eos, pad_token_id=0),
             dict(max_length=11, eos_token_id=None)]
    for kw in cases:
        got, expected = _both(model, ids, do_sample=False, **kw)
        assert torch.equal(got, expected), kw
    assert len(routed) == len(cases)
    assert routed[2]["min_new_tokens"] == 7 and routed[3]["min_new_tokens"] == 4
    assert routed[3]["max_new_tokens"] == 9


def test_pad_defaults_to_eos_and_streamer_stops_at_eos(routed):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.parts = []

        def put(self, value):
            self.parts.append(value.flatten().tolist())

        def end(self):
            self.parts.append("end")

    model = _sparse()
    model.generation_config.pad_token_id = None
    ids = torch.randint(3, 1000, (2, 5))
    free = type(model).generate(model, ids, max_new_tokens=12, do_sample=False,
                                eos_token_id=None)
    eos = int(free[0, 7])
    got, expected = _both(model, ids, max_new_tokens=12, do_sample=False, eos_token_id=eos)
    assert torch.equal(got, expected)  # finished rows padded with the EOS token
    ours, theirs = Collect(), Collect()
    one = ids[:1]
    got = model.generate(one, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                         streamer=ours)
    expected = type(model).generate(model, one, max_new_tokens=12, do_sample=False,
                                    eos_token_id=eos, streamer=theirs)
    assert torch.equal(got, expected) and ours.parts == theirs.parts
    assert len(routed) == 2


def test_default_length_and_translation_errors_fall_back(routed, monkeypatch, caplog):
    model = _sparse()
    ids = torch.randint(3, 1000, (1, 5))
    assert "default length" in hf_generate.plan(model, (ids,), {"do_sample": False})
    got, expected = _both(model, ids, do_sample=False, eos_token_id=None)
    assert torch.equal(got, expected) and not routed

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(hf_generate, "_loop_args", broken)
    with caplog.at_level(logging.WARNING, logger="sparseffn.hf_generate"):
        got = model.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert got.shape == (1, 8) and not routed
    assert any("RuntimeError: boom" in r.getMessage() for r in caplog.records)


def test_left_padded_batch_and_inferred_mask(routed):
    model = _sparse()
    ids = torch.randint(3, 1000, (3, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 1)
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=1)
    got, expected = _both(model, input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, expected)
    # No mask given: generate infers it from the pad tokens, and so does the route.
    got, expected = _both(model, ids, **kw)
    assert torch.equal(got, expected)
    assert len(routed) == 2 and routed[1]["attention_mask"] is not None


def test_generation_config_object_and_model_defaults(routed):
    from transformers import GenerationConfig

    model = _sparse()
    ids = torch.randint(3, 1000, (1, 6))
    config = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=None)
    got, expected = _both(model, ids, config)
    assert torch.equal(got, expected) and got.shape[1] == 11
    model.generation_config.max_new_tokens = 4  # the model's own defaults apply too
    got, expected = _both(model, ids, eos_token_id=None)
    assert torch.equal(got, expected) and got.shape[1] == 10
    assert len(routed) == 2


def test_streamer_sees_the_same_tokens(routed):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.parts, self.ended = [], False

        def put(self, value):
            self.parts.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    model = _sparse()
    ids = torch.randint(3, 1000, (1, 5))
    ours, theirs = Collect(), Collect()
    got = model.generate(ids, max_new_tokens=7, do_sample=False, eos_token_id=None,
                         streamer=ours)
    expected = type(model).generate(model, ids, max_new_tokens=7, do_sample=False,
                                    eos_token_id=None, streamer=theirs)
    assert torch.equal(got, expected)
    assert ours.parts == theirs.parts and ours.ended and theirs.ended
    assert len(routed) == 1


def test_sampling_is_routed_with_its_settings(routed):
    model = _sparse()
    ids = torch.randint(3, 1000, (2, 4))
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=5,
                         top_p=0.9, eos_token_id=None)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], ids)
    assert routed[0]["do_sample"] and routed[0]["temperature"] == 0.7
    assert routed[0]["top_k"] == 5 and routed[0]["top_p"] == 0.9
    greedy = model.generate(ids, max_new_tokens=3, eos_token_id=None, do_sample=False)
    top1 = model.generate(ids, max_new_tokens=3, eos_token_id=None, do_sample=True, top_k=1)
    assert torch.equal(top1, greedy)  # top-1 sampling is greedy


@pytest.mark.parametrize("kwargs,reason", [
    (dict(num_beams=2), "num_beams=2"),
    (dict(repetition_penalty=1.3), "repetition_penalty=1.3"),
    (dict(return_dict_in_generate=True), "return_dict_in_generate=True"),
    (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size=2"),
    (dict(num_return_sequences=2, do_sample=True), "num_return_sequences=2"),
    (dict(attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]] * 2)), "left-padded"),
])
def test_unsupported_options_fall_back_and_say_why_once(routed, caplog, kwargs, reason):
    model = _sparse()
    ids = torch.randint(3, 1000, (2, 6))
    kw = dict(max_new_tokens=4, eos_token_id=None, pad_token_id=0, **kwargs)
    with caplog.at_level(logging.WARNING, logger="sparseffn.hf_generate"):
        torch.manual_seed(0)
        got = model.generate(ids, **kw)
        model.generate(ids, **kw)
    torch.manual_seed(0)
    expected = type(model).generate(model, ids, **kw)
    assert not routed  # transformers' loop ran
    out = got.sequences if hasattr(got, "sequences") else got
    assert torch.equal(out, expected.sequences if hasattr(expected, "sequences") else expected)
    said = [r.getMessage() for r in caplog.records if "lean loop" in r.getMessage()]
    assert len(said) == 1 and reason in said[0]  # once, naming the option


def test_plan_names_what_it_refuses(routed):
    model = _sparse()
    ids = torch.randint(3, 1000, (1, 5))
    for kwargs, reason in ((dict(cache_implementation="offloaded"), "offloaded"),
                           (dict(use_cache=False), "use_cache=False"),
                           (dict(inputs_embeds=torch.zeros(1, 5, 8)), "inputs_embeds"),
                           (dict(max_length=3), "no new tokens"),
                           (dict(stop_strings=["x"]), "stop_strings")):
        got = hf_generate.plan(model, (ids,), kwargs)
        assert isinstance(got, str) and reason in got, (kwargs, got)
    assert isinstance(hf_generate.plan(model, (ids, None, None, None, None, None, None, None,
                                               None, None, None, None), {}), str)


def test_cache_length_is_bucketed():
    assert [hf_generate.cache_len(n) for n in (1, 256, 257, 1000, 1025)] == \
        [256, 256, 512, 1024, 2048]
    # Not doubled past the model's context: capped there, or the exact length beyond it.
    assert [hf_generate.cache_len(n, 4096) for n in (3000, 4096, 5000)] == [4096, 4096, 5000]


def test_stopping_criteria_are_routed_and_stop_like_transformers(routed):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        """Stops a sequence once it emitted ``token`` (a per-sequence criterion, as
        lm-eval's stop strings are)."""

        def __init__(self, prompt_len: int, token: int):
            self.prompt_len, self.token = prompt_len, token

        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids[:, self.prompt_len:] == self.token).any(dim=1)

    model = _sparse()
    ids = torch.randint(3, 1000, (2, 6))
    free = type(model).generate(model, ids, max_new_tokens=12, do_sample=False,
                                eos_token_id=None)
    cases = [(int(free[0, 9]), None), (int(free[1, 7]), None), (int(free[0, 9]), 2)]
    for stop, eos in cases:  # tokens the model emits; with an EOS set, stopped rows get pads
        kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
        got = model.generate(ids, stopping_criteria=[StopAfter(6, stop)], **kw)  # a plain list
        expected = type(model).generate(
            model, ids, stopping_criteria=StoppingCriteriaList([StopAfter(6, stop)]), **kw)
        assert torch.equal(got, expected)
    assert len(routed) == 3 and routed[0]["stopping_criteria"] is not None
    # A criterion carrying an EOS token makes generate pad after it: its own loop runs.
    carrier = StopAfter(6, 5)
    carrier.eos_token_id = torch.tensor([5])
    assert "EOS" in hf_generate.plan(model, (ids,), dict(max_new_tokens=4,
                                                         stopping_criteria=[carrier]))


def test_logits_processor_falls_back(routed):
    from transformers import LogitsProcessorList, MinLengthLogitsProcessor

    model = _sparse()
    ids = torch.randint(3, 1000, (1, 5))
    procs = LogitsProcessorList([MinLengthLogitsProcessor(8, eos_token_id=2)])
    got = model.generate(ids, max_new_tokens=4, logits_processor=procs, eos_token_id=2,
                         do_sample=False)
    assert not routed and got.shape == (1, 9)


def test_cpu_keeps_transformers_loop_by_default():
    model = _sparse()
    ids = torch.randint(3, 1000, (1, 5))
    assert hf_generate.plan(model, (ids,), {"max_new_tokens": 3}).startswith("the model runs "
                                                                              "on the CPU")
    got, expected = _both(model, ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, expected)


def test_opt_out_and_undo(routed):
    model = _sparse()
    ids = torch.randint(3, 1000, (1, 5))
    sparseffn.set_lean_generate(model, False)
    model.generate(ids, max_new_tokens=3, do_sample=False)
    assert not routed
    sparseffn.set_lean_generate(model, True)
    model.generate(ids, max_new_tokens=3, do_sample=False)
    assert len(routed) == 1
    assert "generate" in model.__dict__
    sparseffn.unsparsify(model)
    assert "generate" not in model.__dict__
    assert model.generate.__func__ is type(model).generate

    calib = torch.randint(3, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
    sparseffn.sparsify(model, "teal", 0.5, calib, lean_generate=False, **CALIB)
    model.generate(ids, max_new_tokens=3, do_sample=False)
    assert len(routed) == 1
    with pytest.raises(sparseffn.PatchStateError):
        sparseffn.set_lean_generate(tiny_model("llama"), True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the compiled route)")
@pytest.mark.parametrize("method", ["teal", "chess"])
def test_cuda_route_compiles_and_matches_transformers(method):
    """On CUDA the route is taken by default and its step is compiled (CUDA graphs); greedy
    tokens equal transformers' loop on the same sparse model, batch 1 and a padded batch."""
    model = tiny_model("llama").cuda()
    calib = torch.randint(3, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
    sparseffn.sparsify(model, method, 0.5, calib, **CALIB)
    ids = torch.randint(3, 1000, (1, 9)).cuda()
    plan = hf_generate.plan(model, (ids,), dict(max_new_tokens=12, do_sample=False))
    assert isinstance(plan, dict) and plan["compile"]
    got, expected = _both(model, ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(got, expected)
    batch = torch.randint(3, 1000, (3, 9)).cuda()
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    got, expected = _both(model, batch, attention_mask=mask, max_new_tokens=12,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, expected)
    sparseffn.clear_decode_loops(model)
