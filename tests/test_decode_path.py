"""The kernel path of the patched modules against their reference path.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (conftest), with
``kernel_mode="always"``; on a GPU machine the same tests run the CUDA kernels. Two copies of one
tiny model are patched with the same calibration, one with the kernels and one without, and fed
the same prompt and the same continuation tokens (teacher forcing): every decode step's logits
must agree to fp32 rounding, and the kernel functions must really have run.
"""
from __future__ import annotations

import pytest
import torch

import sparseffn
from sparseffn import decode, layout
from sparseffn.modules import SparseGatedMLP, SparseLinear
from sparseffn.patching import install, sparse_modules
from sparseffn.testing import teacher_forced_logits as decode_logits
from sparseffn.testing import tiny_model

pytestmark = pytest.mark.skipif(
    not (sparseffn.dispatch.kernels_on("cuda") or sparseffn.dispatch.kernels_on("cpu")),
    reason="needs CUDA or Triton in interpreter mode")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CALIB = dict(n_tokens=1024, progress=False)
# Calibration on token ids (no tokenizer needed, so this file also runs on a bare GPU machine).
IDS = torch.randint(3, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
KERNEL_FUNCS = ("linear", "grouped_linear", "gated_act", "down_nonzero", "up_masked", "down_masked",
                "gated_masked")

# (family, method, scope, decode functions that must run)
CASES = [
    ("llama", "cats", "mlp", {"gated_act", "down_nonzero"}),
    ("llama", "chess", "mlp", {"gated_act", "down_nonzero"}),
    ("llama", "teal", "all", {"linear", "grouped_linear"}),  # q/k/v and gate/up grouped
    ("llama", "wina", "all", {"linear", "grouped_linear"}),  # ... with per-weight thresholds
    ("llama", "topk", "mlp", {"up_masked", "down_masked"}),
    ("llama", "predictor", "mlp", {"gated_masked"}),
    ("phi3", "predictor", "mlp", {"gated_masked"}),  # fused gate_up
    ("gemma", "chess", "mlp", {"gated_act", "down_nonzero"}),  # tanh-GELU
    ("phi3", "teal", "all", {"linear"}),  # fused qkv and gate_up
    ("phi3", "cats", "mlp", {"gated_act", "down_nonzero"}),
    ("qwen2", "teal", "all", {"linear", "grouped_linear"}),  # q/k/v biases
]


def spy(monkeypatch) -> dict[str, int]:
    """Count calls of the decode module's kernel entry points."""
    calls = dict.fromkeys(KERNEL_FUNCS, 0)
    for name in KERNEL_FUNCS:
        fn = getattr(decode, name)

        def wrapped(*args, _fn=fn, _name=name, **kwargs):
            if _name != "linear" or args[3] is not None:  # dense linears are not kernels
                calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(decode, name, wrapped)
    return calls


def pair(family, method, scope, sparsity, ):
    """(reference-path model, kernel-path model) with one calibration."""
    ref = tiny_model(family).to(DEVICE)
    sparseffn.sparsify(ref, method, sparsity, IDS, scope=scope,
                       kernel_mode="never", **CALIB)
    kern = tiny_model(family).to(DEVICE)
    install(kern, sparseffn.get_calibration(ref), kernel_mode="always")
    return ref, kern


@pytest.mark.parametrize("family,method,scope,funcs", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_kernel_path_matches_reference_path(family, method, scope, funcs, monkeypatch):
    ref, kern = pair(family, method, scope, 0.5)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 1000, (3, 9), generator=g).to(DEVICE)
    cont = torch.randint(3, 1000, (3, 4), generator=g).to(DEVICE)
    expected = decode_logits(ref, prompt, cont)
    calls = spy(monkeypatch)
    got = decode_logits(kern, prompt, cont)
    assert all(calls[name] > 0 for name in funcs), f"the kernel path did not run: {calls}"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # Same measured sparsity on both paths (counted from the same masks), and every entry of
    # every decode step counted on the kernel path too (the kernels count them themselves).
    r, k = sparseffn.sparsity_report(ref), sparseffn.sparsity_report(kern)
    assert abs(r.overall - k.overall) < 0.02
    for (_, mr), (_, mk) in zip(sparse_modules(ref), sparse_modules(kern)):
        for site in mr.counters:
            assert mk.counters[site].counts[1] == mr.counters[site].counts[1], site


def test_sparsity_zero_kernel_path_is_the_dense_model():
    model = tiny_model("llama").to(DEVICE)
    dense = tiny_model("llama").to(DEVICE)
    sparseffn.sparsify(model, "teal", 0.0, IDS, scope="all",
                       kernel_mode="always", **CALIB)
    prompt = torch.randint(3, 1000, (2, 7), device=DEVICE)
    cont = torch.randint(3, 1000, (2, 3), device=DEVICE)
    torch.testing.assert_close(decode_logits(model, prompt, cont),
                               decode_logits(dense, prompt, cont), rtol=1e-4, atol=1e-4)


def test_greedy_generation_agrees():
    ref, kern = pair("llama", "chess", "mlp", 0.5)
    ids = torch.randint(3, 1000, (2, 6), device=DEVICE)
    with torch.no_grad():
        a = ref.generate(ids, max_new_tokens=6, do_sample=False)
        b = kern.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def _storage_bytes(model) -> int:
    return sum(p.untyped_storage().nbytes() for p in model.parameters())


def test_layout_in_place_no_extra_memory_and_undo():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {name: p for name, p in model.named_parameters()}
    nbytes = _storage_bytes(model)
    sparseffn.sparsify(model, "teal", 0.5, IDS, scope="all",
                       kernel_mode="always", **CALIB)
    wrappers = [m for m in model.modules() if isinstance(m, (SparseGatedMLP, SparseLinear))]
    converted = [lin for w in wrappers for lin in w.kernel_linears()]
    assert len(converted) == 2 * 7  # every gated projection of both layers
    assert all(layout.is_input_major(lin.weight) for lin in converted)
    assert _storage_bytes(model) == nbytes  # rewritten in place, no second copy
    assert {n: p for n, p in model.named_parameters()}.keys()  # still named parameters
    sparseffn.unsparsify(model)
    assert all(p is params[n] for n, p in model.named_parameters())  # same Parameter objects
    assert all(p.is_contiguous() for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_kernel_mode_never_keeps_layout_and_set_kernel_mode_switches():
    model = tiny_model("llama").to(DEVICE)
    sparseffn.sparsify(model, "cats", 0.5, IDS, kernel_mode="never",
                       **CALIB)
    down = model.model.layers[0].mlp.base.down_proj
    assert down.weight.is_contiguous()
    sparseffn.set_kernel_mode(model, "auto")
    # Re-laid out only where the kernel path runs (on the CPU: where the probe measured the
    # compiled CPU ops faster, sparseffn.cpu_probe).
    assert down.weight.is_contiguous() != model.model.layers[0].mlp._layout_ready
    sparseffn.set_kernel_mode(model, "always")
    assert layout.is_input_major(down.weight)
    sparseffn.set_kernel_mode(model, "never")
    assert down.weight.is_contiguous()
    with pytest.raises(sparseffn.SparseFFNError, match="kernel mode"):
        sparseffn.set_kernel_mode(model, "fast")


def test_reference_path_on_the_kernel_layout(monkeypatch):
    """``keep_layout``: the reference path runs on the kernels' layout (what the correctness
    check compares against), with no kernel call, and its prefill is bit-equal to the kernel
    path's."""
    from sparseffn.patching import set_kernel_mode

    model = tiny_model("llama").to(DEVICE)
    sparseffn.sparsify(model, "teal", 0.5, IDS, scope="all", kernel_mode="always", **CALIB)
    q = model.model.layers[0].self_attn.q_proj.base
    ids = IDS[:1, :12].to(DEVICE)
    with torch.no_grad():
        kernel_prefill = model(input_ids=ids).logits
    set_kernel_mode(model, "never", keep_layout=True)
    assert layout.is_input_major(q.weight)
    calls = spy(monkeypatch)
    logits = decode_logits(model, ids, IDS[:1, 12:15].to(DEVICE))
    assert sum(calls.values()) == 0 and torch.isfinite(logits).all()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, kernel_prefill)
    set_kernel_mode(model, "never")
    assert q.weight.is_contiguous()


def test_no_kernel_path_with_gradients_or_prefill(monkeypatch):
    """Training (gradients) and prefill (many tokens) take the reference path."""
    _, kern = pair("llama", "cats", "mlp", 0.5)
    calls = spy(monkeypatch)
    ids = torch.randint(3, 1000, (1, 1), device=DEVICE)
    kern.train()
    kern(input_ids=ids).logits.sum().backward()  # one token, but gradients are on
    with torch.no_grad():
        kern(input_ids=torch.randint(3, 1000, (1, 5), device=DEVICE))
    assert sum(calls.values()) == 0


def test_threshold_update_in_place():
    """A new level writes into the same threshold tensors (compiled graphs keep reading them),
    and never into the Calibration the model was patched with."""
    model = tiny_model("llama")
    sparseffn.sparsify(model, "cats", 0.5, IDS, **CALIB)
    mlp = model.model.layers[0].mlp
    buf = mlp.threshold("act")
    original = sparseffn.get_calibration(model)
    stored = original.thresholds["layers.0.act"].clone()
    sparseffn.set_sparsity(model, 0.3)
    assert mlp.threshold("act") is buf and not torch.equal(buf, stored)
    assert torch.equal(original.thresholds["layers.0.act"], stored)


def test_shared_input_projections_take_one_launch(monkeypatch):
    """TEAL over all projections: per layer and decode step, q/k/v in one grouped launch and
    gate/up in another, o and down alone, and the logits are the reference path's."""
    ref, kern = pair("llama", "teal", "all", 0.5)
    prompt = torch.randint(3, 1000, (2, 5), device=DEVICE)
    cont = torch.randint(3, 1000, (2, 3), device=DEVICE)
    expected = decode_logits(ref, prompt, cont)
    calls = spy(monkeypatch)
    got = decode_logits(kern, prompt, cont)
    layers, steps = kern.config.num_hidden_layers, cont.shape[1]
    assert calls["grouped_linear"] == 2 * layers * steps
    assert calls["linear"] == 2 * layers * steps
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    groups = [m.group for m in kern.modules() if isinstance(m, SparseLinear) and m.group]
    assert groups and all(g.x is None and g.outs is None for g in groups), "a step left outputs"


def test_group_member_called_alone_is_still_right():
    """k_proj called without q_proj first (another attention implementation, or a hook) computes
    its own output instead of reading a stale or missing group result."""
    _, kern = pair("llama", "teal", "all", 0.5)
    attn = kern.model.layers[0].self_attn
    x = torch.randn(2, 1, kern.config.hidden_size, device=DEVICE)
    k_alone = attn.k_proj(x)
    q = attn.q_proj(x)  # starts a group launch for x
    k_grouped, v = attn.k_proj(x), attn.v_proj(x)
    k_ref = attn.k_proj.base(torch.where(x.abs() > attn.k_proj.threshold("k_proj"), x, 0))
    torch.testing.assert_close(k_alone, k_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k_grouped, k_ref, rtol=1e-4, atol=1e-4)
    assert q.shape[-1] == attn.q_proj.base.out_features and v.shape == k_ref.shape
    other = torch.randn_like(x)
    attn.q_proj(x)
    torch.testing.assert_close(  # a different tensor: not the stored result for x
        attn.k_proj(other), attn.k_proj.base(torch.where(other.abs() > attn.k_proj.threshold("k_proj"),
                                                         other, 0)), rtol=1e-4, atol=1e-4)


def test_grouped_decode_step_compiles_whole():
    """The q/k/v group (attribute side effects on a plain object, tensor identity) traces
    into one graph: a compiled decode step equals the eager one."""
    _, kern = pair("llama", "teal", "all", 0.5)
    layer = kern.model.layers[0]
    x = torch.randn(2, 1, kern.config.hidden_size, device=DEVICE)
    attn = layer.self_attn

    def qkv(h):
        return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)

    eager = qkv(x)
    compiled = torch.compile(qkv, fullgraph=True, backend="aot_eager")(x)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
    assert attn.q_proj.group.x is None


TWO_GPU_MAP = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0,
               "model.layers.1": 1, "model.norm": 1, "lm_head": 0}  # lm_head tied to embed


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("method,scope,funcs", [("teal", "all", {"linear", "grouped_linear"}),
                                               ("chess", "mlp", {"gated_act", "down_nonzero"})])
def test_device_map_over_two_gpus_takes_the_kernel_path_per_device(method, scope, funcs,
                                                                   monkeypatch):
    """A model dispatched over two GPUs (accelerate): each layer's patched modules run the
    kernels on the GPU that holds the layer, and the logits are the reference path's."""
    from accelerate import dispatch_model

    ref = dispatch_model(tiny_model("llama"), device_map=TWO_GPU_MAP)
    sparseffn.sparsify(ref, method, 0.5, IDS, scope=scope, kernel_mode="never", **CALIB)
    kern = dispatch_model(tiny_model("llama"), device_map=TWO_GPU_MAP)
    install(kern, sparseffn.get_calibration(ref), kernel_mode="always")
    assert kern.model.layers[1].mlp.base.down_proj.weight.device == torch.device("cuda", 1)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 1000, (2, 9), generator=g).to("cuda:0")
    cont = torch.randint(3, 1000, (2, 4), generator=g).to("cuda:0")
    expected = decode_logits(ref, prompt, cont)
    calls = spy(monkeypatch)
    got = decode_logits(kern, prompt, cont)
    assert all(calls[name] > 0 for name in funcs), f"the kernel path did not run: {calls}"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        a = ref.generate(prompt, max_new_tokens=6, do_sample=False)
        b = kern.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
