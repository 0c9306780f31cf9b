"""A lean decode loop: static cache, one compiled forward per step, sampling on the device.

Hugging Face ``generate`` spends about a millisecond of Python per step on logits processors,
stopping criteria and bookkeeping (measured on an H100: 569 tok/s through ``generate`` against
1475 tok/s for a plain loop on a one-layer model of Llama-3-8B's width), which caps the speedup
any faster forward can show. ``generate`` here does only what a step needs: one compiled
forward (``torch.compile(fullgraph=True, mode="reduce-overhead")``, i.e. CUDA graphs on a GPU)
over a ``StaticCache``, then greedy choice or temperature / top-k / top-p sampling in torch.
Greedy outputs equal ``model.generate(..., do_sample=False)``'s. It works on any model, patched
or not, so dense and sparse are timed in the same harness.

The compiled step and its cache are kept on the model per (batch, cache length, device,
compile) and reused: a second call compiles nothing, and changing the sparsity level
(thresholds are updated in place) does not recompile either. Each loop compiles its own static
graph: see ``_own_code``.
"""
from __future__ import annotations

import inspect
import types
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from sparseffn.errors import SparseFFNError
from sparseffn.modules import probe_batch, start_sequences

LOOPS_ATTR = "_sparseffn_decode_loops"
EOS_CHECK_EVERY = 8  # steps between host syncs that test whether every sequence has ended


@dataclass
class _Loop:
    cache: object  # transformers.StaticCache
    step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def cache_kwarg(model: nn.Module) -> str:
    """The name ``model.forward`` takes its KV cache under: ``cache`` in recent transformers,
    ``past_key_values`` before (still accepted there, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"


def _make_loop(model: nn.Module, batch: int, max_len: int, compile: bool) -> _Loop:
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    cache_arg = {cache_kwarg(model): cache}

    def step(token: torch.Tensor, position: torch.Tensor,
             mask: torch.Tensor | None) -> torch.Tensor:
        """token [B, 1], position [B, 1] -> next-token logits [B, V]."""
        out = model(input_ids=token, position_ids=position, attention_mask=mask,
                    use_cache=True, **cache_arg)
        return out.logits[:, -1, :]

    if compile:
        step = torch.compile(_own_code(step, f"step_b{batch}_len{max_len}"), fullgraph=True,
                             mode="reduce-overhead", dynamic=False)
    return _Loop(cache, step)


def _own_code(fn: types.FunctionType, name: str) -> types.FunctionType:
    """``fn`` over a copy of its code object, named ``name``.

    Dynamo keeps its compiled graphs and its shape history per code object. Every loop's step
    is the same function, so a second loop (another cache length, e.g. ``model.generate``'s
    power-of-two cache after the lean loop's exact one) used to make dynamo mark the cache
    length dynamic and compile a symbolic-shape graph, which then served every loop, the
    first included (found on an H100 on 2026-12-07: the harness timed second in a process ran
    slower). A code object per loop keeps each graph static and each loop's graphs apart
    (so no loop counts towards another's recompile limit); ``dynamic=False`` says the same.
    """
    names = {"co_name": name}
    if hasattr(fn.__code__, "co_qualname"):  # Python 3.11+
        names["co_qualname"] = name
    code = fn.__code__.replace(**names)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _loop(model: nn.Module, batch: int, max_len: int, compile: bool) -> _Loop:
    loops = model.__dict__.setdefault(LOOPS_ATTR, {})
    key = (batch, max_len, str(next(model.parameters()).device), compile)
    if key not in loops:
        loops[key] = _make_loop(model, batch, max_len, compile)
    return loops[key]


def clear_decode_loops(model: nn.Module) -> None:
    """Drop the compiled steps and caches ``generate`` keeps on ``model`` (frees the caches)."""
    model.__dict__.pop(LOOPS_ATTR, None)


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int,
            top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: argmax, or temperature -> top-k -> top-p sampling.

    Outside the compiled step: inside it, inductor's argmax over a 128k vocabulary took 28 us
    against ATen's 35 (H200, 2026-12-02), and its output, a CUDA-graph buffer fed back as the
    next step's input, needs a copy; not worth it."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k > 0:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_scores.softmax(dim=-1) > top_p  # keep the token that crosses top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_args(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                max_new_tokens: int, temperature: float, top_p: float) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.dtype != torch.long:
        raise SparseFFNError(f"input_ids must be a non-empty LongTensor [batch, prompt_len]; "
                             f"got {input_ids.dtype} {list(input_ids.shape)}")
    if max_new_tokens < 1:
        raise SparseFFNError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise SparseFFNError(f"attention_mask {list(attention_mask.shape)} must have the shape "
                             f"of input_ids {list(input_ids.shape)} (left padding)")
    if temperature <= 0 or not 0 < top_p <= 1:
        raise SparseFFNError("temperature must be > 0 and top_p in (0, 1]; for greedy "
                             "decoding pass do_sample=False")


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 128, *,
             attention_mask: torch.Tensor | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             compile: bool = True, max_cache_len: int | None = None,
             generator: torch.Generator | None = None, min_new_tokens: int = 0,
             streamer: object | None = None,
             stopping_criteria: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
             = None) -> torch.Tensor:
    """Decode ``max_new_tokens`` after ``input_ids`` with a static cache and a compiled step.

    Args:
        model: a transformers causal LM (patched by sparseffn or not).
        input_ids: LongTensor [B, P]; batches are left-padded, with ``attention_mask`` [B, P]
            marking real tokens with 1.
        do_sample, temperature, top_k, top_p, generator: sampling as in ``generate``
            (temperature, then top-k, then top-p); greedy when ``do_sample`` is False.
        eos_token_id, pad_token_id: a sequence that emits an EOS token continues with pads;
            the loop stops early once every sequence has ended (checked every 8 steps).
            Default to the model's generation config.
        min_new_tokens: EOS tokens are never chosen before this many new tokens (as
            ``generate``'s ``min_new_tokens``).
        streamer: a transformers streamer (batch 1): it receives the prompt, then each new
            token as it is chosen, then ``end()``; the loop then stops as soon as EOS comes.
        stopping_criteria: called after each token as transformers calls it, on the tokens so
            far [B, P + t] (and scores=None), returning a bool per sequence (or one for all);
            decoding ends once every sequence is stopped, and with an EOS token set a stopped
            sequence continues with pads, as in transformers. A host sync per step.
        compile: compile the step (CUDA graphs on a GPU); False runs it eagerly.
        max_cache_len: the static cache's length (default P + max_new_tokens); a fixed value
            lets calls with different prompt lengths share one compiled step.

    Returns:
        LongTensor [B, P + n] of prompt and new tokens, n <= max_new_tokens.
    """
    _check_args(input_ids, attention_mask, max_new_tokens, temperature, top_p)
    B, P = input_ids.shape
    total = P + max_new_tokens
    max_len = max_cache_len or total
    if max_len < total:
        raise SparseFFNError(f"max_cache_len={max_len} is shorter than the prompt plus the new "
                             f"tokens ({total})")
    gen_config = getattr(model, "generation_config", None)
    if eos_token_id is None and gen_config is not None:
        eos_token_id = gen_config.eos_token_id
    if pad_token_id is None and gen_config is not None:
        pad_token_id = gen_config.pad_token_id
    eos = torch.tensor([] if eos_token_id is None else
                       [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                       device=input_ids.device, dtype=torch.long)
    pad = (pad_token_id if pad_token_id is not None
           else int(eos[0]) if eos.numel() else 0)

    probe_batch(model, B)  # before the step is compiled: it decides the step's path at B > 1
    loop = _loop(model, B, max_len, compile)
    loop.cache.reset()
    start_sequences(model, attention_mask)
    mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        # Full-length mask: the prompt's padding, then ones (the causal mask hides the future),
        # so every step sees the same shape and the compiled graph is reused.
        mask = torch.ones(B, max_len, dtype=attention_mask.dtype, device=input_ids.device)
        mask[:, :P] = attention_mask
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        next_pos = attention_mask.long().sum(-1, keepdim=True)
    else:
        positions = torch.arange(P, device=input_ids.device).expand(B, P)
        next_pos = torch.full((B, 1), P, device=input_ids.device, dtype=torch.long)

    out = model(input_ids=input_ids, position_ids=positions, attention_mask=mask,
                use_cache=True, logits_to_keep=1, **{cache_kwarg(model): loop.cache})
    tokens = torch.full((B, total), pad, dtype=torch.long, device=input_ids.device)
    tokens[:, :P] = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    logits = out.logits[:, -1, :]
    # A streamer reads every token anyway (a host sync per step): test for the end each step.
    check_every = 1 if streamer is not None or stopping_criteria is not None \
        else EOS_CHECK_EVERY
    stops = eos.numel() > 0 or stopping_criteria is not None
    if streamer is not None:
        streamer.put(input_ids.cpu())
    n = 0
    for t in range(max_new_tokens):
        if t < min_new_tokens and eos.numel():
            logits = logits.index_fill(-1, eos, float("-inf"))
        nxt = _choose(logits, do_sample, temperature, top_k, top_p, generator)
        if eos.numel():  # as transformers: finished sequences get pads only if EOS is set
            nxt = torch.where(finished, pad, nxt)
        tokens[:, P + t] = nxt
        n = t + 1
        if streamer is not None:
            streamer.put(nxt.cpu())
        if stops:
            finished |= torch.isin(nxt, eos)
            if stopping_criteria is not None:
                # scores=None as generate passes them unless it returns scores; the logits
                # here are a CUDA-graph buffer the next step overwrites.
                done = stopping_criteria(tokens[:, :P + n], None)
                finished |= torch.as_tensor(done, device=finished.device)
            if (t + 1) % check_every == 0 and bool(finished.all()):
                break
        if t + 1 == max_new_tokens:
            break
        logits = loop.step(nxt[:, None], next_pos + t, mask)
    if streamer is not None:
        streamer.end()
    return tokens[:, :P + _length(tokens[:, P:P + n], eos, n)]


def _length(new: torch.Tensor, eos: torch.Tensor, n: int) -> int:
    """Steps until the last sequence emitted its first EOS (``generate`` stops there), else n."""
    if not eos.numel():
        return n
    hit = torch.isin(new, eos)
    ended = hit.any(dim=1)
    if not bool(ended.all()):
        return n
    return int(hit.float().argmax(dim=1).max()) + 1
