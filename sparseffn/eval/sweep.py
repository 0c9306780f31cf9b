"""Quality against sparsity: every method at several levels, on held-out text, in one run.

A method spec is ``name[:scope[:allocation]][:option=value]``, e.g. ``teal:all``,
``teal:all:greedy``, ``teal:all:rotation=64``, ``cats``. Every (method, level) pair is
calibrated on its own, so the measured sparsity is the one ``sparsify`` gives at that target.
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

import sparseffn
from sparseffn.errors import SparseFFNError
from sparseffn.eval.perplexity import perplexity
from sparseffn.eval.speed import decode_speed
from sparseffn.eval.tasks import build_tasks


@dataclass
class QualityRow:
    method: str
    target: float
    measured: float  # measured sparsity of the sparsified projections (bytes-weighted)
    ffn_bytes_skipped: float
    all_bytes_skipped: float
    perplexity: float
    next_sentence: float
    last_word: float
    seconds: float
    decode_tok_s: float = 0.0  # greedy decode tokens/s on this machine (0: not measured)
    items: int = 0  # items per accuracy task (their standard errors follow from it)


#: Options a method spec may carry as ``name=value`` parts, with their types.
SPEC_OPTIONS = {"rotation": int}


def parse_method(spec: str) -> dict[str, Any]:
    """``"teal:all:greedy"`` or ``"teal:all:rotation=64"`` -> sparsify keyword arguments:
    positional parts are the method, scope and allocation; ``name=value`` parts are options
    (``SPEC_OPTIONS``)."""
    parts = spec.split(":")
    out: dict[str, Any] = {"method": parts[0]}
    positional = [p for p in parts[1:] if "=" not in p]
    out.update(zip(("scope", "allocation"), positional))
    if len(positional) > 2:
        raise SparseFFNError(f"method spec {spec!r} has {len(positional) + 1} positional parts; "
                         "the form is name[:scope[:allocation]][:option=value]")
    for part in parts[1:]:
        if "=" not in part:
            continue
        name, value = part.split("=", 1)
        if name not in SPEC_OPTIONS:
            raise SparseFFNError(f"method spec {spec!r}: unknown option {name!r} (options: "
                             f"{sorted(SPEC_OPTIONS)})")
        try:
            out[name] = SPEC_OPTIONS[name](value)
        except ValueError:
            raise SparseFFNError(f"method spec {spec!r}: {name} takes an integer, got "
                             f"{value!r}") from None
    return out


def evaluate(model: nn.Module, windows: torch.Tensor, tasks: Sequence[Any],
             progress: bool = False, prompt_len: int = 0) -> dict[str, float]:
    """Perplexity on ``windows`` (decode steps after ``prompt_len`` tokens if > 0) and
    accuracy on each task (progress bars if ``progress``)."""
    result = {"perplexity": perplexity(model, windows, progress=progress,
                                       prompt_len=prompt_len)}
    for task in tasks:
        result[task.name] = task.evaluate(model, progress=progress)
    return result


def decides_at_prompt(spec: str) -> bool:
    """Whether the method of ``spec`` fixes its active sets from the prompt (``coreinfer``),
    so that a whole-window forward (perplexity, the accuracy tasks) runs it densely."""
    from sparseffn.methods import method_class

    return method_class(parse_method(spec)["method"]).decides_at_prompt


def check_prompt_len(methods: Sequence[str], prompt_len: int) -> None:
    """Refuse methods that decide at the prompt unless perplexity is read on decode steps."""
    at_prompt = [m for m in methods if decides_at_prompt(m)]
    if at_prompt and not prompt_len:
        raise SparseFFNError(
            f"{at_prompt} choose their neurons from the prompt and compute the prompt densely, "
            "so a whole-window perplexity measures the dense model; pass a prompt length "
            "(--prompt-len, e.g. half of --seq-len) to score the decode steps after it")


def sparsified(model: nn.Module, tokenizer: Any, methods: Sequence[str],
               sparsities: Sequence[float], calibration: Any, n_tokens: int = 16384,
               seq_len: int = 512, log=print) -> Iterator[tuple[str, float]]:
    """Yield (method spec, level) with ``model`` sparsified at that level (calibrated on its
    own, stats reset), unsparsified again before the next."""
    for spec in methods:
        kwargs = parse_method(spec)
        for level in sparsities:
            log(f"{spec} at {level}: calibrating on {n_tokens} tokens, then evaluating ...")
            sparseffn.sparsify(model, sparsity=level, calibration=calibration,
                               tokenizer=tokenizer, n_tokens=n_tokens, seq_len=seq_len,
                               progress=False, **kwargs)
            sparseffn.reset_sparsity_stats(model)
            try:
                yield spec, level
            finally:
                sparseffn.unsparsify(model)


def standard_error(accuracy: float, items: int) -> float:
    """The standard error of an accuracy over ``items`` independent items."""
    return math.sqrt(accuracy * (1 - accuracy) / items) if items else float("nan")


def quality_sweep(model: nn.Module, tokenizer: Any, methods: Sequence[str],
                  sparsities: Sequence[float], calibration: Any, eval_texts: list[str],
                  eval_tokens: int = 4096, seq_len: int = 512, n_tokens: int = 16384,
                  n_items: int = 200, log=print,
                  on_row: Callable[[list[QualityRow]], None] | None = None,
                  decode_tokens: int = 0, prompt_len: int = 0) -> list[QualityRow]:
    """Dense plus every (method, sparsity) pair, each measured on the same held-out data.

    ``prompt_len`` > 0: perplexity is read on decode steps after that many prompt tokens of
    each window, for dense and every method (``perplexity``); methods that decide at the
    prompt need it, and their task accuracies (whole-window forwards) are NaN.

    With ``decode_tokens``, each row also times greedy decoding of that many tokens
    (``sparseffn.eval.speed``), dense and sparse in the same run on this machine.

    ``on_row(rows)`` is called after every finished row (e.g. to write the CSV so far), so a
    late failure loses nothing measured before it.
    """
    from sparseffn.data import token_windows

    check_prompt_len(methods, prompt_len)
    windows = token_windows(tokenizer, eval_texts, eval_tokens, seq_len, "evaluation")
    tasks = build_tasks(tokenizer, eval_texts, n_items)
    start = time.time()
    log(f"dense: perplexity on {windows.numel()} tokens and {len(tasks)} tasks of {n_items} "
        "items ...")
    dense = evaluate(model, windows, tasks, progress=True, prompt_len=prompt_len)
    rows = [QualityRow("dense", 0.0, 0.0, 0.0, 0.0, dense["perplexity"],
                       dense["next_sentence"], dense["last_word"], time.time() - start,
                       _speed(model, decode_tokens), n_items)]
    log(format_row(rows[-1]))
    if on_row is not None:
        on_row(rows)
    for spec, level in sparsified(model, tokenizer, methods, sparsities, calibration,
                                  n_tokens, seq_len, log):
        start = time.time()
        # Measured sparsity is read over the perplexity windows only: held-out text.
        ppl = perplexity(model, windows, progress=True, prompt_len=prompt_len)
        report = sparseffn.sparsity_report(model)
        at_prompt = decides_at_prompt(spec)  # its whole-window tasks would run densely
        accs = {task.name: math.nan if at_prompt else task.evaluate(model, progress=True)
                for task in tasks}
        rows.append(QualityRow(spec, level, report.overall, report.ffn_bytes_skipped,
                               report.all_bytes_skipped, ppl, accs["next_sentence"],
                               accs["last_word"], time.time() - start,
                               _speed(model, decode_tokens), n_items))
        log(format_row(rows[-1]))
        if on_row is not None:
            on_row(rows)
    return rows


def _speed(model: nn.Module, decode_tokens: int) -> float:
    return decode_speed(model, new_tokens=decode_tokens).tokens_per_s if decode_tokens else 0.0


def format_row(row: QualityRow) -> str:
    return (f"{row.method:<16} target {row.target:.2f} measured {row.measured:.3f} "
            f"ffn-bytes {row.ffn_bytes_skipped:.3f} ppl {row.perplexity:8.2f} "
            f"next-sent {_acc(row.next_sentence, row.items)} "
            f"last-word {_acc(row.last_word, row.items)} "
            + (f"decode {row.decode_tok_s:.1f} tok/s " if row.decode_tok_s else "")
            + f"({row.seconds:.0f}s)")


def _acc(value: float, items: int) -> str:
    return f"{value:.3f} ± {standard_error(value, items):.3f}" if items else f"{value:.3f}"


def markdown_table(rows: Sequence[QualityRow]) -> str:
    speed = any(r.decode_tok_s for r in rows)
    lines = ["| method | target | measured sparsity | FFN bytes skipped | all proj. bytes "
             "skipped | perplexity | next sentence | last word |"
             + (" decode tok/s |" if speed else ""),
             "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if speed else "")]
    for r in rows:
        lines.append(f"| {r.method} | {r.target:.2f} | {r.measured:.3f} | "
                     f"{r.ffn_bytes_skipped:.3f} | {r.all_bytes_skipped:.3f} | "
                     f"{r.perplexity:.2f} | {_acc(r.next_sentence, r.items)} | "
                     f"{_acc(r.last_word, r.items)} |"
                     + (f" {r.decode_tok_s:.1f} |" if speed else ""))
    return "\n".join(lines)


def write_csv(rows: Sequence[QualityRow | dict[str, Any]], path: str | Path,
              extra: dict[str, str]) -> None:
    """Write ``rows`` (QualityRows or dicts) with ``extra`` columns (device, versions, data)
    on every line."""
    dicts = [r if isinstance(r, dict) else asdict(r) for r in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(extra) + list(dicts[0]))
        writer.writeheader()
        for r in dicts:
            writer.writerow({**extra, **r})


def save_figure(fig: Any, title: str, path: str | Path, fontsize: int = 10) -> None:
    """Title, lay out and write a matplotlib figure to ``path`` (folders made), then close it."""
    import matplotlib.pyplot as plt
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(rows: Sequence[QualityRow], path: str | Path, title: str) -> None:
    """Perplexity and both accuracies against measured sparsity, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in rows if r.method == "dense")
    methods = list(dict.fromkeys(r.method for r in rows if r.method != "dense"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("perplexity", "perplexity (log)"), ("next_sentence", "next-sentence accuracy"),
              ("last_word", "last-word accuracy")]
    for ax, (field, label) in zip(axes, panels):
        for method in methods:
            # Each line starts at the dense model (sparsity 0), so one level is a line too.
            pts = [(0.0, getattr(dense, field))]
            pts += [(r.measured, getattr(r, field)) for r in rows if r.method == method]
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.axhline(getattr(dense, field), color="k", ls="--", lw=1, label="dense")
        ax.set_xlim(left=0.0)
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        ax.set_xlabel("measured sparsity of sparsified projections")
        ax.set_ylabel(label)
        if field == "perplexity":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, title, path)
