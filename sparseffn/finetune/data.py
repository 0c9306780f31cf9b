"""Training text as token windows, and the dataset the Trainer reads them from.

Any text input ``sparseffn.data.load_texts`` accepts works: a built-in source (its calibration
split: the evaluation split stays held out), a list of strings, a ``.txt``/``.jsonl`` file or
folder, or a ``datasets`` dataset (its text column).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from sparseffn.data import load_texts, token_windows
from sparseffn.errors import CalibrationError
from sparseffn.finetune.errors import FinetuneError


def training_texts(data: Any, text_field: str = "text") -> list[str]:
    """Documents to train on (a built-in source's calibration split), or a clear error."""
    try:
        return load_texts(data, "calibration", text_field)
    except CalibrationError as exc:
        raise FinetuneError(f"training data: {exc}") from exc


def training_windows(tokenizer: Any, texts: list[str], n_windows: int, seq_len: int,
                     ) -> torch.Tensor:
    """``n_windows`` windows of ``seq_len`` tokens spread over the whole text.

    Returns:
        LongTensor [n, seq_len]; n < n_windows only when the text is too short, in which case
        the windows are distinct and the Trainer cycles over them.
    """
    if n_windows <= 0 or seq_len <= 1:
        raise FinetuneError(f"need at least one window of >= 2 tokens, got {n_windows} x {seq_len}")
    try:
        return token_windows(tokenizer, texts, n_windows * seq_len, seq_len, "training",
                             spread=1 << 20)
    except CalibrationError as exc:
        raise FinetuneError(f"training data: {exc}") from exc


class WindowDataset(Dataset):
    """Token windows as causal-LM examples: ``{"input_ids": [L], "labels": [L]}``."""

    def __init__(self, windows: torch.Tensor) -> None:
        if windows.ndim != 2 or windows.shape[0] == 0:
            raise FinetuneError(f"training windows must be a non-empty [N, L] tensor, got "
                                f"shape {tuple(windows.shape)}")
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = self.windows[i]
        return {"input_ids": w, "labels": w.clone()}
