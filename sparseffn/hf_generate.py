"""``model.generate`` on a sparsified model: its decode steps through the compiled lean loop.

Hugging Face's ``generate`` pays about a millisecond of Python per step (logits processors,
stopping criteria, cache bookkeeping), which hides much of what skipped weights save: on an
H100 at Llama-3-8B's shape, TEAL at 50% ran 1.25x faster than dense through ``generate`` and
1.56x through ``sparseffn.generate`` (docs/e2e.md). ``sparsify`` therefore binds the
``generate`` below to the model: a call whose arguments the lean loop implements exactly
(greedy or temperature / top-k / top-p sampling, EOS and stop tokens, ``max_new_tokens`` /
``max_length``, ``min_new_tokens`` / ``min_length``, left-padded batches, a streamer,
``stopping_criteria`` such as lm-eval's stop strings) runs there; anything else (beam search,
repetition penalties, logits processors, dict outputs, ...)
runs transformers' own ``generate`` and logs why, once per reason. Greedy outputs are the same
tokens ``generate`` gives on the same sparse model (tested in fp32; in bf16 a compiled step's
rounding can flip a near-tie, as any compiled decode can).

It routes only on CUDA, where the compiled step and its CUDA graph pay. On the CPU the step is
not compiled (the CPU ops are plain C calls) and the lean loop measured no faster than
``generate`` (SmolLM2-135M, TEAL all seven at 50%: 36.3 against 37.2 tok/s, 2 threads), so the
CPU keeps ``generate``. ``unsparsify`` removes the binding; ``set_lean_generate(model, False)``
turns it off.
"""
from __future__ import annotations

import logging
import types
from typing import Any

import torch
from torch import nn

from sparseffn.generation import generate as lean_generate
from sparseffn.modules import probe_batch, start_sequences

logger = logging.getLogger(__name__)

#: Options the lean loop implements (read from the resolved generation config).
_HANDLED = {"max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample",
            "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id", "use_cache",
            "cache_implementation", "max_cache_len"}
#: Options that change nothing in a decoder-only greedy or sampling loop: metadata, beam-search
#: and assisted-decoding settings (beams and assistants are refused elsewhere), compile knobs
#: (the lean loop compiles its own step).
_IGNORED = {"bos_token_id", "decoder_start_token_id", "transformers_version",
            "_from_model_config", "length_penalty", "early_stopping", "low_memory",
            "num_assistant_tokens", "num_assistant_tokens_schedule",
            "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
            "assistant_early_exit", "is_assistant", "max_matching_ngram_size", "compile_config",
            "disable_compile", "cache_config"}
#: The value of an option that turns it off, where that is not None / False / empty.
_OFF = {"num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "typical_p": 1.0,
        "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "guidance_scale": 1.0,
        "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "no_repeat_ngram_size": 0,
        "encoder_no_repeat_ngram_size": 0, "diversity_penalty": 0.0}
#: transformers' default ``max_length`` (GenerationConfig), which it reads as new tokens or as
#: all tokens depending on its version: such calls take its own loop.
DEFAULT_MAX_LENGTH = 20
#: Devices whose ``generate`` calls take the lean loop (the tests add "cpu").
ROUTED_DEVICES = ("cuda",)
#: Cache implementations whose outputs the lean loop's static cache reproduces.
_CACHES = (None, "static", "dynamic")
#: The static cache is sized to a power of two at least this long (up to the model's context),
#: so prompts of different lengths share one compiled step.
MIN_CACHE_LEN = 256

_SAID: set[str] = set()


def _say_once(reason: str, level: int) -> None:
    if reason not in _SAID:
        _SAID.add(reason)
        logger.log(level, "sparseffn: model.generate runs transformers' own loop, not the "
                   "lean loop: %s", reason)


def _is_off(key: str, value: Any) -> bool:
    return value is None or value is False or value == _OFF.get(key, None) \
        or (isinstance(value, (list, tuple, dict, set)) and not value)


def _eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten()]
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _left_padded(mask: torch.Tensor) -> bool:
    """Each row of ``mask`` [B, P] is zeros then ones (a non-decreasing 0/1 row)."""
    m = mask.long()
    return bool(((m == 0) | (m == 1)).all()) and bool((m[:, 1:] >= m[:, :-1]).all())


def cache_len(total: int, max_positions: int | None = None) -> int:
    """The static cache length for ``total`` prompt + new tokens: the next power of two, at
    least ``MIN_CACHE_LEN``, but not past the model's ``max_positions`` unless ``total`` is
    (a long context is not doubled)."""
    bucket = max(MIN_CACHE_LEN, 1 << (total - 1).bit_length())
    return max(total, min(bucket, max_positions)) if max_positions else bucket


def plan(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | str:
    """The ``sparseffn.generate`` arguments that reproduce ``model.generate(*args, **kwargs)``,
    or the reason (a string) the lean loop cannot."""
    names = ("inputs", "generation_config", "logits_processor", "stopping_criteria",
             "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model", "streamer",
             "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate")
    if len(args) > len(names):
        return "too many positional arguments"
    call = dict(zip(names, args))
    for name in names:
        if name in kwargs:
            call[name] = kwargs.pop(name)
    input_ids = call.get("inputs")
    if input_ids is None:
        input_ids = kwargs.pop("input_ids", None)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
            or input_ids.dtype != torch.long or input_ids.shape[1] == 0:
        return "the prompt is not a LongTensor input_ids [batch, length]"
    if input_ids.device.type not in ROUTED_DEVICES:
        return (f"the model runs on the {input_ids.device.type.upper()}, where the lean loop "
                "measured no faster than generate")
    if len(set(getattr(model, "hf_device_map", {}).values())) > 1:
        return "the model is split over several devices (device_map)"
    for name in names[2:]:
        if name not in ("streamer", "stopping_criteria") and not _is_off(name, call.get(name)):
            return f"{name}= is not supported by the lean loop"
    kwargs.pop("tokenizer", None)  # only read for stop_strings, which are refused below
    attention_mask = kwargs.pop("attention_mask", None)
    given = call.get("generation_config")
    config, model_kwargs = model._prepare_generation_config(given, **kwargs)
    extra = sorted(k for k, v in model_kwargs.items() if v is not None and v is not False)
    if extra:
        return f"model inputs {extra} are not supported by the lean loop"
    for key, value in config.to_dict().items():
        if key not in _HANDLED and key not in _IGNORED and not _is_off(key, value):
            return f"generation option {key}={value!r} is not supported by the lean loop"
    if config.use_cache is False:
        return "use_cache=False"
    if config.cache_implementation not in _CACHES:
        return f"cache_implementation={config.cache_implementation!r}"
    if config.max_new_tokens is None and kwargs.get("max_length") is None \
            and (given is None or given.max_length is None) \
            and config.max_length == DEFAULT_MAX_LENGTH:
        # generate's default length: new tokens or all tokens depending on the transformers
        # version and on where the default came from; generate itself knows.
        return "no max_new_tokens or max_length given (generate's default length)"
    criteria = call.get("stopping_criteria")
    if not _is_off("stopping_criteria", criteria):
        from transformers import StoppingCriteriaList
        criteria = StoppingCriteriaList(criteria)  # generate takes a plain list too
        if any(getattr(c, "eos_token_id", None) is not None for c in criteria):
            return "a stopping criterion that carries an EOS token (generate pads after it)"
    else:
        criteria = None
    max_positions = getattr(model.config, "max_position_embeddings", None)
    loop_args = _loop_args(input_ids, attention_mask, config, call.get("streamer"),
                           max_positions)
    if isinstance(loop_args, dict):
        loop_args["stopping_criteria"] = criteria
    return loop_args


def _loop_args(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: Any,
               streamer: Any, max_positions: int | None) -> dict[str, Any] | str:
    """Length, stopping, sampling and padding settings for the lean loop, as ``generate``
    resolves them from ``config`` (a resolved GenerationConfig)."""
    P = input_ids.shape[1]
    new = config.max_new_tokens if config.max_new_tokens is not None \
        else (config.max_length or 0) - P
    if new < 1:
        return f"no new tokens to generate (max_length={config.max_length}, prompt {P})"
    min_new = config.min_new_tokens if config.min_new_tokens is not None \
        else max(0, (config.min_length or 0) - P)
    eos = _eos_list(config.eos_token_id)
    pad = config.pad_token_id
    if attention_mask is None and pad is not None and pad not in eos \
            and bool((input_ids == pad).any()):
        attention_mask = input_ids.ne(pad).long()  # generate infers the mask the same way
    if attention_mask is not None and (attention_mask.shape != input_ids.shape
                                       or not _left_padded(attention_mask)):
        return "the attention mask is not a left-padded [batch, length] 0/1 mask"
    temperature = 1.0 if config.temperature is None else float(config.temperature)
    top_p = 1.0 if config.top_p is None else float(config.top_p)
    if config.do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        return "sampling settings outside the lean loop's range (temperature <= 0 or top_p 0)"
    total = P + new
    return dict(input_ids=input_ids, max_new_tokens=new, attention_mask=attention_mask,
                do_sample=bool(config.do_sample), temperature=temperature,
                top_k=int(config.top_k or 0), top_p=top_p,
                eos_token_id=eos, pad_token_id=pad, min_new_tokens=min_new,
                streamer=streamer, compile=input_ids.device.type == "cuda",
                max_cache_len=max(cache_len(total, max_positions), config.max_cache_len or 0))


def _generate(model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``model.generate`` of a sparsified model (bound by ``attach``); see the module doc."""
    from sparseffn.patching import patch_state

    if not patch_state(model).lean_generate:
        return _class_generate(model, args, kwargs)
    try:
        loop_args = plan(model, args, dict(kwargs))
    except Exception as exc:  # noqa: BLE001 - generate itself reports what is wrong in a call
        loop_args = f"its arguments could not be translated ({type(exc).__name__}: {exc})"
    if isinstance(loop_args, str):
        # Info for the device (nothing to change in the call), a warning for an option.
        device = loop_args.startswith("the model runs on")
        _say_once(loop_args, logging.INFO if device else logging.WARNING)
        return _class_generate(model, args, kwargs)
    return lean_generate(model, **loop_args)


def decode_batch(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The batch transformers' loop decodes for this call: the prompts times the beams (beam
    search) or the returned sequences (sampling); None where the prompts are not a 2-D tensor
    of ids."""
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def option(name: str) -> int:
        return int(kwargs.get(name) or getattr(config, name, None) or 1)
    beams = option("num_beams")
    return ids.shape[0] * (beams if beams > 1 else option("num_return_sequences"))


def _class_generate(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """transformers' own ``generate``, after telling the neuron gates new sequences begin and
    letting the modules measure whether the kernels pay at the decode batch (CUDA, AUTO)."""
    mask = kwargs.get("attention_mask")
    start_sequences(model, mask if isinstance(mask, torch.Tensor) else None)
    batch = decode_batch(model, args, kwargs)
    if batch is not None:
        probe_batch(model, batch)
    return type(model).generate(model, *args, **kwargs)


def attach(model: nn.Module) -> None:
    """Bind the routing ``generate`` to ``model`` (an instance attribute over the class's)."""
    if hasattr(type(model), "generate"):
        model.__dict__["generate"] = types.MethodType(_generate, model)


def detach(model: nn.Module) -> None:
    """Remove the binding: ``model.generate`` is the class's again."""
    bound = model.__dict__.get("generate")
    if getattr(bound, "__func__", None) is _generate:
        del model.__dict__["generate"]
