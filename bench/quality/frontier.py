"""The usable-speedup report: for each method, the highest sparsity whose perplexity stays
within p% of dense (PPL-p% sparsity, as the Sparsing Law paper defines it), in-domain and on
text of another domain, and the decode speed at those levels.

    python -m bench.quality.frontier --csv docs/results/frontier_smollm2.csv \\
        --plot docs/img/frontier_smollm2.png

The built-in SmolLM2-135M is calibrated once per method on Austen (``--calib-tokens``, at
``--calib-sparsity``); every other level is refitted from the stored statistics
(``sparseffn.set_sparsity``), so a level costs one perplexity pass per domain. Perplexity is
teacher-forced on held-out windows of Austen (in-domain: other books than the calibration's)
and of news (another domain). For each p in ``--percents`` and each domain, bisection over the
target level (to ``--tolerance``) finds the highest level within p% of dense, assuming
perplexity grows with the level. At each level found, greedy decoding through
``model.generate`` is timed on this machine (``--speed-tokens``; dense timed in the same run),
with the byte limit (all projection bytes over the bytes still read) beside it. The timing
runs last, after every method's search, with dense timed again before each method: keep the
machine otherwise idle for those few minutes.

``python -m bench.e2e.run --levels-from <this CSV>`` times the same levels on a GPU at
Llama-3-8B's shape.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

import sparseffn
from sparseffn.data import builtin_texts, token_windows
from sparseffn.eval.perplexity import perplexity
from sparseffn.eval.speed import decode_speed, device_name
from sparseffn.eval.sweep import parse_method, save_figure, write_csv

DOMAINS = {"austen": "in-domain", "news": "other domain"}
YMAX = 15  # the plot's top, % perplexity increase: the PPL-p% region

class Curve:
    """Perplexity per domain at target levels of one patched model, each level evaluated once."""

    def __init__(self, model, windows: dict[str, torch.Tensor]) -> None:
        self.model, self.windows = model, windows
        self.points: dict[float, dict] = {}

    def at(self, level: float) -> dict:
        level = round(level, 4)
        if level not in self.points:
            sparseffn.set_sparsity(self.model, level)
            point = {}
            # Measured on each domain's own text: the same thresholds keep more or fewer
            # channels on another domain (a rotated basis fitted on Austen, markedly).
            for d, w in self.windows.items():
                sparseffn.reset_sparsity_stats(self.model)
                point[d] = perplexity(self.model, w)
                report = sparseffn.sparsity_report(self.model)
                point[f"measured_{d}"] = report.overall
                point[f"all_bytes_skipped_{d}"] = report.all_bytes_skipped
            self.points[level] = point
        return self.points[level]


def highest_level(curve: Curve, domain: str, bound: float, top: float, tolerance: float
                  ) -> float:
    """The highest level in [0, top] whose perplexity on ``domain`` is at most ``bound``, by
    bisection (0 if none above 0 qualifies)."""
    if curve.at(top)[domain] <= bound:
        return top
    lo, hi = 0.0, top
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if curve.at(mid)[domain] <= bound:
            lo = mid
        else:
            hi = mid
    return lo


def run(a: argparse.Namespace) -> list[dict]:
    """Quality first (every method's PPL-p% levels), then speed at those levels, so the timing
    phase is short and can run on an otherwise idle machine."""
    torch.set_num_threads(a.threads)
    model, tok = sparseffn.load_builtin_model()
    windows = {d: token_windows(tok, builtin_texts(d, "eval"), a.windows * a.seq_len, a.seq_len,
                                purpose="evaluation")[:a.windows] for d in DOMAINS}
    dense_ppl = {d: perplexity(model, w) for d, w in windows.items()}
    facts = {"device": device_name("cpu"), "threads": a.threads, "torch": torch.__version__}
    print(f"dense perplexity: {dense_ppl}", flush=True)
    calib = builtin_texts("austen", "calibration")
    rows: list[dict] = []
    fitted = {}
    for spec in a.methods:
        t0 = time.time()
        sparseffn.sparsify(model, sparsity=a.calib_sparsity, calibration=calib, tokenizer=tok,
                           n_tokens=a.calib_tokens, progress=False, **parse_method(spec))
        fitted[spec] = sparseffn.get_calibration(model)
        curve = Curve(model, windows)
        for domain in DOMAINS:
            for pct in a.percents:
                level = highest_level(curve, domain, dense_ppl[domain] * (1 + pct / 100),
                                      a.top, a.tolerance)
                point = curve.at(level) if level > 0 else None
                skipped = point[f"all_bytes_skipped_{domain}"] if point else 0.0
                ppl = point[domain] if point else dense_ppl[domain]
                rows.append({
                    "method": spec, "domain": DOMAINS[domain], "percent": pct,
                    "level": round(level, 4),
                    "measured": round(point[f"measured_{domain}"], 4) if point else 0.0,
                    "all_bytes_skipped": round(skipped, 4), "perplexity": round(ppl, 3),
                    "dense_perplexity": round(dense_ppl[domain], 3),
                    "increase": round(ppl / dense_ppl[domain] - 1, 4), "tok_s": "",
                    "dense_tok_s": "", "speedup": "",
                    "byte_limit_speedup": round(1 / (1 - skipped), 3),
                    "evaluations": len(curve.points), **facts})
                print(_fmt(rows[-1]), flush=True)
                if a.csv:
                    write_csv(rows, a.csv, {})
        _write_curve(spec, curve, dense_ppl, a.curve_csv)
        sparseffn.unsparsify(model)
        print(f"{spec}: {len(curve.points)} levels evaluated in {time.time() - t0:.0f} s",
              flush=True)
    if a.speed_tokens:
        _speeds(model, fitted, rows, a.speed_tokens)
        if a.csv:
            write_csv(rows, a.csv, {})
    return rows


def _speeds(model, fitted: dict, rows: list[dict], tokens: int) -> None:
    """Greedy decode tok/s at every level found, dense timed again before each method (a
    machine's speed drifts over a long run)."""
    from sparseffn.patching import install

    for spec, calibration in fitted.items():
        dense = decode_speed(model, new_tokens=tokens).tokens_per_s
        install(model, calibration)
        speeds: dict[float, float] = {}
        for r in rows:
            if r["method"] != spec:
                continue
            if r["level"] > 0 and r["level"] not in speeds:
                sparseffn.set_sparsity(model, r["level"])
                speeds[r["level"]] = decode_speed(model, new_tokens=tokens).tokens_per_s
            rate = speeds.get(r["level"], dense)
            r.update(tok_s=round(rate, 2), dense_tok_s=round(dense, 2),
                     speedup=round(rate / dense, 3))
        sparseffn.unsparsify(model)
        print(f"{spec}: dense {dense:.1f} tok/s; " + ", ".join(
            f"level {lvl:.3f} x{v / dense:.2f}" for lvl, v in sorted(speeds.items())),
            flush=True)


def _fmt(r: dict) -> str:
    return (f"{r['method']:<10} {r['domain']:<13} PPL-{r['percent']}%: level {r['level']:.3f} "
            f"(measured {r['measured']:.3f}) ppl {r['perplexity']:.2f} "
            f"(+{100 * r['increase']:.1f}%) byte limit x{r['byte_limit_speedup']:.2f}")


def _write_curve(spec: str, curve: Curve, dense: dict, path: str | None) -> None:
    """Append every evaluated level of ``spec`` (perplexity increase per domain)."""
    if not path:
        return
    new = not Path(path).exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["method", "level", *[f"{k}_{d}" for k in ("measured",
                                                                   "all_bytes_skipped")
                                              for d in DOMAINS],
                        *[f"increase_{d}" for d in DOMAINS]])
        for level, p in sorted(curve.points.items()):
            w.writerow([spec, level, *[round(p[f"{k}_{d}"], 4) for k in ("measured",
                                                                         "all_bytes_skipped")
                                       for d in DOMAINS],
                        *[round(p[d] / dense[d] - 1, 4) for d in DOMAINS]])


def gpu_speeds(paths: list[str]) -> dict[tuple[str, float], dict[str, float]]:
    """{(method spec, level): {"lean": x, "generate": x}} from ``bench.e2e.run --levels-from``
    CSVs at batch 1: each harness's speedup over dense in the same harness, i.e. the lean loop
    over the dense lean loop, and the sparse ``model.generate`` over the dense one (the user's
    view)."""
    out: dict[tuple[str, float], dict[str, float]] = {}
    for path in paths:
        with open(path) as f:
            for r in csv.DictReader(f):
                if r["method"] == "dense" or int(float(r["batch"])) != 1 \
                        or r.get("sharing", "per-token") not in ("", "per-token"):
                    continue
                key = (_spec(r["method"], r["scope"], r.get("rotation")),
                       round(float(r["target"]), 4))
                out.setdefault(key, {})[r["harness"]] = float(r["speedup"])
    return out


def _spec(method: str, scope: str, rotation: str | None = None) -> str:
    """The frontier's method spec of an e2e row: ``teal:all``, ``teal:mlp``,
    ``teal:all:rotation=64``, but ``chess``."""
    spec = f"{method}:{scope}" if method in ("teal", "wina") else method
    return f"{spec}:rotation={int(float(rotation))}" if rotation not in (None, "", "0") else spec


def markdown(rows: list[dict], gpu: dict | None = None) -> str:
    """One line per method: PPL-p% level (measured sparsity) and speedup, per domain; with
    ``gpu`` (``gpu_speeds``), the GPU's lean-loop and ``model.generate`` speedups too."""
    pcts = sorted({r["percent"] for r in rows})
    head = "| method | " + " | ".join(f"PPL-{p:g}% {d}" for d in DOMAINS.values() for p in pcts)
    lines = [head + " |", "| --- |" + " --- |" * (len(pcts) * len(DOMAINS))]
    for spec in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for d in DOMAINS.values():
            for p in pcts:
                r = next(x for x in rows if (x["method"], x["domain"], x["percent"]) ==
                         (spec, d, p))
                cell = f"{r['measured']:.2f}"
                if r["speedup"] != "":
                    cell += f"; CPU {r['speedup']:.2f}x"
                g = (gpu or {}).get((spec, round(r["level"], 4)), {})
                if g:
                    cell += "; GPU " + " / ".join(f"{g[h]:.2f}x" if h in g else "-"
                                                  for h in ("lean", "generate"))
                cells.append(cell)
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curve_csv: str, rows: list[dict], path: str, gpu: dict | None = None) -> None:
    """Perplexity increase against decode speedup per method and domain: the byte limit at
    every evaluated level (lines), the CPU's measured speedup at the PPL-p% levels (dots), and
    with ``gpu`` (``gpu_speeds``) the GPU lean loop's there (squares)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(curve_csv) as f:
        pts = list(csv.DictReader(f))
    pcts = sorted({r["percent"] for r in rows})
    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(15, 5), sharey=True)
    for ax, domain in zip(axes, DOMAINS):
        for k, spec in enumerate(dict.fromkeys(p["method"] for p in pts)):
            mine = sorted((float(p[f"all_bytes_skipped_{domain}"]),
                           100 * float(p[f"increase_{domain}"]))
                          for p in pts if p["method"] == spec
                          and float(p[f"increase_{domain}"]) <= YMAX / 100)
            color = f"C{k}"
            ax.plot([1 / (1 - x) for x, _ in mine], [y for _, y in mine], "-", color=color,
                    lw=1, alpha=0.6, label=f"{spec} (byte limit)")
            found = [r for r in rows if r["method"] == spec and r["domain"] == DOMAINS[domain]
                     and r["speedup"] != "" and r["level"] > 0]
            ax.plot([r["speedup"] for r in found], [100 * r["increase"] for r in found], "o",
                    color=color, label=f"{spec} (CPU, PPL-p% levels)")
            on_gpu = [(gpu[(spec, round(r["level"], 4))]["lean"], 100 * r["increase"])
                      for r in rows if r["method"] == spec and r["domain"] == DOMAINS[domain]
                      and "lean" in (gpu or {}).get((spec, round(r["level"], 4)), {})]
            if on_gpu:
                ax.plot(*zip(*on_gpu), "s", color=color, mfc="none",
                        label=f"{spec} (GPU lean loop, Llama-3-8B shape)")
        ax.set_ylim(-2, YMAX)
        ax.set_xlim(0.7 if gpu else 0.95, 2.0)
        for p in pcts:
            ax.axhline(p, color="k", ls=":", lw=0.8)
        ax.set_xlabel("decode speedup over dense")
        ax.set_title(DOMAINS[domain])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("perplexity increase over dense, %")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    save_figure(fig, "SmolLM2-135M: perplexity increase against decode speedup\n(lines: byte "
                     "limit at every level evaluated; dots: CPU at the PPL-p% levels"
                     + ("; squares: GPU lean loop there" if gpu else "") + "; dotted: p)", path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.quality.frontier", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+",
                   default=["teal:all", "teal:mlp", "wina:all", "cats", "chess", "topk"])
    p.add_argument("--percents", nargs="+", type=float, default=[1, 3, 10])
    p.add_argument("--calib-sparsity", type=float, default=0.4)
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--windows", type=int, default=24, help="held-out windows per domain")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--top", type=float, default=0.9, help="highest level searched")
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--speed-tokens", type=int, default=48,
                   help="greedy tokens timed at each level found (0: skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--csv")
    p.add_argument("--curve-csv", help="every evaluated level (default: beside --csv)")
    p.add_argument("--plot")
    p.add_argument("--replot", action="store_true",
                   help="only print the table and draw --plot from an earlier run's --csv and "
                   "--curve-csv")
    p.add_argument("--gpu", nargs="+", default=[], metavar="CSV",
                   help="with --replot: bench.e2e.run --levels-from CSVs, whose batch-1 GPU "
                   "speedups join the table and the plot")
    a = p.parse_args(argv)
    if a.gpu and not a.replot:
        p.error("--gpu joins GPU speeds to an earlier run: add --replot (and that run's --csv)")
    if a.curve_csv is None and a.csv:
        a.curve_csv = str(Path(a.csv).with_name(Path(a.csv).stem + "_curve.csv"))
    if a.replot:
        with open(a.csv) as f:
            rows = [{k: (float(v) if k in ("percent", "level", "measured", "increase",
                                           "speedup") and v != "" else v)
                     for k, v in r.items()} for r in csv.DictReader(f)]
        gpu = gpu_speeds(a.gpu)
        print(markdown(rows, gpu))
        if a.plot:
            plot(a.curve_csv, rows, a.plot, gpu)
        return 0
    if a.curve_csv and Path(a.curve_csv).exists():
        Path(a.curve_csv).unlink()
    rows = run(a)
    print(markdown(rows))
    if a.plot and a.curve_csv:
        plot(a.curve_csv, rows, a.plot)
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
