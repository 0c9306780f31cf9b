"""Decode speed on the machine at hand: greedy ``model.generate`` tokens per second.

Reported beside every quality number a user sees (the demo, ``sparseffn eval``), dense and
sparse in the same run, with the device's name and the thread count, so that a speed claim
always says where it was measured.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class DecodeSpeed:
    """Greedy decoding after a prompt, decode steps only (the prefill is subtracted)."""

    tokens_per_s: float
    prompt: int
    new_tokens: int
    device: str
    threads: int
    batch: int = 1

    def describe(self) -> str:
        seqs = f" ({self.batch} sequences)" if self.batch > 1 else ""
        return (f"greedy decode of {self.new_tokens} tokens after a {self.prompt}-token "
                f"prompt{seqs} on {self.device}, {self.threads} threads")


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's model name (``/proc/cpuinfo`` where there is one)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _seconds(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)
    return time.perf_counter() - start


@torch.no_grad()
def decode_speed(model: nn.Module, prompt: int = 128, new_tokens: int = 64, repeats: int = 3,
                 seed: int = 0, batch: int = 1) -> DecodeSpeed:
    """Tokens per second of ``model.generate`` (greedy) over ``new_tokens`` decode steps, summed
    over the ``batch`` sequences decoded together.

    The prompts are random token ids [batch, prompt]. Each repeat times a generation of
    ``new_tokens`` and one of a single token (prefill and first token) and takes the
    difference, so the rate is that of decode steps; the median of ``repeats`` is reported,
    after one warm-up.
    """
    device = model.get_input_embeddings().weight.device
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, prompt), generator=g).to(device)
    _seconds(model, ids, 2)  # warm-up
    rates = []
    for _ in range(repeats):
        steps = _seconds(model, ids, new_tokens) - _seconds(model, ids, 1)
        rates.append(batch * (new_tokens - 1) / max(steps, 1e-9))
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return DecodeSpeed(statistics.median(rates), prompt, new_tokens, device_name(device),
                       threads, batch)
