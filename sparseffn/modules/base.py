"""The base of every sparse module: the wrapped original, thresholds, counters, observation.

A sparse module keeps the original module as ``base`` (undo is putting ``base`` back) and holds
its thresholds as float32 buffers ``threshold_{site}``, so a forward pass never leaves the device
to decide what is active. Threshold tests are strict: an input (or neuron) is active when its
magnitude is ``> threshold``, so a zero threshold keeps everything but exact zeros.

Every gated site counts active and total entries (int64 buffers, updated on the device) for
measured-sparsity reports; ``track = False`` turns counting off. During calibration an
``observe(signal, value)`` callback sees each gated quantity before its mask, so thresholds are
fitted on exactly what they are compared with at run time (upstream sparsity included).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from sparseffn import cuda_probe, layout
from sparseffn.decode import above
from sparseffn.dispatch import (MAX_DECODE_BATCH, KernelMode, cpu_batch_limit, cpu_decode_path,
                                kernels_on, takes_kernel_path, use_kernels)
from sparseffn.sharing import shared_mask
from triton_kernels.input_sparse.reference import add_counts

log = logging.getLogger("sparseffn")


class SiteCounter(nn.Module):
    """Active/total counts of one gated site, plus the weight elements it covers.

    The counts live in one int64 [2] buffer, [active, total], which the CPU decode ops
    increment in place (no tensor op per call)."""

    def __init__(self, covered_elements: int, device: torch.device) -> None:
        super().__init__()
        self.covered_elements = covered_elements
        self.register_buffer("counts", torch.zeros(2, dtype=torch.int64, device=device),
                             persistent=False)

    @property
    def active(self) -> torch.Tensor:
        return self.counts[0]

    @property
    def total(self) -> torch.Tensor:
        return self.counts[1]

    def count(self, mask: torch.Tensor) -> None:
        add_counts(self.counts, mask)

    def reset(self) -> None:
        self.counts.zero_()


def own_copy(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float32 copy on ``device`` that shares no memory with ``value`` (thresholds are
    updated in place, which must never reach the Calibration they came from)."""
    return value.detach().to(device=device, dtype=torch.float32, copy=True)


def set_buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set a threshold buffer, in place when the shape allows: a compiled model (and its CUDA
    graphs) keeps reading the same tensor, so a new sparsity level needs no recompilation."""
    old = getattr(module, name)
    value = own_copy(value, old.device)
    if value.shape == old.shape:
        with torch.no_grad():
            old.copy_(value)
    else:
        setattr(module, name, value)


class SparseModule(nn.Module):
    """Base of the sparse wrappers (``SparseLinear``, ``SparseGatedMLP``).

    Attributes:
        base: the original module.
        counters: one ``SiteCounter`` per gated site, in site order.
        track: count active entries in forward passes.
        observe: None, or the calibration callback ``(signal, value)``.
        kernel_mode: where decode steps run the kernels (``set_kernel_mode``).
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.counters = nn.ModuleDict()
        self.track = True
        self.observe: Callable[[str, torch.Tensor], None] | None = None
        self.kernel_mode = KernelMode.AUTO
        self._layout_ready = False
        self._cpu_path = False  # the kernel path runs the ops' CPU decode path
        self._cpu_batch = 1  # ... and takes batches up to this many sequences (per-token sets)
        #: CUDA under AUTO: batch -> whether the kernel path measured no slower than dense
        #: there (``probe_batch``); the batches above 1 it takes.
        self._cuda_probed: dict[int, bool] = {}
        self._cuda_batches: tuple[int, ...] = ()
        #: Each site's calibrated per-token sparsity (set by ``sparseffn.patching``), which the
        #: CUDA batch probe times the products at.
        self.site_sparsity: dict[str, float] = {}
        #: Batch-shared sparsity (``sparseffn.sharing``): channels kept per site, for the sites
        #: that share; empty when every sequence keeps its own set.
        self.shared_keep: dict[str, int] = {}

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.counters)

    def add_site(self, site: str, threshold: torch.Tensor | None, covered_elements: int,
                 device: torch.device) -> None:
        """Gate ``site``: a counter, and a threshold buffer unless the site keeps its own."""
        self.counters[site] = SiteCounter(covered_elements, device)
        if threshold is not None:
            self.register_buffer(f"threshold_{site}", own_copy(threshold, device))

    def threshold(self, site: str) -> torch.Tensor | None:
        return getattr(self, f"threshold_{site}", None)

    def set_threshold(self, site: str, value: torch.Tensor) -> None:
        """Set one site's threshold in place (see ``set_buffer``)."""
        if site not in self.counters:
            raise KeyError(f"site {site!r} is not gated by this module (sites: {self.sites})")
        set_buffer(self, f"threshold_{site}", value)

    def site_width(self, site: str) -> int:
        """Channels (or neurons) ``site`` gates."""
        raise NotImplementedError

    def shares(self, site: str) -> bool:
        """Whether ``site`` can share its active set across a batch (``sparseffn.sharing``)."""
        return site in self.counters

    def site_mask(self, site: str, magnitude: torch.Tensor) -> torch.Tensor:
        """Active entries of ``site`` for input magnitudes [B, ..., C]: the threshold test, or
        where the site shares, the batch's shared set ([1, ..., C], broadcasting)."""
        t = self.threshold(site)
        keep = self.shared_keep.get(site)
        return above(magnitude, t) if keep is None else shared_mask(magnitude, t, keep)

    def counter(self, site: str) -> SiteCounter | None:
        """``site``'s counter while counting is on (``track``), else None."""
        return self.counters[site] if self.track else None

    def count(self, site: str, mask: torch.Tensor) -> None:
        if self.track:
            self.counters[site].count(mask)

    def overhead_elements(self) -> int:
        """Weight elements every decode step reads on top of the base module's (e.g. neuron
        predictors); subtracted from the bytes a report calls skipped."""
        return 0

    # --- kernel path -------------------------------------------------------------------------

    def kernel_linears(self) -> list[nn.Module]:
        """Projections the kernels read input-major (empty: no kernel plan)."""
        return []

    def decision_weights(self) -> list[torch.Tensor]:
        """The weights whose products the kernel path replaces (what the CPU's AUTO decision
        measures, ``sparseffn.cpu_probe``): by default those of ``kernel_linears``."""
        return [lin.weight for lin in self.kernel_linears()]

    def set_kernel_mode(self, mode: KernelMode | str, keep_layout: bool = False) -> None:
        """Choose the policy and lay the weights out for it.

        The weights are re-laid out only where the kernel path runs
        (``sparseffn.dispatch.takes_kernel_path``); elsewhere they get their original layout
        back, so the reference path stays bit-equal to the unpatched model, unless
        ``keep_layout``: then the reference path runs on the kernels' layout, which makes its
        prefill bit-equal to the kernel path's (for checks that compare the two). A model moved
        to the GPU after patching needs this call again.
        """
        mode = KernelMode.parse(mode)
        self.kernel_mode = mode
        kernels_on("cuda"), kernels_on("cpu")  # cache availability now, not inside a compile
        linears = self.kernel_linears()
        weights = [lin.weight for lin in linears]
        decision = self.decision_weights()
        use = bool(weights) and takes_kernel_path(mode, decision)
        self._cpu_path = use and cpu_decode_path(mode, weights)
        self._cpu_batch = cpu_batch_limit(mode, decision) if self._cpu_path else 1
        self.forget_batch_probes()
        for lin in linears:
            if use:
                layout.make_input_major(lin)
            elif not keep_layout:
                layout.restore(lin)
        self._layout_ready = bool(linears) and use and all(
            layout.is_input_major(lin.weight) for lin in linears)

    def restore_layout(self) -> None:
        for lin in self.kernel_linears():
            layout.restore(lin)

    # --- batches above 1 on CUDA -------------------------------------------------------------

    def batch_products(self) -> list[cuda_probe.Product]:
        """The input-sparse launches of one decode step, each as (weights read with one input,
        their sites' per-token sparsities), for the CUDA batch probe; empty where the kernel
        path runs other ops (neuron gates, rotations, shared sets): such a module decodes
        batches above 1 densely under AUTO."""
        return []

    def set_site_sparsity(self, sparsities: dict[str, float]) -> None:
        """The sites' calibrated sparsities (a new level invalidates the batch probes)."""
        self.site_sparsity = dict(sparsities)
        self.forget_batch_probes()

    def forget_batch_probes(self) -> None:
        self._cuda_probed, self._cuda_batches = {}, ()

    def probe_batch(self, batch: int) -> None:
        """Decide, by measuring (``sparseffn.cuda_probe``), whether a CUDA decode step of
        ``batch`` sequences takes the kernel path under AUTO; once per batch and sparsity level.
        Called by the decode loops before they compile a step (the measurement cannot run
        inside a compiled or captured forward); a batch never probed decodes densely."""
        if (batch <= 1 or batch > MAX_DECODE_BATCH or batch in self._cuda_probed
                or self.kernel_mode is not KernelMode.AUTO or not self._layout_ready
                or self._cpu_path or self.shared_keep):
            return  # (under AUTO a layout made ready without the CPU path is a CUDA one)
        products = self.batch_products()
        self._cuda_probed[batch] = cuda_probe.pays(products, batch)
        self._cuda_batches = tuple(sorted(b for b, ok in self._cuda_probed.items() if ok))

    def use_kernels(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether this call takes the kernel path (``sparseffn.dispatch.use_kernels``)."""
        return use_kernels(self.kernel_mode, self._layout_ready, self.observe is not None, x,
                           weight, self._cpu_path, bool(self.shared_keep), self._cpu_batch,
                           self._cuda_batches)


def probe_batch(model: nn.Module, batch: int) -> None:
    """Before a decode loop compiles a step of ``batch`` sequences: let every sparse module of
    ``model`` decide by measurement whether its kernel path pays at that batch under AUTO
    (``SparseModule.probe_batch``). Harmless on any model."""
    modules = [m for m in model.modules() if isinstance(m, SparseModule)]
    fresh = [m for m in modules if batch not in m._cuda_probed]
    for module in fresh:
        module.probe_batch(batch)
    decided = [m for m in fresh if batch in m._cuda_probed]
    if decided:
        log.info("sparseffn: batch %d decodes through the kernels in %d of %d modules (measured "
                 "no slower than dense there), densely in the rest", batch,
                 sum(m._cuda_probed[batch] for m in decided), len(modules))
