"""EleutherAI's lm-eval harness driving a patched model, with offline tasks over built-in text.

lm-eval's ``HFLM`` takes an in-memory model, so a sparsified model is evaluated exactly as
users evaluate any model: the patched modules run inside lm-eval's own batching, and the
sparsity report is read after each run. lm-eval is an optional extra
(``pip install 'sparseffn[lm-eval]'``); the standard tasks (wikitext, hellaswag, arc_easy,
piqa, winogrande, ...) need their datasets from the Hugging Face Hub, so this module also
writes three offline tasks per built-in source, one per lm-eval request type, over that
source's held-out split:

- ``sparseffn_ppl_<source>``: rolling log-likelihood over passages of about 250 words
  (``loglikelihood_rolling``): word and byte perplexity, bits per byte.
- ``sparseffn_nextsent_<source>``: the true next sentence among four after two sentences of
  context (``loglikelihood``, multiple choice): acc and acc_norm, chance 0.25.
- ``sparseffn_lastword_<source>``: greedy generation of a passage's last word
  (``generate_until``, which calls ``model.generate``): exact match of the first word.

Tasks are written as JSONL data plus YAML configs into a folder lm-eval's ``TaskManager``
scans, keyed by a hash of their content so a re-run reuses them.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

import sparseffn

from sparseffn.data import BUILTIN_SOURCES, cache_dir, load_texts
from sparseffn.errors import SparseFFNError
from sparseffn.eval.tasks import LastWordTask, NextSentenceTask

KINDS = ("ppl", "nextsent", "lastword")
PREFIX = "sparseffn_"
#: Words per rolling-perplexity passage: a few hundred tokens, one or two windows each.
PASSAGE_WORDS = 250
#: The metric each offline task reports first (the one tables show).
HEADLINE = {"ppl": "word_perplexity", "nextsent": "acc", "lastword": "exact_match"}

_YAML = {
    "ppl": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""",
    "nextsent": """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""",
    "lastword": """output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{word}}"
generation_kwargs:
  until: ["\\n", ".", ",", ";", ":", "!", "?"]
  do_sample: false
  max_gen_toks: 8
filter_list:
  - name: first_word
    filter:
      - function: regex
        regex_pattern: "([A-Za-z']+)"
      - function: take_first
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true}
""",
}


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _need_lm_eval() -> None:
    if not lm_eval_available():
        raise SparseFFNError("lm-eval is not installed: pip install 'sparseffn[lm-eval]' "
                             "(or pip install lm-eval)")


def offline_task_names(sources: Sequence[str] = ("austen",)) -> list[str]:
    """The offline tasks of ``sources`` (built-in source names), three per source."""
    for source in sources:
        if source not in BUILTIN_SOURCES:
            raise SparseFFNError(f"offline lm-eval tasks exist for the built-in sources "
                                 f"{BUILTIN_SOURCES}; got {source!r}")
    return [f"{PREFIX}{kind}_{source}" for source in sources for kind in KINDS]


def _passages(texts: list[str], n: int) -> list[str]:
    words = " ".join(re.sub(r"\s+", " ", t).strip() for t in texts).split()
    return [" ".join(words[i:i + PASSAGE_WORDS])
            for i in range(0, len(words) - PASSAGE_WORDS + 1, PASSAGE_WORDS)][:n]


def _docs(kind: str, texts: list[str], items: int, seed: int) -> list[dict[str, Any]]:
    if kind == "ppl":
        return [{"text": p} for p in _passages(texts, items)]
    if kind == "nextsent":
        task = NextSentenceTask(None, texts, items, seed)
        return [{"context": c, "choices": cands, "label": label}
                for c, cands, label in task.items]
    return [{"context": c, "word": w} for c, w in LastWordTask(None, texts, items, seed).items]


def write_offline_tasks(sources: Sequence[str] = ("austen",), items: int = 500, seed: int = 0,
                        folder: str | Path | None = None) -> Path:
    """Write the offline tasks of ``sources`` (``items`` documents each, from the held-out
    split) and return the folder to pass to lm-eval's ``TaskManager(include_path=...)``.

    The folder defaults to one under the sparseffn cache named by a hash of the tasks'
    content; files are written to a temporary name first, so a crash leaves no half task.
    """
    offline_task_names(sources)
    built = {}
    for source in sources:
        texts = load_texts(source, "eval")
        for kind in KINDS:
            built[f"{PREFIX}{kind}_{source}"] = (kind, _docs(kind, texts, items, seed))
    digest = hashlib.sha256(json.dumps(
        {k: v for k, v in sorted(built.items())}, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(folder) if folder is not None else cache_dir() / "lm_eval_tasks" / digest
    root.mkdir(parents=True, exist_ok=True)
    for name, (kind, docs) in built.items():
        data = root / f"{name}.jsonl"
        _atomic(data, "".join(json.dumps(d) + "\n" for d in docs))
        config = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                  f"    test: {json.dumps(str(data.resolve()))}\ntest_split: test\n"
                  + _YAML[kind] + "metadata:\n  version: 1.0\n")
        _atomic(root / f"{name}.yaml", config)
    return root


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run_lm_eval(model: nn.Module, tokenizer: Any, tasks: Sequence[str], *,
                include_path: str | Path | None = None, batch_size: int = 8,
                limit: int | None = None, bootstrap_iters: int = 1000
                ) -> dict[str, dict[str, float]]:
    """lm-eval's ``simple_evaluate`` on ``model`` as it is (patched or not).

    Args:
        tasks: lm-eval task names (the offline ones need ``include_path`` from
            ``write_offline_tasks``; standard ones need their datasets).
        batch_size: lm-eval's batch size for log-likelihood and generation requests.
        limit: at most this many documents per task.
        bootstrap_iters: resamples for the standard errors lm-eval bootstraps (perplexities).

    Returns:
        {task: {metric: value, metric + "_stderr": standard error}} for every numeric
        metric of every task: lm-eval's "metric,filter" keys reduced to the metric name, or
        to "metric/filter" where a task reports through several filters.
    """
    _need_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                                  limit=limit, bootstrap_iters=bootstrap_iters,
                                  log_samples=False)
    results: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        numeric = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and "," in k}
        # A task reporting through several filters (gsm8k's strict and flexible match) keeps
        # them apart as metric/filter; one filter: the plain metric name.
        several = len({k.split(",", 1)[1] for k in numeric}) > 1
        results[task] = {}
        for key, value in numeric.items():
            metric, filt = key.split(",", 1)
            stderr = metric.endswith("_stderr")
            base = metric[:-len("_stderr")] if stderr else metric
            name = f"{base}/{filt}" if several else base
            results[task][name + ("_stderr" if stderr else "")] = value
    return results


def headline(task: str) -> str:
    """The metric a table shows for ``task``: the offline tasks' own, else lm-eval's usual
    first metric (acc)."""
    for kind, metric in HEADLINE.items():
        if task.startswith(f"{PREFIX}{kind}_"):
            return metric
    return "acc"


def harness_sweep(model: nn.Module, tokenizer: Any, methods: Sequence[str],
                  sparsities: Sequence[float], calibration: Any, tasks: Sequence[str], *,
                  include_path: str | Path | None = None, batch_size: int = 8,
                  limit: int | None = None, n_tokens: int = 16384, seq_len: int = 512,
                  log=print, on_row: Callable[[list[dict]], None] | None = None
                  ) -> list[dict[str, Any]]:
    """lm-eval on the dense model, then on every (method, level), each calibrated on its own.

    Returns one row per (model state, task, metric): method, target, measured sparsity (over
    everything the run fed the model), FFN and all-projection bytes skipped, task, metric,
    value, stderr (blank where lm-eval reports none), seconds. ``on_row(rows)`` after every
    model state, so a late failure keeps what was measured.
    """
    from sparseffn.eval.sweep import sparsified

    rows: list[dict[str, Any]] = []

    def measure(method: str, target: float) -> None:
        start = time.time()
        results = run_lm_eval(model, tokenizer, tasks, include_path=include_path,
                              batch_size=batch_size, limit=limit)
        report = sparseffn.sparsity_report(model) if sparseffn.is_sparsified(model) else None
        for task, metrics in results.items():
            for metric, value in metrics.items():
                if metric.endswith("_stderr"):
                    continue
                stderr = metrics.get(f"{metric}_stderr")
                rows.append({
                    "method": method, "target": target,
                    "measured": round(report.overall, 4) if report else 0.0,
                    "ffn_bytes_skipped": round(report.ffn_bytes_skipped, 4) if report else 0.0,
                    "all_bytes_skipped": round(report.all_bytes_skipped, 4) if report else 0.0,
                    "task": task, "metric": metric, "value": value,
                    "stderr": stderr if stderr is not None and math.isfinite(stderr) else "",
                    "seconds": round(time.time() - start, 1)})
        log(f"{method} at {target}: " + ", ".join(
            f"{task} {headline(task)} {_cell(rows, method, target, task)}"
            for task in results))
        if on_row is not None:
            on_row(rows)

    log(f"dense: lm-eval on {', '.join(tasks)} ...")
    measure("dense", 0.0)
    for spec, level in sparsified(model, tokenizer, methods, sparsities, calibration,
                                  n_tokens, seq_len, log):
        measure(spec, level)
    return rows


def _cell(rows: list[dict], method: str, target: float, task: str) -> str:
    """``value ± stderr`` of ``task``'s headline metric in ``rows`` (blank if absent)."""
    metric = headline(task)
    for r in rows:
        if (r["method"], r["target"], r["task"], r["metric"]) == (method, target, task, metric):
            return f"{r['value']:.3f}" + (f" ± {r['stderr']:.3f}" if r["stderr"] != "" else "")
    return ""


def harness_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per model state, one column per task (its headline metric)."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    states = list(dict.fromkeys((r["method"], r["target"], r["measured"]) for r in rows))
    lines = ["| method | target | measured sparsity | "
             + " | ".join(f"{t} ({headline(t)})" for t in tasks) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in tasks) + " |"]
    for method, target, measured in states:
        lines.append(f"| {method} | {target:.2f} | {measured:.3f} | "
                     + " | ".join(_cell(rows, method, target, t) for t in tasks) + " |")
    return "\n".join(lines)

