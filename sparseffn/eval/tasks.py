"""Two accuracy tasks built from held-out text, with no benchmark download.

- NextSentenceTask: given two sentences of context, pick the true next sentence among four
  (three distractors drawn from elsewhere in the text); candidates are scored by their mean
  token log-probability (length-normalised, so short distractors get no edge). Chance: 0.25.
- LastWordTask: given a passage without its final word, the model's greedy prediction must
  produce every token of that word (LAMBADA-style, teacher-forced argmax).

Both are deterministic for a given text, tokenizer and seed.
"""
from __future__ import annotations

import random
import re

import torch
from torch import nn
from tqdm.auto import tqdm

_SENTENCE = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z])")


def sentences(texts: list[str], min_words: int = 5, max_words: int = 40) -> list[list[str]]:
    """Per document, its sentences of ``min_words``..``max_words`` words (runs kept in order)."""
    out = []
    for doc in texts:
        flat = re.sub(r"\s+", " ", doc).strip()
        sents = [s.strip() for s in _SENTENCE.split(flat)]
        out.append([s for s in sents if min_words <= len(s.split()) <= max_words])
    return out


@torch.no_grad()
def _target_scores(model: nn.Module, rows: list[tuple[list[int], list[int]]], pad: int,
                   batch_size: int, desc: str = "", progress: bool = False
                   ) -> list[tuple[float, bool]]:
    """Per row of (context ids, target ids): (mean log-prob of the target tokens, whether the
    greedy argmax hits every one of them).

    Rows are left-padded so every target sits at the tail, and only the tail's logits are
    computed (``logits_to_keep``): the vocabulary projection dominates a small model's cost.
    """
    device = model.get_input_embeddings().weight.device
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch",
                      disable=not progress):
        chunk = rows[start:start + batch_size]
        length = max(len(c) + len(t) for c, t in chunk)
        tail = max(len(t) for _, t in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, (ctx, tgt) in enumerate(chunk):
            ids[i, length - len(ctx) - len(tgt):] = torch.tensor(ctx + tgt)
            mask[i, length - len(ctx) - len(tgt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device), use_cache=False,
                       logits_to_keep=tail + 1).logits.float().cpu()
        logp = logits[:, :-1].log_softmax(-1)  # position j predicts token length - tail + j
        for i, (_, tgt) in enumerate(chunk):
            target = torch.tensor(tgt)
            pred = logp[i, tail - len(tgt):]
            lp = pred.gather(-1, target[:, None]).mean()
            out.append((float(lp), bool((pred.argmax(-1) == target).all())))
    return out


class NextSentenceTask:
    """Pick the true next sentence among four."""

    name = "next_sentence"

    def __init__(self, tokenizer, texts: list[str], n_items: int = 200, seed: int = 0) -> None:
        rng = random.Random(seed)
        # Sentences of at most 25 words keep the 4 scored sequences per item short.
        docs = [d for d in sentences(texts, max_words=25) if len(d) >= 3]
        pool = [s for d in docs for s in d]
        triples = [(d[i - 2], d[i - 1], d[i]) for d in docs for i in range(2, len(d))]
        rng.shuffle(triples)
        self.tokenizer = tokenizer
        self.items: list[tuple[str, list[str], int]] = []
        for a, b, true in triples[:n_items]:
            distractors = rng.sample([s for s in pool if s != true], 3)
            candidates = distractors + [true]
            rng.shuffle(candidates)
            self.items.append((f"{a} {b}", candidates, candidates.index(true)))
        if not self.items:
            raise ValueError("no usable sentence triples in the evaluation text")

    def evaluate(self, model: nn.Module, batch_size: int = 16, progress: bool = False) -> float:
        tok = self.tokenizer
        rows = []
        for context, candidates, _ in self.items:
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            rows += [(ctx, tok(" " + c, add_special_tokens=False)["input_ids"]) for c in candidates]
        scores = _target_scores(model, rows, tok.pad_token_id or 0, batch_size, self.name,
                                progress)
        correct = 0
        for k, (_, _, label) in enumerate(self.items):
            lps = [s[0] for s in scores[4 * k:4 * k + 4]]
            correct += int(max(range(4), key=lps.__getitem__) == label)
        return correct / len(self.items)


class LastWordTask:
    """Predict the last word of a passage (all its tokens by greedy argmax)."""

    name = "last_word"

    def __init__(self, tokenizer, texts: list[str], n_items: int = 200, seed: int = 0) -> None:
        rng = random.Random(seed)
        passages = []
        for doc in sentences(texts, min_words=4):
            for i in range(1, len(doc), 2):
                passage = f"{doc[i - 1]} {doc[i]}".rstrip(" .!?\"')]")
                words = passage.split()
                if len(words) > 8 and re.fullmatch(r"[A-Za-z]{3,}", words[-1]):
                    passages.append((" ".join(words[:-1]), words[-1]))
        rng.shuffle(passages)
        self.tokenizer = tokenizer
        self.items = passages[:n_items]
        if not self.items:
            raise ValueError("no usable passages in the evaluation text")

    def evaluate(self, model: nn.Module, batch_size: int = 16, progress: bool = False) -> float:
        tok = self.tokenizer
        rows = [(tok(ctx, add_special_tokens=False)["input_ids"],
                 tok(" " + word, add_special_tokens=False)["input_ids"])
                for ctx, word in self.items]
        scores = _target_scores(model, rows, tok.pad_token_id or 0, batch_size, self.name,
                                progress)
        return sum(hit for _, hit in scores) / len(scores)


def build_tasks(tokenizer, texts: list[str], n_items: int = 200,
                seed: int = 0) -> list[NextSentenceTask | LastWordTask]:
    return [NextSentenceTask(tokenizer, texts, n_items, seed),
            LastWordTask(tokenizer, texts, n_items, seed)]
