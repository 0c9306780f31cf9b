"""The end-to-end benchmark runs through its CLI on a tiny model (CPU smoke run): every point
has a measured sparsity near its target, and dense rows compare with themselves."""
from __future__ import annotations

import csv

from sparseffn.cli import main


def test_bench_e2e_cli_smoke(tmp_path):
    out = tmp_path / "e2e.csv"
    rc = main(["bench", "e2e", "--shape", "tiny-llama", "--dtype", "float32", "--device", "cpu",
               "--methods", "cats", "teal:all", "predictor",
               "--sparsities", "0.5", "--harnesses", "lean",
               "--batches", "1", "--prompts", "16", "--new-tokens", "4", "--repeats", "1",
               "--calib-tokens", "1024", "--calib-seq-len", "128", "--kernel-mode", "never",
               "--oracle", "neurons", "--csv", str(out), "--plot", str(tmp_path / "e2e.png")])
    assert rc == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["method"] for r in rows] == ["dense", "oracle", "cats", "teal", "predictor"]
    for r in rows[1:]:
        assert abs(float(r["measured_sparsity"]) - 0.5) < 0.05
        assert float(r["tok_s"]) > 0 and float(r["dense_tok_s"]) == float(rows[0]["tok_s"])
    for r in rows[2:]:  # kernel_mode never: every module on the reference path
        on, total = map(int, r["kernel_modules"].split("/"))
        assert on == 0 and total > 0
    assert (tmp_path / "e2e.png").stat().st_size > 0


def _patched_tiny(method: str, scope: str):
    import torch

    import sparseffn
    from sparseffn.testing import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(3, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
    sparseffn.sparsify(model, method, 0.5, ids, scope=scope, kernel_mode="always",
                       n_tokens=1024, progress=False)
    return model


def test_check_kernel_path_agrees_and_names_a_departing_module(monkeypatch):
    """The GPU correctness check on the CPU (kernel path through the ops' CPU implementations):
    a correct kernel path agrees everywhere; a fault injected into one layer's q/k/v launch is
    reported as the first departing module, at the first decode step."""
    import pytest
    import torch

    import sparseffn
    from bench.e2e.check import check_kernel_path
    from sparseffn import decode

    if not sparseffn.dispatch.kernels_on("cpu"):
        pytest.skip("needs Triton in interpreter mode (kernel_mode='always' on the CPU)")
    model = _patched_tiny("teal", "all")
    ok = check_kernel_path(model, prompt=6, new_tokens=4, kernel_mode="always")
    assert ok["greedy_tokens_identical"] == 1.0 and ok["argmax_agree_teacher_forced"] == 1.0
    assert ok["in_model_rel_err_max"] < 1e-4 and ok["in_model_first_departure"] == "none"
    assert ok["within_rounding"] and ok["rounding_greedy_tokens_identical"] == 1.0
    assert 0 < ok["one_rounding_max_abs_logit_diff"] < 0.1  # fp32: one rounding moves little

    real = decode.grouped_linear
    target = model.model.layers[1].self_attn.q_proj.base.weight

    def faulty(x, weights, biases, thresholds, cpu=False, counters=None):
        outs = real(x, weights, biases, thresholds, cpu, counters)
        return [o + 1.0 for o in outs] if weights[0] is target else outs
    monkeypatch.setattr(decode, "grouped_linear", faulty)
    bad = check_kernel_path(model, prompt=6, new_tokens=4, kernel_mode="always")
    assert bad["in_model_first_departure"].startswith("step 0 layer1.SparseLinear.q_proj")
    assert torch.isfinite(torch.tensor(bad["in_model_rel_err_max"]))
    assert not bad["within_rounding"]


def test_bench_check_cli_writes_a_passing_check(tmp_path):
    """`sparseffn bench check` on a tiny random model, kernels through the interpreter."""
    import json

    import pytest

    import sparseffn

    if not sparseffn.dispatch.kernels_on("cpu"):
        pytest.skip("needs Triton in interpreter mode (kernel_mode='always' on the CPU)")
    out = tmp_path / "check.json"
    rc = main(["bench", "check", "--model", "tiny-llama", "--dtype", "float32", "--device", "cpu",
               "--methods", "teal:all", "--sparsities", "0.5", "--prompt", "8",
               "--new-tokens", "3", "--calib-tokens", "1024", "--kernel-mode", "always",
               "--json", str(out)])
    assert rc == 0
    check = json.load(open(out))["checks"]["teal:all@0.5"]
    assert check["within_rounding"] and check["in_model_first_departure"] == "none"
    assert check["argmax_agree_teacher_forced"] == 1.0


def test_sensitivity_tool_separates_kernel_faults_from_noise():
    """bench.e2e.sensitivity on a tiny fp32 model: the kernel path (and the reference on its layout) stays at
    fp32 rounding of the reference, the 1e-3 noise variant moves visibly, and every
    per-layer field has one entry per hidden state."""
    import pytest

    import sparseffn
    from bench.e2e import sensitivity

    if not sparseffn.dispatch.kernels_on("cpu"):
        pytest.skip("needs Triton in interpreter mode (kernel_mode='always' on the CPU)")
    res = sensitivity.main(["--shape", "tiny-llama", "--dtype", "float32", "--mode", "always",
                            "--steps", "2", "--prompt", "8"])
    for name in ("ref_again", "kernel", "kernel_again", "layout_only"):
        assert res[name]["max_abs_logit_diff_over_std"] < 1e-4, name
    assert res["noise_1e-3"]["max_abs_logit_diff_over_std"] > 1e-3
    assert len(res["kernel"]["hidden_rel_step0_by_layer"]) == 3  # embeddings + 2 layers


def test_profile_categories_of_kernel_names():
    """Our kernels, cuBLAS, attention and inductor's fused kernels land in their categories;
    an inductor kernel named after the ops it fused is not GEMV or attention time."""
    from bench.e2e.harness import category
    assert category("_input_sparse_kernel") == "sparse kernels"
    assert category("_finish_kernel") == "sparse kernels"
    assert category("nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT") == "dense GEMM/GEMV"
    assert category("cudnn_generated_fort_native_sdpa_sm80_flash_fprop") == "attention"
    assert category("triton_red_fused__to_copy_add_input_sparse_gemv_grouped_mean_14") == "other"
    assert category("triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_3") == "other"


def test_oracle_reads_the_needed_bytes_and_undoes_exactly():
    """The e2e oracle: every projection (``all``), the MLP's (``mlp``) or up and down
    (``neurons``) hold exactly the compacted weight of the target sparsity, the model still
    runs, the byte report matches the pattern, and removing it gives the original model's
    logits back bit for bit."""
    import torch

    from bench.e2e.oracle import _SlicedLinear, _SlicedMLP, install_oracle, remove_oracle
    from bench.e2e.shapes import build_model

    model = build_model("tiny-llama", torch.float32, "cpu")
    ids = torch.randint(1, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    layer = model.model.layers[0]
    H, I = 96, 260

    report = install_oracle(model, "all", 0.5)
    assert report.all_bytes_skipped == 0.5
    assert isinstance(layer.self_attn.q_proj, _SlicedLinear)
    assert layer.self_attn.q_proj.weight.shape[1] == H // 2
    assert layer.mlp.down_proj.weight.shape == (H, I // 2)
    assert torch.isfinite(model(input_ids=ids).logits).all()
    remove_oracle(model)
    assert isinstance(layer.self_attn.q_proj, torch.nn.Linear)

    report = install_oracle(model, "mlp", 0.5)
    assert isinstance(layer.mlp.up_proj, _SlicedLinear)
    assert isinstance(layer.self_attn.q_proj, torch.nn.Linear)  # attention untouched
    assert report.ffn_bytes_skipped == 0.5 and 0 < report.all_bytes_skipped < 0.5
    remove_oracle(model)

    report = install_oracle(model, "neurons", 0.6)
    keep = round(0.4 * I)
    assert isinstance(layer.mlp, _SlicedMLP)
    assert layer.mlp.up.shape == (keep, H) and layer.mlp.down.shape == (H, keep)
    assert abs(report.ffn_bytes_skipped - 0.6 * 2 / 3) < 1e-9
    assert 0 < report.all_bytes_skipped < report.ffn_bytes_skipped
    assert model(input_ids=ids).logits.shape == before.shape
    remove_oracle(model)
    assert torch.equal(model(input_ids=ids).logits, before)


def test_gpu_benchmarks_refuse_to_pretend_on_the_cpu(monkeypatch):
    """`bench check` where no kernel path runs (no Triton interpreter, no CPU ops) would compare
    the reference path with itself, and `bench e2e` of a full-size shape on the CPU would build
    a 16 GB model: both refuse."""
    import pytest

    import triton_kernels.cpu
    from bench.e2e import check, run
    from sparseffn import dispatch

    monkeypatch.setattr(triton_kernels.cpu, "available", lambda: False)
    monkeypatch.setitem(dispatch._AVAILABLE, "cpu", False)
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1"):
        check.main(["--device", "cpu", "--kernel-mode", "always"])
    monkeypatch.setitem(dispatch._AVAILABLE, "cpu", True)
    with pytest.raises(SystemExit, match="--kernel-mode always"):
        check.main(["--device", "cpu", "--kernel-mode", "auto"])
    with pytest.raises(SystemExit, match="tiny-llama"):
        run.main(["--device", "cpu", "--shape", "llama3-8b"])


def test_measuring_sparsity_leaves_counting_on():
    """The timed decode after ``measure_sparsity`` counts, as a user's sparsified model does
    (the benchmark used to time with the counters off, which is not what users run)."""
    from bench.e2e.run import measure_sparsity
    from sparseffn.patching import sparse_modules

    model = _patched_tiny("teal", "all")
    report = measure_sparsity(model, prompt=8, steps=4)
    assert report.observed
    assert all(m.track for _, m in sparse_modules(model))
