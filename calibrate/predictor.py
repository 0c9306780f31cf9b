"""Neuron predictors (Deja Vu, PowerInfer): a small low-rank network per layer that guesses,
from the MLP input alone, which FFN neurons matter for a token.

A predictor lets a decode step skip the *gate* rows of inactive neurons too (the threshold
criteria must read the whole gate to decide), so its weight bytes skipped approach the neuron
sparsity itself: at 50% of neurons it skips half the FFN, where CATS/CHESS skip a third.

Training labels come from the dense model: for each token the k = (1 - sparsity) * I neurons
with the largest |act(gate(x)) * up(x)| (the down projection's input, i.e. the neurons whose
contribution to the output is largest) are positives. The predictor, scores = B (A x) with
A [r, H] and B [I, r], is trained with binary cross-entropy on the layer's real inputs, online:
each calibration batch's activations train every layer's predictor as the batch flows through
the model, so no activations are stored and memory stays that of one batch.

At run time neuron i is active when its score is above the layer's threshold, fitted so that
the mean fraction of inactive neurons on the calibration text is the target (as CATS does
with |act|). A per-token top-k would hit the target exactly per token, but ``torch.topk`` over
14336 neurons made a Llama-3-8B-shaped decode step slower than dense on an H200 (0.73x at 50%,
docs/e2e.md); a threshold is one elementwise compare. A last pass records a sample of the
trained predictor's scores; their quantiles (``SCORE_GRID`` points) are stored as the layer's
statistics, so the threshold can be refitted at another sparsity without data.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calibrate.errors import CalibrationError
from calibrate.observe import Observable, run_observed

#: Tokens per optimizer step; a calibration batch of 4 x 512 tokens gives 8 steps.
MINIBATCH_TOKENS = 256
#: Scores sampled per layer and batch in the scoring pass, and quantile points kept of them.
SCORE_SAMPLES = 65536
SCORE_GRID = 1025
MAX_QUANTILE_INPUT = 1 << 23
#: Statistic key of a layer's score quantiles.
SCORE_GRID_KEY = "score_grid"


def threshold_from_grid(grid: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Score threshold leaving ``sparsity`` of the scores at or below it, from their quantiles
    ``grid`` [G] at 0, 1/(G-1), ..., 1 (float32 []); -inf at sparsity 0, so every neuron stays
    and the MLP is exactly dense."""
    if sparsity <= 0:
        return torch.tensor(float("-inf"))
    pos = sparsity * (grid.numel() - 1)
    lo = min(int(pos), grid.numel() - 2)
    frac = pos - lo
    return (grid[lo] + frac * (grid[lo + 1] - grid[lo])).float()


def default_rank(hidden: int) -> int:
    """Predictor rank for hidden size H: H / 16 within [64, 1024] (SmolLM2: 64, 10% of the MLP's
    bytes; Llama-3-8B: 256, 2.7%)."""
    return max(64, min(1024, hidden // 16))


def keep_count(intermediate: int, sparsity: float) -> int:
    """Neurons kept per token at ``sparsity`` (the same rounding as the top-k module)."""
    return intermediate - round(sparsity * intermediate)


class _LayerTrainer:
    """Trains one layer's predictor from the (mlp_in, act, up) signals its wrapper reports."""

    def __init__(self, hidden: int, intermediate: int, rank: int, keep: int, lr: float,
                 device: torch.device, generator: torch.Generator) -> None:
        a = torch.randn(rank, hidden, generator=generator) / hidden ** 0.5
        b = torch.randn(intermediate, rank, generator=generator) / rank ** 0.5
        self.a = nn.Parameter(a.to(device))
        self.b = nn.Parameter(b.to(device))
        self.opt = torch.optim.Adam([self.a, self.b], lr=lr)
        self.keep = keep
        self.x: torch.Tensor | None = None
        self.act: torch.Tensor | None = None
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.recall_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.batches = 0
        self.training = True  # False: score with the final weights and record the scores
        self.samples: list[torch.Tensor] = []
        self.generator = generator

    def report(self, signal: str, value: torch.Tensor) -> None:
        if signal == "mlp_in":
            self.x = value.detach().reshape(-1, value.shape[-1]).float()
        elif signal == "act":
            self.act = value.detach().reshape(-1, value.shape[-1])
        elif signal == "up" and self.x is not None and self.act is not None:
            importance = (self.act * value.detach().reshape(-1, value.shape[-1])).float().abs()
            labels = torch.zeros_like(importance)
            labels.scatter_(-1, importance.topk(self.keep, dim=-1).indices, 1.0)
            if self.training:
                self._train(self.x, labels)
            else:
                self._score(self.x, labels)
            self.x = self.act = None

    def _train(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """x [T, H], labels [T, I] (1: among the token's top-k): Adam steps on minibatches."""
        with torch.enable_grad():
            for xb, yb in zip(x.split(MINIBATCH_TOKENS), labels.split(MINIBATCH_TOKENS)):
                scores = F.linear(F.linear(xb, self.a), self.b)
                loss = F.binary_cross_entropy_with_logits(scores, yb)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()

    @torch.no_grad()
    def _score(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Loss, top-k recall and a sample of the scores of the final weights."""
        scores = F.linear(F.linear(x, self.a), self.b)
        picked = torch.zeros_like(labels).scatter_(-1, scores.topk(self.keep, -1).indices, 1.0)
        self.recall_sum += (picked * labels).sum() / labels.sum().clamp_min(1)
        self.loss_sum += F.binary_cross_entropy_with_logits(scores, labels)
        flat = scores.flatten()
        pick = torch.randperm(flat.numel(), generator=self.generator)[:SCORE_SAMPLES]
        self.samples.append(flat[pick.to(flat.device)].cpu())
        self.batches += 1

    def score_grid(self) -> torch.Tensor:
        """Quantiles [SCORE_GRID] of the recorded scores, at 0, 1/(SCORE_GRID-1), ..., 1."""
        scores = torch.cat(self.samples).double()
        if scores.numel() > MAX_QUANTILE_INPUT:  # torch.quantile's input limit is 2^24
            keep = torch.randperm(scores.numel(), generator=self.generator)[:MAX_QUANTILE_INPUT]
            scores = scores[keep]
        return torch.quantile(scores, torch.linspace(0, 1, SCORE_GRID, dtype=torch.float64))


def split_windows(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) windows: the last eighth (at least one) is held out.

    The thresholds come from scores on windows the predictor never trained on: on its own
    training tokens it is overconfident (on a tiny random model, a threshold fitted there for
    70% gave 41% on fresh tokens), and so is its recall.
    """
    if len(windows) < 2:
        return windows, windows
    n_held = max(1, len(windows) // 8)
    return windows[:-n_held], windows[-n_held:]


def train_predictors(model: nn.Module, mlps: list[tuple[int, Observable, torch.Tensor]],
                     windows: torch.Tensor, sparsity: list[float], rank: int = 0,
                     epochs: int = 4, lr: float = 3e-3, batch_size: int = 4,
                     progress: bool = True, seed: int = 0
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                dict[str, float]]:
    """Train one predictor per decoder layer on ``windows`` [N, L] of token ids, layer i for
    the neuron sparsity ``sparsity[i]``.

    ``mlps`` holds, per decoder layer, (layer index, the observable module that reports that
    layer's ``mlp_in``, ``act`` and ``up`` signals, its down projection weight [H, I]); the
    model must compute the dense function (zero thresholds). Every epoch is one pass over the
    training windows; a last pass scores the held-out ones (``split_windows``) with the final
    weights, for the thresholds' quantiles and the reported loss and recall.

    Returns:
        (``{"layers.{i}.a": [r, H], "layers.{i}.b": [I, r]}`` float32 on the CPU,
         ``{"layers.{i}.score_grid": [SCORE_GRID]}`` score quantiles (float64),
         metrics of the final weights on the held-out windows: mean BCE loss and mean top-k
         recall over layers).
    """
    if epochs < 1:
        raise CalibrationError(f"predictor epochs must be >= 1, got {epochs}")
    g = torch.Generator().manual_seed(seed)
    trainers = {}
    for i, _, down in mlps:
        hidden, inter = down.shape
        r = rank or default_rank(hidden)
        trainers[i] = _LayerTrainer(hidden, inter, r, keep_count(inter, sparsity[i]), lr,
                                    down.device, g)
    callbacks = [(mlp, trainers[i].report) for i, mlp, _ in mlps]
    train, held = split_windows(windows)
    for epoch in range(epochs + 1):  # the last pass only scores, with the final weights
        for t in trainers.values():
            t.training = epoch < epochs
        if epoch < epochs:
            run_observed(model, callbacks, train, batch_size, progress,
                         f"training predictors (epoch {epoch + 1}/{epochs})")
        else:
            run_observed(model, callbacks, held, batch_size, progress,
                         "scoring predictors (held-out windows)")
    out: dict[str, torch.Tensor] = {}
    grids: dict[str, torch.Tensor] = {}
    for i, t in trainers.items():
        if not (torch.isfinite(t.a).all() and torch.isfinite(t.b).all()):
            raise CalibrationError(f"predictor training diverged in layer {i} (non-finite "
                                   "weights); lower the learning rate or check the model")
        out[f"layers.{i}.a"] = t.a.detach().cpu().contiguous()
        out[f"layers.{i}.b"] = t.b.detach().cpu().contiguous()
        grids[f"layers.{i}.{SCORE_GRID_KEY}"] = t.score_grid()
    n = sum(t.batches for t in trainers.values())
    metrics = {"predictor_loss": float(sum(t.loss_sum for t in trainers.values()) / max(n, 1)),
               "predictor_recall": float(sum(t.recall_sum for t in trainers.values()) / max(n, 1))}
    return out, grids, metrics
