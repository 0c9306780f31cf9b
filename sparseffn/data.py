"""Text for calibration and evaluation: built-in offline sources and user data.

Built-in sources come from package registries (no model hub, no web), fetched once into the
cache by ``scripts/fetch_texts.py`` (the library calls no package manager), each split so that
evaluation text is never calibration text:

- ``austen``: Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (R data, parsed with
  ``rdata``). Calibration: Emma, Mansfield Park, Northanger Abbey, Pride and Prejudice, Sense and
  Sensibility. Evaluation: Persuasion.
- ``pydoc``: the standard library's ``pydoc_data.topics`` (technical English, always present).
  Topics are assigned to a split by a stable hash of their text (about 1 in 5 is evaluation).
- ``news``: 300 Australian news articles (``lee_background.cor``) read from the ``gensim`` wheel
  without installing it. Article i is evaluation when i % 5 == 4.

User data: a list of strings, a ``.txt``/``.jsonl`` file or a folder of them, or a ``datasets``
dataset (its ``text`` column).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from sparseffn.errors import CalibrationError

SPLITS = ("calibration", "eval")
BUILTIN_SOURCES = ("austen", "pydoc", "news")
AUSTEN_EVAL_BOOKS = ("persuasion",)


def cache_dir() -> Path:
    """Where fetched data and converted models live (``$SPARSEFFN_CACHE`` or ~/.cache)."""
    root = os.environ.get("SPARSEFFN_CACHE") or Path.home() / ".cache" / "sparseffn"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


#: How to fetch a built-in source into the cache (the library itself downloads nothing).
FETCH = {"austen": "Debian's r-cran-janeaustenr (apt-get download)",
         "news": "the gensim wheel on PyPI (pip download)"}


def _cached(source: str) -> Any:
    """The cached JSON of a fetched source, or a CalibrationError saying how to fetch it."""
    target = cache_dir() / f"{source}.json"
    if not target.exists():
        raise CalibrationError(
            f"the built-in source {source!r} is not in the cache ({target}): fetch it once from "
            f"{FETCH[source]} with `python scripts/fetch_texts.py {source}` from the source "
            "checkout (scripts/install.sh does), or use 'pydoc' (always present) or your own "
            "texts")
    return json.loads(target.read_text())


def _pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics
    return dict(sorted(topics.items()))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` whole (never half written, even with two writers)."""
    # A temporary name of this process's own: two processes fetching at once (test workers,
    # data-parallel ranks) each replace the file whole, and neither sees the other half written.
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def builtin_texts(source: str, split: str) -> list[str]:
    """Documents of a built-in source for ``split`` in {"calibration", "eval"}."""
    if split not in SPLITS:
        raise CalibrationError(f"split must be one of {SPLITS}, got {split!r}")
    want_eval = split == "eval"
    if source == "austen":
        books = _cached("austen")
        return [text for name, text in books.items() if (name in AUSTEN_EVAL_BOOKS) == want_eval]
    if source == "pydoc":
        # Several topic names share one text, so split (and deduplicate) by content.
        unique = dict.fromkeys(_pydoc_topics().values())
        return [text for text in unique
                if (int(hashlib.sha1(text.encode()).hexdigest(), 16) % 5 == 4) == want_eval]
    if source == "news":
        return [a for i, a in enumerate(_cached("news")) if (i % 5 == 4) == want_eval]
    raise CalibrationError(
        f"unknown text source {source!r}: built-in sources are {BUILTIN_SOURCES}; "
        "or pass a list of strings, a .txt/.jsonl file or folder, or a datasets dataset"
    )


def _read_file(path: Path, text_field: str) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)[text_field])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CalibrationError(
                    f"{path}:{n} is not a JSON object with a {text_field!r} field ({exc})"
                ) from exc
        return docs
    return [path.read_text()]


def load_texts(data: Any, split: str = "calibration", text_field: str = "text") -> list[str]:
    """Normalise any supported text input to a list of non-empty documents.

    Args:
        data: a built-in source name, a path (``.txt``, ``.jsonl`` or a folder of them), a
            list/tuple of strings, or a ``datasets.Dataset``.
        split: which split of a built-in source.
        text_field: the field holding the text in jsonl files and datasets.
    """
    if isinstance(data, str) and data in BUILTIN_SOURCES:
        docs = builtin_texts(data, split)
    elif isinstance(data, (str, os.PathLike)) and Path(data).exists():
        path = Path(data)
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) \
            if path.is_dir() else [path]
        docs = [d for f in files for d in _read_file(f, text_field)]
    elif isinstance(data, str):
        raise CalibrationError(
            f"{data!r} is neither a built-in source {BUILTIN_SOURCES} nor an existing path"
        )
    elif hasattr(data, "column_names"):  # a datasets.Dataset
        if text_field not in data.column_names:
            raise CalibrationError(
                f"dataset has columns {data.column_names}; pass text_field= naming the text one"
            )
        docs = list(data[text_field])
    elif isinstance(data, Iterable):
        docs = list(data)
        bad = [type(d).__name__ for d in docs if not isinstance(d, str)]
        if bad:
            raise CalibrationError(f"text data must be strings, found {bad[0]}")
    else:
        raise CalibrationError(f"cannot read text from a {type(data).__name__}")
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise CalibrationError("the text data is empty: pass at least one non-empty document")
    return docs


def token_windows(tokenizer: Any, texts: list[str], n_tokens: int, seq_len: int,
                  purpose: str = "calibration", spread: int = 64,
                  bos: int | None = None) -> torch.Tensor:
    """Windows of ``seq_len`` tokens, about ``n_tokens`` in all, spread evenly over the text.

    Documents are concatenated (separated by EOS); windows are taken at even strides over the
    first ``spread * n_tokens`` tokens, so a calibration sees every book of a corpus rather than
    the opening of the first one. With ``bos``, each window is that token followed by
    ``seq_len - 1`` tokens of text (for families whose models expect BOS first, e.g. Gemma).

    Returns:
        LongTensor [n_windows, seq_len], n_windows = n_tokens // seq_len (fewer if the text is
        short).

    Raises:
        CalibrationError: if the text holds fewer than ``seq_len`` tokens.
    """
    if bos is not None:
        if seq_len < 2:
            raise CalibrationError(f"seq_len must be at least 2 with a BOS token, got {seq_len}")
        text = token_windows(tokenizer, texts, n_tokens, seq_len - 1, purpose, spread)
        return torch.cat([torch.full((len(text), 1), bos, dtype=text.dtype), text], dim=1)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for doc in texts:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"] + sep)
        if len(ids) >= spread * n_tokens:
            break
    available = len(ids) // seq_len
    if available == 0:
        raise CalibrationError(
            f"{purpose} text has only {len(ids)} tokens, fewer than one window of {seq_len}; "
            "pass more text or a smaller seq_len"
        )
    n_windows = max(1, min(n_tokens // seq_len, available))
    starts = torch.linspace(0, (available - 1) * seq_len, n_windows).long() // seq_len * seq_len
    stream = torch.tensor(ids[: available * seq_len])
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])
