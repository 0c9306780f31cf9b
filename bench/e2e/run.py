"""End-to-end decode benchmark: dense against sparse, same model, same harness, same run.
Needs a CUDA GPU (a full-size shape is 16 GB); `--shape tiny-llama --device cpu` is a CPU smoke run.

    python -m bench.e2e.run --shape llama3-8b --dtype bfloat16 --csv out.csv --plot out.png
    sparseffn bench e2e ...   (the same)

For each criterion (teal:all, wina:all: all seven projections; cats, chess: MLP only) it
calibrates the random-weight model with the real calibration code on random token ids at every
sparsity level, patches once, and swaps thresholds in place between levels (no recompilation).
Each point reports decode tokens/s of dense and sparse, the speedup, the bandwidth floor in
tokens/s for the bytes actually read, the measured sparsity and the peak memory.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time

import torch

import sparseffn
import triton_kernels
from bench.e2e import harness as H
from bench.e2e.check import check_kernel_path
from bench.e2e.shapes import build_model, step_bytes
from sparseffn.eval.sweep import parse_method, save_figure

NUMERIC = {"target", "measured_sparsity", "speedup", "byte_limit_speedup", "batch", "prompt",
           "layers"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FIELDS = ["device", "torch", "triton", "transformers", "shape", "layers", "dtype", "method",
          "scope", "target", "measured_sparsity", "ffn_bytes_skipped", "all_bytes_skipped",
          "batch", "prompt", "new_tokens", "harness", "tok_s", "dense_tok_s", "speedup",
          "floor_tok_s", "frac_of_floor", "byte_limit_speedup", "peak_mem_gb",
          "calib_seconds", "sharing", "over_dense_generate", "rotation", "kernel_modules"]


def _versions() -> dict[str, str]:
    import transformers
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()
    return {"device": dev, "torch": torch.__version__, "triton": tv,
            "transformers": transformers.__version__}


def read_bandwidth(device: str) -> float:
    """Bytes per second of a read-only stream (sum of 1 GiB), the floor's denominator."""
    if not device.startswith("cuda"):
        return float("nan")
    from bench.kernels.sweep import bandwidths
    return bandwidths(20, "cuda")[1]


def calibrations(model, method: str, scope: str, levels: list[float], tokens: int,
                 seq_len: int, progress: bool, **options) -> tuple[list, float]:
    """One Calibration per level, fitted on random token ids (model unpatched); ``options``
    are further ``SparsityConfig`` fields (allocation, rotation)."""
    from sparseffn.calibration import calibrate_model
    from sparseffn.config import SparsityConfig

    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, model.config.vocab_size, (max(1, tokens // seq_len), seq_len),
                        generator=g)
    out, t0 = [], time.perf_counter()
    for s in levels:
        config = SparsityConfig(method=method, sparsity=s, scope=scope, **options)
        out.append(calibrate_model(model, None, ids, config, tokens, seq_len, batch_size=4,
                                   progress=progress, data_name="random token ids"))
    return out, (time.perf_counter() - t0) / len(levels)


def measure_sparsity(model, prompt: int = 256, steps: int = 64) -> sparseffn.SparsityReport:
    """Measured sparsity of ``steps`` decode steps on fresh random tokens after a ``prompt``
    (the decode steps are what is timed; criteria that decide at the prompt run it densely).

    Counting stays on afterwards, as ``sparsify`` leaves it: the timed decode is what a user
    gets (the input-sparse kernels count inside the launch; mask-based plans count with a
    torch reduction)."""
    from sparseffn.eval.perplexity import perplexity

    sparseffn.track_sparsity(model, True)
    sparseffn.reset_sparsity_stats(model)
    perplexity(model, H.prompt_ids(model, 1, prompt + steps, seed=23), prompt_len=prompt)
    return sparseffn.sparsity_report(model)


def _point(args, ver, model, bw, method, scope, target, report, b, p, harness, rate, dense,
           calib_s) -> dict:
    skipped = report.all_bytes_skipped if report is not None else 0.0
    nbytes = step_bytes(model, b, p + args.new_tokens, skipped).total
    dense_bytes = step_bytes(model, b, p + args.new_tokens, 0.0).total
    floor = b * bw / nbytes
    return {**ver, "shape": args.shape, "layers": model.config.num_hidden_layers,
            "dtype": args.dtype, "method": method, "scope": scope, "target": target,
            "measured_sparsity": round(report.overall, 4) if report else 0.0,
            "ffn_bytes_skipped": round(report.ffn_bytes_skipped, 4) if report else 0.0,
            "all_bytes_skipped": round(skipped, 4), "batch": b, "prompt": p,
            "new_tokens": args.new_tokens, "harness": harness, "tok_s": round(rate, 2),
            "dense_tok_s": round(dense, 2), "speedup": round(rate / dense, 4),
            "floor_tok_s": round(floor, 2), "frac_of_floor": round(rate / floor, 4),
            "byte_limit_speedup": round(dense_bytes / nbytes, 4),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if torch.cuda.is_available() else 0.0, "calib_seconds": round(calib_s, 1)}


def kernel_modules(model, batch: int) -> str:
    """"on/all": how many sparse modules send a decode step of ``batch`` sequences to the kernel
    path (under ``"auto"`` at batch > 1 on CUDA, those the batch probe measured no slower than
    dense; ``sparseffn.cuda_probe``)."""
    from sparseffn.modules import SparseGatedMLP
    from sparseffn.patching import sparse_modules

    modules = [m for _, m in sparse_modules(model)]
    on = 0
    with torch.no_grad():
        for m in modules:
            # The weight each forward hands to use_kernels, and a decode input for it.
            w = m.base.down_proj.weight if isinstance(m, SparseGatedMLP) else m.base.weight
            width = w.shape[0] if isinstance(m, SparseGatedMLP) else w.shape[1]
            on += m.use_kernels(w.new_empty(batch, 1, width), w)
    return f"{on}/{len(modules)}"


def _user_view(rate: float, dense: dict, b: int, p: int) -> float | str:
    """The user's view: this rate over the dense model's ``model.generate`` (a sparsified
    model's ``model.generate`` runs the lean loop on CUDA, ``sparseffn.hf_generate``); blank
    where that harness was not run."""
    base = dense.get(("generate", b, p))
    return round(rate / base, 4) if base else ""


def _grid(args, harness: str) -> list[tuple[int, int]]:
    batches = args.generate_batches if harness == "generate" else args.batches
    prompts = args.generate_prompts if harness == "generate" else args.prompts
    return [(b, p) for b in batches for p in prompts]


def run(args) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64
    ver = _versions()
    device = args.device
    bw = read_bandwidth(device)
    print(f"{ver}; read bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    model = build_model(args.shape, DTYPES[args.dtype], device, args.layers)
    rows = _Rows(args.csv)
    dense: dict[tuple, float] = {}
    for harness in args.harnesses:
        for b, p in _grid(args, harness):
            dense[(harness, b, p)] = H.decode_rate(model, harness, b, p, args.new_tokens,
                                                   args.repeats)
            rows.append(_point(args, ver, model, bw, "dense", "-", 0.0, None, b, p, harness,
                               dense[(harness, b, p)], dense[(harness, b, p)], 0.0))
            print(_fmt(rows[-1]), flush=True)
    extras: dict = {"versions": ver, "read_bandwidth": bw, "profiles": {}, "checks": {}}
    if args.profile and device.startswith("cuda"):
        for harness in args.harnesses:
            extras["profiles"][f"dense/{harness}"] = H.profile_steps(model, 1, args.prompts[0],
                                                                    harness=harness)
            print_profile(f"dense/{harness}", extras["profiles"][f"dense/{harness}"])
    for scope in args.oracle:
        run_oracle(args, ver, model, bw, scope, dense, rows)
    for spec in args.methods:
        options = parse_method(spec)
        method, scope = options.pop("method"), options.pop("scope", "mlp")
        print(f"[{time.perf_counter() - T0:5.0f}s] calibrating {spec}", flush=True)
        levels = getattr(args, "method_levels", {}).get(spec, args.sparsities)
        cals, calib_s = calibrations(model, method, scope, levels, args.calib_tokens,
                                     args.calib_seq_len, args.progress, **options)
        from sparseffn.patching import install, update_thresholds
        install(model, cals[0], kernel_mode=args.kernel_mode)
        _recompile(model)
        shared_before = False
        for target, cal in zip(levels, cals):
            update_thresholds(model, cal)
            report = measure_sparsity(model)
            for sharing in args.sharing:
                shared = sharing == "shared"
                sparseffn.set_batch_sharing(model, shared)
                # Thresholds are tensors swapped in place, so a per-token model keeps its
                # compiled step across levels; a shared one bakes its kept counts in.
                if shared or shared_before:
                    _recompile(model)
                shared_before = shared
                for harness in args.harnesses:
                    for b, p in _grid(args, harness):
                        rate = H.decode_rate(model, harness, b, p, args.new_tokens,
                                             args.repeats)
                        rows.append({**_point(args, ver, model, bw, method, scope, target,
                                              report, b, p, harness, rate,
                                              dense[(harness, b, p)], calib_s),
                                     "sharing": sharing,
                                     "kernel_modules": kernel_modules(model, b),
                                     "over_dense_generate": _user_view(rate, dense, b, p),
                                     "rotation": options.get("rotation", 0)})
                        print(_fmt(rows[-1]), flush=True)
            if args.profile and device.startswith("cuda") and abs(target - 0.5) < 1e-9:
                for harness in args.harnesses:
                    extras["profiles"][f"{spec}/{harness}"] = H.profile_steps(
                        model, 1, args.prompts[0], harness=harness)
                    print_profile(f"{spec}/{harness}", extras["profiles"][f"{spec}/{harness}"])
            if args.check and device.startswith("cuda"):
                key = f"{spec}@{target}"
                extras["checks"][key] = check_kernel_path(model)
                print(f"check {key}: {extras['checks'][key]}", flush=True)
        sparseffn.set_batch_sharing(model, False)
        sparseffn.unsparsify(model)
        _recompile(model)
        if args.json:
            # The launch config the tuner chose per (op, batch, shape): near-equal candidates
            # can swap between processes, which moves a point by a few percent.
            extras["tuning"] = [{"key": [str(k) for k in e["key"]], "chosen": str(e["chosen"])}
                                for e in triton_kernels.tuning_log()]
            with open(args.json, "w") as f:
                json.dump(extras, f, indent=1)
    return rows


def run_oracle(args, ver, model, bw, scope: str, dense: dict, rows: list) -> None:
    """Rows for the oracle (``bench.e2e.oracle``): cuBLAS over pre-compacted weights at each
    sparsity level, what reading only the needed bytes buys the unmodified model."""
    from bench.e2e.oracle import install_oracle, remove_oracle

    for target in args.sparsities:
        report = install_oracle(model, scope, target)
        _recompile(model)
        rates = {}
        try:
            for harness in args.harnesses:
                for b, p in _grid(args, harness):
                    rates[(harness, b, p)] = H.decode_rate(model, harness, b, p,
                                                           args.new_tokens, args.repeats)
        finally:
            remove_oracle(model)  # first: the byte count must not see the compacted copies
        for (harness, b, p), rate in rates.items():
            rows.append(_point(args, ver, model, bw, "oracle", scope, target, report, b, p,
                               harness, rate, dense[(harness, b, p)], 0.0))
            print(_fmt(rows[-1]), flush=True)
    _recompile(model)


def _recompile(model) -> None:
    """After the model's modules changed (patched, unpatched, oracle in or out): drop the
    compiled graphs and the cached decode loops, so the next decode compiles the new model."""
    torch._dynamo.reset()
    sparseffn.clear_decode_loops(model)


T0 = time.perf_counter()
DEFAULT_METHODS = ("teal:all", "wina:all", "cats", "chess")


class _Rows(list):
    """Result rows, also appended to the CSV as they come (a cut-off run keeps its points)."""

    def __init__(self, path: str | None) -> None:
        super().__init__()
        self.path = path
        if path:
            with open(path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=FIELDS).writeheader()

    def append(self, row: dict) -> None:
        super().append(row)
        if self.path:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=FIELDS).writerow(row)


def print_profile(label: str, prof: dict) -> None:
    """The categories of one decode-step profile, then its top kernels."""
    cats = ", ".join(f"{k} {v:.1f}" for k, v in prof.items() if isinstance(v, float))
    print(f"profile {label} (us per decode step): {cats}", flush=True)
    for k in prof["kernels"]:
        print(f"  {k['us']:8.2f} us {k['launches']:6.2f}x  [{k['category']}] {k['name']}",
              flush=True)


def _fmt(r: dict) -> str:
    rot = f"+rot{r['rotation']}" if r.get("rotation") else ""
    return (f"[{time.perf_counter() - T0:5.0f}s] {r['method']:>6}:{r['scope']:<4}{rot} "
            f"s={r['target']:.2f} (measured {r['measured_sparsity']:.3f}) B={r['batch']} "
            f"P={r['prompt']:<5} {r['harness']:<8} {r.get('sharing', ''):<9}"
            f" {r['tok_s']:8.1f} tok/s  x{r['speedup']:.2f} dense  "
            + (f"x{r['over_dense_generate']:.2f} dense generate  "
               if r.get("over_dense_generate") else "")
            + f"{100 * r['frac_of_floor']:.0f}% of floor {r['floor_tok_s']:.0f}  "
            + (f"kernels in {r['kernel_modules']} modules  " if r.get("kernel_modules") else "")
            + f"mem {r['peak_mem_gb']} GB")


def plot(rows: list[dict], path: str) -> None:
    """Speedup against measured sparsity per criterion, one panel per (batch, harness)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["harness"], r["batch"], r["prompt"]) for r in rows})
    # At least 7 in wide: the title (shape, device, versions) must fit over a single panel.
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7, 5 * len(panels)), 4), squeeze=False)
    for ax, (harness, b, p) in zip(axes[0], panels):
        sel = [r for r in rows if (r["harness"], r["batch"], r["prompt"]) == (harness, b, p)
               and r["method"] != "dense"]
        for spec in sorted({(r["method"], r["scope"]) for r in sel}):
            pts = sorted((r for r in sel if (r["method"], r["scope"]) == spec),
                         key=lambda r: r["target"])
            line = ax.plot([r["measured_sparsity"] for r in pts], [r["speedup"] for r in pts],
                           "o-", label=f"{spec[0]}:{spec[1]}")[0]
            ax.plot([r["measured_sparsity"] for r in pts],
                    [r["byte_limit_speedup"] for r in pts], ":", color=line.get_color())
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.set_title(f"{harness}, batch {int(b)}, prompt {int(p)}")
        ax.set_xlabel("measured sparsity (dotted: byte limit)")
        ax.set_ylabel("decode speedup over dense")
        ax.legend(fontsize=8)
    r0 = rows[0]
    save_figure(fig, f"{r0['shape']} ({int(r0['layers'])} layers, {r0['dtype']}) on "
                f"{r0['device']}, torch {r0['torch']}, triton {r0['triton']}", path, fontsize=9)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="bench.e2e.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (smoke runs)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", default=None,
                   help="default teal:all wina:all cats chess; with --levels-from, the CSV's "
                   "methods, or those of them listed here")
    p.add_argument("--sparsities", nargs="+", type=float,
                   default=[0.0, 0.25, 0.4, 0.5, 0.65, 0.75])
    p.add_argument("--harnesses", nargs="+", default=["lean", "generate"],
                   choices=["lean", "generate"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--prompts", nargs="+", type=int, default=[128, 1024])
    p.add_argument("--generate-batches", nargs="+", type=int, default=[1])
    p.add_argument("--generate-prompts", nargs="+", type=int, default=[128])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--oracle", nargs="*", default=[], choices=["all", "mlp", "neurons"],
                   help="also time the oracle (cuBLAS over weights compacted ahead of time, "
                   "bench/e2e/oracle.py) with these byte patterns at every sparsity level: "
                   "all = teal:all, mlp = teal:mlp, neurons = cats/chess")
    p.add_argument("--profile", action="store_true", help="profile a step at 50%% sparsity")
    p.add_argument("--check", action="store_true",
                   help="kernel path against reference path at every sparsity level")
    p.add_argument("--sharing", nargs="+", default=["per-token"],
                   choices=["per-token", "shared"],
                   help="active sets per sequence, or shared across the batch "
                   "(sparseffn.set_batch_sharing); each listed mode is measured")
    p.add_argument("--kernel-mode", default="always", choices=["auto", "always", "never"],
                   help="'always' runs the kernels at every batch size ('auto' only at batch 1)")
    p.add_argument("--levels-from", metavar="CSV",
                   help="time each method at its own levels: the PPL-p%% levels of a "
                   "bench.quality.frontier CSV (they replace --sparsities)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--plot-from", nargs="+", metavar="CSV",
                   help="only draw --plot from earlier CSVs of this benchmark")
    p.add_argument("--csv")
    p.add_argument("--json", help="profiles and checks")
    p.add_argument("--plot")
    return p


def frontier_levels(path: str) -> dict[str, list[float]]:
    """{method: its distinct PPL-p% levels above 0, ascending} from a frontier CSV."""
    out: dict[str, set[float]] = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            if float(r["level"]) > 0:
                out.setdefault(r["method"], set()).add(float(r["level"]))
    if not out:
        raise SystemExit(f"{path} has no level above 0 (a bench.quality.frontier CSV?)")
    return {m: sorted(levels) for m, levels in out.items()}


def main(argv: list[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark (or only re-plot with --plot-from) for parsed arguments."""
    if args.plot_from:
        rows = []
        for path in args.plot_from:
            with open(path) as f:
                for r in csv.DictReader(f):
                    rows.append({k: (float(v) if k in NUMERIC else v) for k, v in r.items()})
        plot(rows, args.plot)
        return 0
    if not args.device.startswith("cuda") and not args.shape.startswith("tiny"):
        raise SystemExit(f"bench e2e times decoding on a GPU: --device {args.device} with "
                         f"--shape {args.shape} would build a full-size model on the CPU. Run it "
                         "on a CUDA device, or smoke-test on the CPU with --shape tiny-llama.")
    args.methods_given = args.methods is not None
    args.methods = args.methods or list(DEFAULT_METHODS)
    if args.levels_from:
        args.method_levels = frontier_levels(args.levels_from)
        chosen = [m for m in args.methods if m in args.method_levels]
        if args.methods_given and not chosen:
            raise SystemExit(f"--methods {' '.join(args.methods)}: none is in {args.levels_from}"
                             f" (it has {', '.join(args.method_levels)})")
        args.methods = chosen if args.methods_given else list(args.method_levels)
    rows = run(args)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
