"""The one place that decides whether a call runs the Triton kernels or the reference path.

A decode step feeds each layer one new token per sequence (x [B, 1, H]); its time is the time of
reading the weights, so the sparse modules hand it to the Triton ops (``sparseffn.decode``),
which never load the weights of inactive neurons. Everything else (prefill, training, the CPU)
takes the reference path in ``sparseffn.modules``. Both paths apply the same thresholds with
the same strict ``>`` test in fp32, so they compute the same function up to rounding.

What can be decided ahead of time is decided at patch time or when the kernel mode changes
(``KernelMode``, whether the kernels run on a device here, whether a module's weights are laid
out for them); what remains per call (``use_kernels``) is static under ``torch.compile``:
shapes, dtypes, devices and the grad mode.
"""
from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

import triton_kernels
import triton_kernels.cpu
from sparseffn.cpu_probe import batch_limit, cpu_path_pays
from sparseffn.errors import SparseFFNError


class KernelMode(str, Enum):
    """Where decode steps run the Triton kernels.

    AUTO: at batch 1 on CUDA tensors, and at a larger batch where the module's decode products
    measured no slower than dense at that batch (``sparseffn.cuda_probe``, probed by the decode
    loops before they compile a step); on CPU tensors through the compiled CPU ops where they
    measure at least as fast as dense for the module's shapes, at batch 1 and at each batch up
    to the probed limit (``sparseffn.cpu_probe``). ALWAYS: any decode batch up to
    ``MAX_DECODE_BATCH`` on every device (on the CPU through the compiled CPU ops, or the
    Triton interpreter under TRITON_INTERPRET=1 as in the tests). NEVER: the reference path
    everywhere, weights in their original layout (the patched model at sparsity 0 then equals
    the original bit for bit).
    """

    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"

    @classmethod
    def parse(cls, value: "KernelMode | str") -> "KernelMode":
        """``value`` as a KernelMode, or a SparseFFNError naming the choices."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise SparseFFNError(f"kernel mode (kernel_mode=) must be one of {choices}, got "
                                 f"{value!r}") from None


#: Largest number of sequences a decode step sends to the kernels under ALWAYS.
MAX_DECODE_BATCH = 16
_AVAILABLE: dict[str, bool] = {}


def kernels_on(device_type: str) -> bool:
    """Whether the Triton ops run on ``device_type`` tensors here (cached at patch time, so a
    compiled forward reads a constant)."""
    if device_type not in _AVAILABLE:
        _AVAILABLE[device_type] = triton_kernels.kernels_available(device_type)
    return _AVAILABLE[device_type]


def takes_kernel_path(mode: KernelMode, weights: list[torch.Tensor]) -> bool:
    """Whether a module whose kernel-path weights are ``weights`` decodes through the kernel
    path under ``mode`` (decided at patch time; its weights are then laid out for it).

    CUDA: AUTO and ALWAYS. CPU: ALWAYS (the Triton interpreter under TRITON_INTERPRET=1, as in
    the tests, else the compiled CPU ops) and AUTO where the CPU ops are measured at least as
    fast as dense for these weights' shapes (``sparseffn.cpu_probe``).
    """
    if mode is KernelMode.NEVER or not weights:
        return False
    device = weights[0].device.type
    if device == "cuda":
        return True
    if device != "cpu":
        return False
    if mode is KernelMode.ALWAYS:
        return kernels_on("cpu") or triton_kernels.cpu.available()
    return cpu_path_pays(weights)


def cpu_batch_limit(mode: KernelMode, weights: list[torch.Tensor]) -> int:
    """The largest batch a module whose CPU kernel path reads ``weights`` takes under ``mode``
    with per-sequence sets: ``MAX_DECODE_BATCH`` under ALWAYS, the probed limit under AUTO."""
    return MAX_DECODE_BATCH if mode is KernelMode.ALWAYS else batch_limit(weights)


def cpu_decode_path(mode: KernelMode, weights: list[torch.Tensor]) -> bool:
    """Whether a kernel path on these weights runs the compiled CPU ops: CPU tensors, except
    under ALWAYS with the Triton interpreter (which the tests run the Triton kernels through)."""
    return (bool(weights) and weights[0].device.type == "cpu"
            and not (mode is KernelMode.ALWAYS and kernels_on("cpu")))


def use_kernels(mode: KernelMode, layout_ready: bool, observing: bool, x: torch.Tensor,
                weight: torch.Tensor, cpu_path: bool = False, shared: bool = False,
                cpu_batch: int = 1, cuda_batches: tuple[int, ...] = ()) -> bool:
    """Whether this call takes the kernel path.

    Args:
        mode: the module's kernel mode.
        layout_ready: it takes the kernel path (``takes_kernel_path``) and its weights are
            laid out for it (``sparseffn.layout``).
        observing: a calibration observer is attached (it must see the reference path).
        x: the module input; a decode step is [B, 1, H].
        weight: a weight the kernels read (dtype and device must match x).
        cpu_path: the module's kernel path is the compiled CPU ops, which are plain C calls
            that ``torch.compile`` cannot trace: a compiled forward takes the reference path.
        shared: the module shares its active sets across the batch (``sparseffn.sharing``):
            a batch then reads at most the rows of one sequence, and under AUTO the CPU ops
            take batches up to ``MAX_DECODE_BATCH`` (docs/e2e.md, "Batch-shared sparsity").
        cpu_batch: under AUTO, the largest batch the module's CPU path takes with per-sequence
            sets (``sparseffn.cpu_probe.batch_limit``).
        cuda_batches: under AUTO, the batches above 1 at which the module's CUDA path measured
            no slower than dense (``sparseffn.cuda_probe``).
    """
    if not layout_ready or observing or (cpu_path and torch.compiler.is_compiling()):
        return False
    # The path was chosen for the weights' device when the mode was set (takes_kernel_path).
    ok = kernels_on("cuda") if x.device.type == "cuda" else x.device.type == "cpu"
    batch = x.shape[0]
    if mode is KernelMode.ALWAYS or (shared and cpu_path):
        batch_ok = batch <= MAX_DECODE_BATCH
    else:
        batch_ok = batch <= cpu_batch if cpu_path else batch == 1 or batch in cuda_batches
    return (ok and x.dim() == 3 and x.shape[1] == 1 and batch_ok
            and x.dtype == weight.dtype and x.device == weight.device
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def kernel_activation(act_fn: nn.Module) -> str | None:
    """The kernels' name for ``act_fn`` ("silu" or "gelu_tanh"), or None if it is neither.

    Decided by evaluating the module, not by its class name: families wrap the same function
    in different classes (SiLU, SiLUActivation, GELUTanh, PytorchGELUTanh ...).
    """
    probe = torch.linspace(-8.0, 8.0, 257)
    try:
        with torch.no_grad():
            out = act_fn(probe)
    except Exception:  # noqa: BLE001 - any module that cannot run on a CPU probe is unknown
        return None
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
        return None
    for name, ref in (("silu", F.silu(probe)), ("gelu_tanh", F.gelu(probe, approximate="tanh"))):
        if torch.allclose(out.float(), ref, rtol=1e-5, atol=1e-6):
            return name
    return None


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose forward is the plain affine map on its own float weight.

    Adapter wrappers (peft's LoRA layers) and quantized linears are excluded: the kernels read
    ``weight`` directly, so a module that adds anything to it must keep its own forward.
    """
    return (type(module) is nn.Linear
            and module.weight.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and not module._forward_hooks and not module._forward_pre_hooks)
